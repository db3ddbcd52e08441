"""Re-read an edited policy file by parsing only the rules that changed.

A 10,000-rule file takes about half a second to compose and validate
(microseg/policy/parse.py); a one-rule edit of it should be enforced within
250 ms (docs/performance.md "Reloads"). After a file parsed and validated in
full, `Reparser` keeps its text and, per rule of its block-style `rules:`
list, the Rule, the line its `- ` starts on and what the file-wide checks
need of it. The next version of the file is compared with that text: when
the lines that differ lie inside the rules list, only the rules around them
are composed and validated (with the parser and validator of a full parse,
at their real lines); the unchanged rules are reused as they are — the same
Rule objects, which lets the compiler see at once which rules changed.

The result is the one a full parse gives. Anything the shortcut cannot
judge exactly — an error anywhere, a change outside the rules list, other
line breaks than LF, anchors, document markers, a rule's text that would
read differently in the whole file — goes to the full parse, which also
writes every error message (`FILE:LINE:COL: message`).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass

from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

from microseg.kernel import abi
from microseg.policy.model import Rule, Selector
from microseg.policy.parse import (
    MAX_FILE_BYTES,
    MAX_NESTING,
    MAX_NODES,
    Issue,
    LoadedPolicy,
    ParsedTree,
    ReferenceCheck,
    _clip,
    _TooManyNodes,
    _Validator,
    compose,
    parse_tree,
)

# Line breaks other than LF (YAML counts \r, NEL, LS and PS as breaks too):
# the shortcut numbers lines by LF alone.
_OTHER_BREAKS = (b"\r", "\x85".encode(), "\u2028".encode(), "\u2029".encode())
_BRACKETS = re.compile(r"[\[\]{}]")
# A top-level `mode:` or `default:` line as the shortcut reads it: one plain word.
_SETTING = re.compile(r"^(mode|default): +([a-z]+) *$")
_CHOICES = {"mode": ("enforce", "audit"), "default": ("allow", "deny")}
_INDENT = re.compile(r"^[ \t-]*", re.M)
_BLOCK = 64 * 1024  # bytes compared at a time when looking for the first difference

log = logging.getLogger("microseg.policy")


def _walk(text: str, depth: int) -> tuple[int, int]:
    """parse.nesting_bound's flow-bracket depth over a stretch of text,
    entered at `depth`: (depth at its end, deepest within)."""
    peak = depth
    for ch in _BRACKETS.findall(text):
        depth = depth + 1 if ch in "[{" else (depth - 1 if depth > 0 else 0)
        if depth > peak:
            peak = depth
    return depth, peak


def _indent(text: str) -> int:
    """parse.nesting_bound's block part over a stretch of whole lines."""
    return max(map(len, _INDENT.findall(text)), default=0)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo < n and a[lo:min(lo + _BLOCK, n)] == b[lo:min(lo + _BLOCK, n)]:
        lo = min(lo + _BLOCK, n)
    hi = min(lo + _BLOCK, n)
    while lo < hi:  # a[:lo] == b[:lo], and they differ before hi (or end there)
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    n = min(len(a), len(b), limit)
    lo = 0
    while lo < n and a[len(a) - lo - min(_BLOCK, n - lo):len(a) - lo] == \
            b[len(b) - lo - min(_BLOCK, n - lo):len(b) - lo]:
        lo += min(_BLOCK, n - lo)
    hi = min(lo + _BLOCK, n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:len(a) - lo] == b[len(b) - mid:len(b) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class _Item:
    """One rule of the list, as the file-wide checks need it."""

    rule: Rule
    # Its references that are warnings (the workloads, hence which they
    # are, stay as they were while re-reading): (line after the item's first
    # line, column, path after "rules[i]", selector).
    refs: list[tuple[int, int, str, Selector]]
    depth: int   # flow depth where the item's text starts
    peak: int    # deepest flow depth within it
    indent: int  # widest block indentation within it


@dataclass
class _State:
    data: bytes
    lines: list[str]
    loaded: LoadedPolicy
    column: int              # of the rules list's `-`
    starts: list[int]        # each item's first line (0-based)
    end: int                 # the first line after the list
    items: list[_Item]
    head: tuple[int, int]    # flow peak, indentation of the lines before the list
    tail: tuple[int, int, int]  # (flow max prefix, peak from 0, indentation) after it
    tail_depth: int          # flow depth where the text after the list starts
    settings: dict[int, str]  # lines of the `mode:`/`default:` keys written as _SETTING
    nodes: int               # at least the file's YAML nodes
    check: ReferenceCheck


class Reparser:
    """Reads versions of one policy file; see the module's docstring."""

    def __init__(self) -> None:
        self._state: _State | None = None
        self.shortcuts = 0  # reads that parsed only what changed (tests, logs)

    def parse(self, data: bytes, filename: str) -> LoadedPolicy:
        """parse_policy(data, filename), the same answer, faster after an edit."""
        st = self._state
        if st is not None and st.loaded.source == filename:
            try:
                fast = self._edit(st, data, filename)
            except (YAMLError, ValueError, RecursionError, _TooManyNodes):
                fast = None  # whatever it is, the full parse says it exactly
            except Exception:  # a shortcut's bug must not cost a reload
                log.exception("policy re-read: parsing the whole file instead")
                fast = None
            if fast is not None:
                self.shortcuts += 1
                return fast
        tree = parse_tree(data, filename)  # raises PolicyError: the state stays
        try:
            self._state = _state_of(tree, data)
        except Exception:
            log.exception("policy re-read: the next read parses the whole file")
            self._state = None
        return tree.loaded

    # -- an edit -------------------------------------------------------------

    def _settings(self, st: _State, data: bytes, lines: list[str], first: int, after: int,
                  filename: str) -> LoadedPolicy | None:
        """Only `mode:` or `default:` lines changed, each still one plain
        word: the policy with those values, nothing else parsed."""
        values = {}
        for i in range(first, after):
            m = _SETTING.match(lines[i])
            if m is None or m.group(1) != st.settings[i] or m.group(2) not in _CHOICES[m.group(1)]:
                return None
            values[m.group(1)] = m.group(2)
        policy = dataclasses.replace(st.loaded.policy, **values)
        loaded = LoadedPolicy(policy, filename, hashlib.sha256(data).hexdigest(),
                              st.loaded.warnings, data=data)
        self._state = dataclasses.replace(st, data=data, lines=lines, loaded=loaded)
        return loaded

    def _edit(self, st: _State, data: bytes, filename: str) -> LoadedPolicy | None:
        if len(data) > MAX_FILE_BYTES or any(b in data for b in _OTHER_BREAKS):
            return None
        text = data.decode("utf-8")  # invalid: ValueError, the full parse says where
        if data == st.data:
            return dataclasses.replace(st.loaded, source=filename)
        lines = text.split("\n")
        pre = _common_prefix(st.data, data)
        post = _common_suffix(st.data, data, min(len(st.data), len(data)) - pre)
        first = st.data.count(b"\n", 0, pre)                     # first line that differs
        after = len(st.lines) - st.data.count(b"\n", len(st.data) - post)  # old lines after
        shift = len(lines) - len(st.lines)
        if not shift and all(i in st.settings for i in range(first, after)):
            return self._settings(st, data, lines, first, after, filename)
        # The items around the change: from the last that starts before it
        # (its first line is unchanged) to the first that starts after it.
        k0 = _last_before(st.starts, first)
        if k0 < 0:
            return None
        k1 = _first_at(st.starts, after)
        old_end = st.starts[k1] if k1 < len(st.starts) else st.end
        if old_end < after:
            return None  # the change runs past the rules list
        lo, hi = st.starts[k0], old_end + shift
        chunk = lines[lo:hi]
        starts = _item_lines(chunk, st.column, lo)
        if starts is None or not starts or starts[0] != lo:
            return None
        body = "\n".join(chunk)
        if "&" in body:
            return None  # an anchor here could clash with one elsewhere
        root, nodes = compose("\n" * lo + body)
        if (not isinstance(root, SequenceNode) or root.flow_style
                or root.start_mark.line != lo or root.start_mark.column != st.column
                or len(root.value) != len(starts)):
            return None
        for j, node in enumerate(root.value):
            nxt = starts[j + 1] if j + 1 < len(starts) else hi
            if not starts[j] <= node.start_mark.line < nxt:
                return None
        total = st.nodes + nodes
        if total > MAX_NODES:
            return None
        v = _Validator()
        nodes_ok = v.sequence(root, "rules")
        if nodes_ok is None:
            return None
        new_items: list[_Item] = []
        depth = st.items[k0].depth
        names: dict[str, int] = {}
        for j, node in enumerate(nodes_ok):
            idx = k0 + j
            seen = len(v._references)
            rule = v._rule(node, f"rules[{idx}]", names)
            if rule is None or v.errors:
                return None
            nxt = starts[j + 1] if j + 1 < len(starts) else hi
            seg = "\n".join(chunk[starts[j] - lo:nxt - lo])
            end_depth, peak = _walk(seg, depth)
            refs = [r for r in v._references[seen:] if not st.check.fine(r[2])]
            new_items.append(_Item(rule, _relative(refs, idx, starts[j]), depth, peak,
                                   _indent(seg)))
            depth = end_depth
        old_depth = st.items[k1].depth if k1 < len(st.items) else st.tail_depth
        if depth != old_depth:
            return None  # brackets left open: the text after reads deeper
        items = st.items[:k0] + new_items + st.items[k1:]
        if len(items) >= abi.MAX_RULES:
            return None
        rules = tuple(i.rule for i in items)
        if len({r.name for r in rules}) != len(rules):
            return None  # a duplicate name: the full parse says which
        t_max, t_peak0, t_indent = st.tail
        flow = max(st.head[0], max(i.peak for i in items), st.tail_depth + t_max, t_peak0)
        block = max(st.head[1], max(i.indent for i in items), t_indent)
        if flow + block > MAX_NESTING:
            return None
        item_starts = st.starts[:k0] + starts + [s + shift for s in st.starts[k1:]]
        warnings = _reference_issues(st.check, items, item_starts)
        if warnings is None:
            return None
        policy = dataclasses.replace(st.loaded.policy, rules=rules)
        loaded = LoadedPolicy(policy, filename, hashlib.sha256(data).hexdigest(), warnings,
                              data=data)
        self._state = dataclasses.replace(st, data=data, lines=lines, loaded=loaded,
                                          starts=item_starts, end=st.end + shift, items=items,
                                          nodes=total)
        return loaded


def _last_before(starts: list[int], line: int) -> int:
    """Index of the last item starting before `line`, or -1."""
    return bisect.bisect_left(starts, line) - 1


def _first_at(starts: list[int], line: int) -> int:
    """Index of the first item starting at or after `line` (len: none)."""
    return bisect.bisect_left(starts, line)


def _item_lines(lines: list[str], column: int, first: int) -> list[int] | None:
    """The lines (numbered from `first`) where items of a block list at
    `column` start; None when a line could end the list or change how the
    file around it reads (less indented content, tabs, document markers)."""
    out = []
    lead = " " * column
    for n, line in enumerate(lines):
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if indent < column or stripped[0] == "\t" or line.startswith(("---", "...", "%")):
            return None
        if indent == column:
            if not (line.startswith(lead + "-") and line[column + 1:column + 2] in ("", " ")):
                return None
            out.append(first + n)
    return out


def _relative(refs: list[tuple[tuple[int, int], str, Selector]], idx: int, start: int
              ) -> list[tuple[int, int, str, Selector]]:
    prefix = f"rules[{idx}]"
    out = []
    for (line, col), path, sel in refs:
        assert path.startswith(prefix)
        out.append((line - 1 - start, col, path[len(prefix):], sel))
    return out


def _reference_issues(check: ReferenceCheck, items: list[_Item], starts: list[int]
                      ) -> list[Issue] | None:
    """The warnings of the rules' references, in file order, as the full
    parse gives them; None if one is an error (the full parse reports it)."""
    out = []
    for idx, item in enumerate(items):
        for rel, col, tail, sel in item.refs:
            severity, message = check.issue(f"rules[{idx}]{tail}", sel)
            if severity == "error":
                return None
            out.append(Issue(starts[idx] + rel + 1, col, _clip(message), "warning"))
    return out


def _state_of(tree: ParsedTree, data: bytes) -> _State | None:
    """What the next read needs of a full parse, when its rules are a block
    list the shortcut can read (else None: the next read parses in full)."""
    root = tree.root
    if not isinstance(root, MappingNode) or root.flow_style or root.start_mark.column != 0:
        return None
    if any(b in data for b in _OTHER_BREAKS):
        return None
    lines = tree.text.split("\n")
    rules_key = rules = None
    top_lines = []
    settings: dict[int, str] = {}
    for k, val in root.value:
        if k.start_mark.column != 0:
            return None
        top_lines.append(k.start_mark.line)
        if (k.value in _CHOICES and isinstance(val, ScalarNode) and not val.style
                and val.start_mark.line == k.start_mark.line
                and _SETTING.match(lines[k.start_mark.line])):
            settings[k.start_mark.line] = k.value
        if k.value == "rules":
            rules_key, rules = k, val
    if (rules_key is None or not isinstance(rules, SequenceNode) or rules.flow_style
            or not rules.value or rules.start_mark.line <= rules_key.start_mark.line):
        return None
    # A parse's only warnings are its rules' references (_check_references):
    # the shortcut makes them again from the references it keeps.
    v = tree.validator
    refs = v._references
    column = rules.start_mark.column
    first = rules.start_mark.line
    end = min((n for n in top_lines if n > rules_key.start_mark.line), default=len(lines))
    starts = _item_lines(lines[first:end], column, first)
    rule_list = tree.loaded.policy.rules
    if starts is None or len(starts) != len(rules.value) or len(rule_list) != len(starts):
        return None
    for j, node in enumerate(rules.value):
        nxt = starts[j + 1] if j + 1 < len(starts) else end
        if not starts[j] <= node.start_mark.line < nxt:
            return None
    policy = tree.loaded.policy
    check = ReferenceCheck(v._workload_names, v._label_sets, policy.discover)
    by_item: list[list[tuple[int, int, str, Selector]]] = [[] for _ in starts]
    for (line, col), path, sel in refs:
        if not path.startswith("rules["):
            return None
        if check.fine(sel):
            continue
        idx = int(path[6:path.index("]")])
        by_item[idx].append((line - 1 - starts[idx], col, path[path.index("]") + 1:], sel))
    head_text = "\n".join(lines[:starts[0]])
    depth, head_peak = _walk(head_text, 0)
    items = []
    for j, rule in enumerate(rule_list):
        seg = "\n".join(lines[starts[j]:starts[j + 1] if j + 1 < len(starts) else end])
        end_depth, peak = _walk(seg, depth)
        items.append(_Item(rule, by_item[j], depth, peak, _indent(seg)))
        depth = end_depth
    tail_text = "\n".join(lines[end:])
    t_peak0 = _walk(tail_text, 0)[1]
    t_max = _walk(tail_text, 1 << 30)[1] - (1 << 30)  # the unclamped highest prefix
    return _State(data, lines, tree.loaded, column, starts, end, items,
                  (head_peak, _indent(head_text)), (t_max, t_peak0, _indent(tail_text)),
                  depth, settings, tree.nodes, check)
