"""Edit a policy file in place — add or delete a rule — and write it atomically.

Edits are made on the text, at the positions the YAML parser reports, so
everything else in the file — comments, key order, quoting, blank lines —
stays exactly as it was: a new rule is inserted after the last one at the
list's indentation; a deleted rule takes its own lines and the comment lines
directly above it. (A `rules` list written in flow style, `[...]`, is
re-emitted by ruamel.yaml's round-trip dumper instead.)

Selectors on the command line: ``any``, ``workload:NAME``,
``labels:k=v[,k=v]``, ``cidr:PREFIX``; several separated by ``;`` or by
repeating the option. Ports: ``80,443,8000-8100``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from microseg.policy.parse import LoadedPolicy, parse_policy

_PLAIN = re.compile(r"^[A-Za-z0-9_./-]+$")


class EditError(ValueError):
    """A bad edit request: its message is one line for the user."""


def _scalar(value: str) -> str:
    """A YAML scalar that reads back as the same string (JSON strings are
    valid YAML double-quoted scalars)."""
    if _PLAIN.match(value) and value not in ("any", "true", "false", "null", "~", "yes", "no"):
        return value
    return json.dumps(value)


def parse_selector(text: str) -> str:
    """One command-line selector as YAML flow text."""
    text = text.strip()
    if text == "any":
        return "any"
    kind, sep, value = text.partition(":")
    if not sep or not value:
        raise EditError(f"selector '{text}': expected any, workload:NAME, labels:k=v[,k=v] "
                        "or cidr:PREFIX")
    if kind in ("workload", "cidr"):
        return f"{{{kind}: {_scalar(value)}}}"
    if kind == "labels":
        pairs = []
        for pair in value.split(","):
            k, eq, v = pair.partition("=")
            if not eq or not k.strip():
                raise EditError(f"selector '{text}': labels need k=v pairs")
            pairs.append(f"{_scalar(k.strip())}: {_scalar(v.strip())}")
        return "{labels: {" + ", ".join(pairs) + "}}"
    raise EditError(f"selector '{text}': unknown kind '{kind}' "
                    "(expected workload, labels or cidr)")


def _selectors(values: list[str]) -> str:
    parts = [p for v in values for p in v.split(";") if p.strip()]
    sels = [parse_selector(p) for p in parts]
    if not sels:
        raise EditError("a rule needs --from and --to selectors")
    return sels[0] if len(sels) == 1 else "[" + ", ".join(sels) + "]"


def parse_ports(text: str) -> str:
    """'80,443,8000-8100' as the YAML list [80, 443, "8000-8100"]."""
    items = []
    for part in text.split(","):
        part = part.strip()
        if part:
            items.append(part if part.isdigit() else json.dumps(part))
    if not items:
        raise EditError(f"ports '{text}': expected a list like 80,443,8000-8100")
    return "[" + ", ".join(items) + "]"


def _rule_lines(name: str, sources: list[str], destinations: list[str], action: str,
                protocol: str | None, ports: str | None) -> list[str]:
    lines = [f"- name: {_scalar(name)}", f"  from: {_selectors(sources)}",
             f"  to: {_selectors(destinations)}"]
    if protocol:
        lines.append(f"  protocol: {protocol}")
    if ports:
        lines.append(f"  ports: {parse_ports(ports)}")
    lines.append(f"  action: {action}")
    return lines


def _compose(text: str, filename: str) -> MappingNode:
    try:
        root = YAML(typ="rt").compose(text)
    except Exception as e:  # ruamel raises many kinds; the file must parse first
        raise EditError(f"{filename}: cannot edit a file that does not parse ({e})") from None
    if not isinstance(root, MappingNode):
        raise EditError(f"{filename}: not a policy mapping")
    return root


def _rules_node(root: MappingNode) -> tuple[ScalarNode, Node] | None:
    for k, v in root.value:
        if isinstance(k, ScalarNode) and k.value == "rules":
            return k, v
    return None


def _item_name(item: Node) -> str | None:
    if isinstance(item, MappingNode):
        for k, v in item.value:
            if isinstance(k, ScalarNode) and k.value == "name" and isinstance(v, ScalarNode):
                return str(v.value)
    return None


def _last_line(node: Node) -> int:
    """0-based line of the node's last character. A block collection ends
    where the next token starts, so look into its last entry instead."""
    if isinstance(node, MappingNode) and not node.flow_style and node.value:
        return _last_line(node.value[-1][1])
    if isinstance(node, SequenceNode) and not node.flow_style and node.value:
        return _last_line(node.value[-1])
    end = node.end_mark
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def add_rule(text: str, filename: str, *, name: str, sources: list[str],
             destinations: list[str], action: str, protocol: str | None = None,
             ports: str | None = None) -> str:
    """The file's text with one more rule after the last one."""
    root = _compose(text, filename)
    rules = _rules_node(root)
    new = _rule_lines(name, sources, destinations, action, protocol, ports)
    if rules is not None and isinstance(rules[1], SequenceNode):
        items = rules[1].value
        if any(_item_name(i) == name for i in items):
            raise EditError(f"rule '{name}' already exists in {filename}")
        if items and not rules[1].flow_style:
            lines = text.splitlines(keepends=True)
            dash = max(0, items[-1].start_mark.column - 2)
            at = _last_line(items[-1]) + 1
            if at > 0 and not lines[at - 1].endswith("\n"):
                lines[at - 1] += "\n"
            insert = "".join(" " * dash + line + "\n" for line in new)
            return "".join(lines[:at]) + insert + "".join(lines[at:])
    if rules is not None and not isinstance(rules[1], SequenceNode) and not (
            isinstance(rules[1], ScalarNode) and rules[1].value in ("", None)):
        raise EditError(f"{filename}: 'rules' is not a list")
    return _roundtrip_append(text, filename, new)


def _roundtrip_append(text: str, filename: str, new: list[str]) -> str:
    """No block list to extend (no rules yet, or rules in flow style): let
    ruamel.yaml re-emit the document with the rule appended."""
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    doc = y.load(text)
    rule = y.load("\n".join(new))[0]
    if doc.get("rules") is None:
        doc["rules"] = []
    doc["rules"].append(rule)
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue()


def delete_rule(text: str, filename: str, name: str) -> str:
    """The file's text without the rule called `name` (and the comment lines
    directly above it)."""
    root = _compose(text, filename)
    rules = _rules_node(root)
    if rules is None or not isinstance(rules[1], SequenceNode):
        raise EditError(f"{filename}: has no rules")
    items = rules[1].value
    for i, item in enumerate(items):
        if _item_name(item) != name:
            continue
        if rules[1].flow_style or len(items) == 1:
            return _roundtrip_delete(text, i)
        lines = text.splitlines(keepends=True)
        first, last = item.start_mark.line, _last_line(item)
        while first > 0 and lines[first - 1].lstrip().startswith("#"):
            first -= 1  # the rule's own comment block
        return "".join(lines[:first] + lines[last + 1:])
    raise EditError(f"no rule named '{name}' in {filename}")


def _roundtrip_delete(text: str, index: int) -> str:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    doc = y.load(text)
    del doc["rules"][index]
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue()


def validated(text: str, filename: str) -> LoadedPolicy:
    """The edited text must still be a valid policy (raises PolicyError)."""
    return parse_policy(text.encode(), filename)


def write_atomically(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace path's content in one rename (readers see old or new, never
    half), keeping its mode (or giving it `mode`); a symlinked path has its
    target replaced."""
    target = Path(os.path.realpath(path))
    if mode is None:
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


__all__ = ["EditError", "add_rule", "delete_rule", "parse_ports", "parse_selector",
           "validated", "write_atomically"]
