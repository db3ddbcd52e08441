"""The `/` filter of `microseg top`: the `watch` filter language as text.

    verdict=denied workload=web        both must hold
    !protocol=udp                      negation
    port=443 ip=10.0.0.0/8             any `watch` key: type verdict ip from-ip
                                       to-ip port protocol workload rule state
    web                                a bare word: in an address, workload,
                                       rule or protocol of the row

A view ignores the terms it cannot answer (the Rules view knows rule names
and protocols, not addresses).
"""

from __future__ import annotations

from dataclasses import dataclass

from microseg.flow.filters import EVENT_KEYS, Filter, FilterError

KEYS = (*EVENT_KEYS, "state")


@dataclass(frozen=True)
class Term:
    negated: bool
    key: str             # a Filter key, or "" for a bare word
    filter: Filter | None
    word: str = ""

    def holds(self, row: dict) -> bool:
        if self.filter is not None:
            return self.filter.matches(row)
        return self.word in _text(row)


def _text(row: dict) -> str:
    src, dst = row.get("src") or {}, row.get("dst") or {}
    return " ".join(str(x) for x in (src.get("ip"), src.get("workload"), dst.get("ip"),
                                     dst.get("workload"), row.get("rule"),
                                     row.get("protocol")) if x is not None)


@dataclass(frozen=True)
class FilterExpr:
    text: str = ""
    terms: tuple[Term, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FilterExpr:
        """Raises FilterError with a message fit for one line."""
        terms = []
        for raw in text.split():
            negated = raw.startswith("!")
            body = raw[1:] if negated else raw
            if not body:
                raise FilterError("'!' needs a term after it")
            key, eq, value = body.partition("=")
            if not eq:
                terms.append(Term(negated, "", None, body))
                continue
            key = key.replace("-", "_")
            if key not in KEYS:
                raise FilterError(f"unknown key '{key}' (one of: "
                                  f"{', '.join(k.replace('_', '-') for k in KEYS)})")
            if not value:
                raise FilterError(f"'{key}=' needs a value")
            terms.append(Term(negated, key, Filter.parse({key: value}, KEYS)))
        return cls(text.strip(), tuple(terms))

    @property
    def empty(self) -> bool:
        return not self.terms

    def matches(self, row: dict, keys: frozenset[str] | None = None) -> bool:
        """keys: the filter keys this kind of row can answer (None: all)."""
        for t in self.terms:
            if keys is not None and t.key and t.key not in keys:
                continue
            if t.holds(row) == t.negated:
                return False
        return True


__all__ = ["FilterError", "FilterExpr"]
