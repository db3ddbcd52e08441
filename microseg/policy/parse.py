"""Read and validate a policy file (docs/policy.md) into a Policy.

Validation works on the YAML node tree (ruamel.yaml's composer), where every
scalar knows its line and column, duplicate keys are still visible and an
alias is the same node seen twice. Every problem is collected — not just the
first — as ``FILE:LINE:COL: message`` with the field path and what was
expected. Hostile input gets the same treatment: files over 16 MiB or not
regular files, invalid UTF-8, aliases (billion laughs), YAML tags, nesting too
deep for the parser, more nodes than any policy needs; the errors themselves
are bounded in number and length.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import ipaddress
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from ruamel.yaml import YAML
from ruamel.yaml.composer import ComposerError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.resolver import BaseResolver
from ruamel.yaml.tag import Tag

from microseg.kernel import abi
from microseg.policy.model import (
    DEFAULT_DOCKER_SOCKET,
    PROTOCOLS,
    Discovery,
    IPNetwork,
    Policy,
    Rule,
    Selector,
    Workload,
)

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_NESTING = 500
# A policy at the datapath's limit of 32,767 rules is about 600,000 nodes;
# 16 MiB of `[1,1,1,…` would be 8 million (half a minute and gigabytes).
MAX_NODES = 1_000_000
MAX_ERRORS = 100   # then one line that says how many more
MAX_MESSAGE = 240  # a value echoed in a message is cut in the middle
MAX_NAME = 63
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PORT_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")

TOP_KEYS = ("version", "mode", "default", "discover", "workloads", "rules")
DISCOVER_KEYS = ("docker",)
DOCKER_KEYS = ("socket",)
WORKLOAD_KEYS = ("labels", "addresses", "mode")
RULE_KEYS = ("name", "from", "to", "protocol", "ports", "action")
SELECTOR_KEYS = ("workload", "labels", "cidr")


@dataclass(frozen=True)
class Issue:
    line: int  # 1-based
    col: int   # 1-based
    message: str
    severity: Literal["error", "warning"] = "error"

    def format(self, filename: str) -> str:
        tag = "warning: " if self.severity == "warning" else ""
        return f"{filename}:{self.line}:{self.col}: {tag}{self.message}"


class PolicyError(Exception):
    """The file is not a valid policy; `issues` says every reason."""

    def __init__(self, filename: str, issues: list[Issue], hidden: int = 0) -> None:
        self.filename = filename
        self.issues = sorted(issues, key=lambda i: (i.line, i.col))
        self.hidden = hidden  # errors beyond MAX_ERRORS, summed up in one issue
        super().__init__("\n".join(i.format(filename) for i in issues))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def error_count(self) -> int:
        """Every error found, shown or not (the summary line is none)."""
        return len(self.errors) - (1 if self.hidden else 0) + self.hidden


@dataclass
class LoadedPolicy:
    policy: Policy
    source: str
    sha256: str
    warnings: list[Issue] = field(default_factory=list)
    # The text it was parsed from: what `policy suggest/trace/diff` read
    # from a daemon (GET /v1/policy/source), and what a promote writes.
    data: bytes = field(default=b"", repr=False, compare=False)
    revision: int | None = None  # the etcd revision of a cluster policy


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device",
               stat.S_IFBLK: "a device"}


def open_policy_file(path: str | Path) -> BinaryIO:
    """Open a policy file for reading, if it is a regular file: a FIFO would
    block its reader forever and a device such as /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise OSError(errno.EINVAL, f"{_FILE_KINDS.get(kind, 'a special file')}, "
                                        "not a regular file")
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_policy_file(path: str | Path,
                     parse: Callable[[bytes, str], LoadedPolicy] | None = None) -> LoadedPolicy:
    """Read, size-check and validate a policy file (with `parse`: a
    Reparser's, which parses again only what an edit changed)."""
    name = str(path)
    try:
        with open_policy_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise PolicyError(name, [Issue(1, 1, f"file is {size} bytes, "
                                                     "over the 16 MiB limit")])
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PolicyError(name, [Issue(1, 1, f"cannot read: {e.strerror or e}")]) from None
    return (parse or parse_policy)(data, name)


def parse_policy(data: bytes, filename: str = "<policy>") -> LoadedPolicy:
    """Validate policy text; raise PolicyError with every problem found."""
    return parse_tree(data, filename).loaded


@dataclass
class ParsedTree:
    """A valid policy with what its parse saw, for re-reading an edited
    version of the same file (microseg/policy/reparse.py)."""

    loaded: LoadedPolicy
    text: str
    root: Node
    validator: _Validator
    nodes: int


def parse_tree(data: bytes, filename: str = "<policy>") -> ParsedTree:
    """parse_policy, keeping the node tree and the validator."""
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError(filename, [Issue(1, 1, f"file is {len(data)} bytes, "
                                                 "over the 16 MiB limit")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PolicyError(filename, [Issue(line, col, "not valid UTF-8")]) from None
    depth = nesting_bound(text)
    if depth > MAX_NESTING:
        raise PolicyError(filename, [Issue(1, 1, f"nesting too deep (up to {depth} levels; "
                                                 f"at most {MAX_NESTING})")])
    try:
        # libyaml's parser (ruamel.yaml.clib) when present: 10x faster, and
        # nodes keep their marks; nesting is bounded above, so its recursive
        # composer stays far from the C stack's limit.
        root, nodes = compose(text)
    except _TooManyNodes:
        raise PolicyError(filename, [Issue(1, 1, f"more than {MAX_NODES:,} YAML nodes; "
                                                 "no policy needs that many")]) from None
    except ReaderError as e:  # a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        char = e.character if isinstance(e.character, int) else ord(e.character)
        raise PolicyError(filename, [Issue(line, col, f"YAML syntax error: character "
                                                      f"U+{char:04X} is not allowed")]) from None
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = e.problem or e.context or "invalid YAML"
        if isinstance(e, ComposerError) and e.problem and e.context and e.context_mark:
            # Both halves: "found duplicate anchor; first occurrence" alone
            # would not say where, "second occurrence" alone not what.
            what = f"{e.context} at line {e.context_mark.line + 1}, {e.problem}"
        what = " ".join(what.split())
        raise PolicyError(filename, [Issue(line, col, f"YAML syntax error: {what}")]) from None
    except (YAMLError, ValueError) as e:
        what = " ".join(str(e).split())
        raise PolicyError(filename, [Issue(1, 1, f"YAML error: {what}")]) from None
    except RecursionError:
        raise PolicyError(filename, [Issue(1, 1, "nesting too deep")]) from None
    v = _Validator()
    policy = v.policy(root)
    if v.errors or policy is None:
        if v.hidden:
            v.issues.append(Issue(*v.hidden[0], f"too many errors: {v.hidden[1]} more after "
                                                 f"the first {MAX_ERRORS} not shown"))
        raise PolicyError(filename, v.issues, v.hidden[1] if v.hidden else 0)
    loaded = LoadedPolicy(policy, filename, hashlib.sha256(data).hexdigest(),
                          [i for i in v.issues if i.severity == "warning"], data=data)
    return ParsedTree(loaded, text, root, v, nodes)


class _TooManyNodes(Exception):
    pass


class _TextResolver(BaseResolver):
    """Every scalar stays text: the validator reads each one itself, and
    ruamel's implicit-tag resolution would cost most of the parse time."""

    def __init__(self, version: object = None, loadumper: object = None) -> None:
        super().__init__(loadumper)
        self.nodes = 0
        _composing.resolver = self  # compose() reads the count

    def descend_resolver(self, current_node: object, current_index: object) -> None:
        """The composer calls this once per node (tagged or not, aliases
        excepted): stop before a dense file costs gigabytes."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooManyNodes

    def ascend_resolver(self) -> None:
        pass

    def resolve(self, kind: type, value: object, implicit: object) -> Tag:
        # One shared Tag each: a node built from a string makes its own.
        if kind is ScalarNode:
            return _STR
        return _SEQ if kind is SequenceNode else _MAP


_STR, _SEQ, _MAP = (Tag(suffix=f"tag:yaml.org,2002:{k}") for k in ("str", "seq", "map"))


def _yaml() -> YAML:
    y = YAML(typ="safe", pure=False)
    y.Resolver = _TextResolver
    return y


_composing = threading.local()


def compose(text: str) -> tuple[Node | None, int]:
    """The node tree of a YAML text, and how many nodes it has. Raises
    _TooManyNodes past MAX_NODES, and the YAML errors parse_tree reports."""
    _composing.resolver = None
    root = _yaml().compose(text)
    resolver = _composing.resolver
    return root, resolver.nodes if resolver is not None else 0


_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_bound(text: str) -> int:
    """An upper bound of the YAML nesting depth: the deepest flow bracket
    nesting plus the widest block indentation (spaces and `- ` markers)."""
    steps = map(_BRACKET_STEP.__getitem__, re.findall(r"[\[\]{}]", text))
    # Clamped at 0: closers in a quoted string must not hide what follows.
    flow = max(itertools.accumulate(steps, lambda d, s: d + s if d + s > 0 else 0, initial=0))
    block = max((len(m) for m in re.findall(r"^[ \t-]*", text, re.M)), default=0)
    return flow + block


def _pos(node: Node | None) -> tuple[int, int]:
    if node is None:
        return 1, 1
    return node.start_mark.line + 1, node.start_mark.column + 1


def _clip(message: str) -> str:
    """A message of bounded length: a megabyte-long value is cut in the
    middle, keeping the field path and what was expected."""
    if len(message) <= MAX_MESSAGE:
        return message
    head = MAX_MESSAGE * 2 // 3
    return f"{message[:head]}…{message[head + 1 - MAX_MESSAGE:]}"


_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:seq",
                         "tag:yaml.org,2002:map"})


def _expected(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"expected one of: {', '.join(allowed)}{hint}"


class _Validator:
    def __init__(self) -> None:
        self.issues: list[Issue] = []
        self._seen: set[int] = set()
        self._workload_names: set[str] = set()
        self._label_sets: list[frozenset[tuple[str, str]]] = []
        # (line, col) of each selector naming a workload or labels, its path,
        # the selector: judged once every workload is known.
        self._references: list[tuple[tuple[int, int], str, Selector]] = []
        self._error_count = 0
        self.hidden: tuple[tuple[int, int], int] | None = None  # (first position, count)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def error(self, node: Node | None, message: str) -> None:
        self.error_at(_pos(node), message)

    def error_at(self, pos: tuple[int, int], message: str) -> None:
        self._error_count += 1
        if self._error_count <= MAX_ERRORS:
            self.issues.append(Issue(*pos, _clip(message)))
        else:
            self.hidden = (self.hidden[0] if self.hidden else pos,
                           self._error_count - MAX_ERRORS)

    def warn(self, node: Node | None, message: str) -> None:
        self.warn_at(_pos(node), message)

    def warn_at(self, pos: tuple[int, int], message: str) -> None:
        self.issues.append(Issue(*pos, _clip(message), "warning"))

    # -- generic node access --------------------------------------------------

    def _check_children(self, parent: Node, path: str) -> bool:
        """Each node is checked once, when its parent is opened. Refused: an
        alias, i.e. a node seen before (it is how a tiny file expands into
        billions of values; the first one ends the walk, so a list of
        millions of them costs nothing), and an explicit tag."""
        is_map = isinstance(parent, MappingNode)
        seen = self._seen
        ok = True
        for j, node in enumerate(itertools.chain.from_iterable(parent.value) if is_map
                                 else parent.value):
            if id(node) not in seen and node.ctag.suffix in _PLAIN_TAGS:
                seen.add(id(node))
                continue
            if not is_map:
                where = f"{path}[{j}]"
            elif j % 2 == 0:
                where = path
            else:  # a value: its key's path, as the validator names it
                key = parent.value[j // 2][0].value
                where = str(key) if path == "policy" else f"{path}.{key}"
            if id(node) in seen:
                self.error(node, f"{where}: aliases (*name) are not allowed")
                return False
            seen.add(id(node))
            ok = self._untagged(node, where) and ok
        return ok

    def _untagged(self, node: Node, path: str) -> bool:
        """Refuse an explicit tag (`!!python/object…`, `!custom`): nothing is
        ever constructed from one, and a policy is plain data, so a tag could
        only mean something its writer expected and would not get."""
        tag = node.ctag.suffix  # as written; `node.tag` would URI-decode it, slowly
        if tag in _PLAIN_TAGS:
            return True
        shown = str(tag).replace("tag:yaml.org,2002:", "!!", 1)
        self.error(node, f"{path}: YAML tags ({shown}) are not allowed")
        return False

    def mapping(self, node: Node, path: str, allowed: tuple[str, ...]
                ) -> dict[str, tuple[Node, Node]] | None:
        """key -> (key node, value node); unknown and duplicate keys reported."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{path}: expected a mapping")
            return None
        if not self._check_children(node, path):
            return None
        out: dict[str, tuple[Node, Node]] = {}
        for k, val in node.value:
            if not isinstance(k, ScalarNode):
                self.error(k, f"{path}: keys must be plain names")
                continue
            key = str(k.value)
            if key in out:
                self.error(k, f"{path}: duplicate key '{key}'")
                continue
            if allowed and key not in allowed:
                self.error(k, f"{path}: unknown key '{key}' ({_expected(key, allowed)})")
                continue
            out[key] = (k, val)
        return out

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.error(node, f"{path}: expected a list")
            return None
        if not self._check_children(node, path):
            return None
        return list(node.value)

    def scalar(self, node: Node, path: str, what: str = "a value") -> str | None:
        if not isinstance(node, ScalarNode):
            self.error(node, f"{path}: expected {what}")
            return None
        return str(node.value)

    def choice(self, node: Node, path: str, options: tuple[str, ...]) -> str | None:
        value = self.scalar(node, path, " or ".join(options))
        if value is None:
            return None
        if value not in options:
            self.error(node, f"{path}: '{value}' is not one of {' | '.join(options)}")
            return None
        return value

    def name(self, node: Node, path: str, what: str) -> str | None:
        value = self.scalar(node, path, f"a {what} name")
        if value is None:
            return None
        if not _NAME.match(value) or len(value) > MAX_NAME:
            self.error(node, f"{path}: {what} name '{value}' must be 1-{MAX_NAME} letters, "
                             "digits, '.', '_' or '-', starting with a letter or digit")
            return None
        return value

    # -- the policy -----------------------------------------------------------

    def policy(self, root: Node | None) -> Policy | None:
        if root is None:
            self.error(None, "empty file: expected a policy with 'version: 1'")
            return None
        if not self._untagged(root, "policy"):
            return None
        top = self.mapping(root, "policy", TOP_KEYS)
        if top is None:
            return None
        version = self._version(top, root)
        mode = self.choice(top["mode"][1], "mode", ("enforce", "audit")) \
            if "mode" in top else "enforce"
        default = self.choice(top["default"][1], "default", ("allow", "deny")) \
            if "default" in top else "deny"
        discover = self._discover(top["discover"][1]) if "discover" in top else Discovery()
        workloads = self._workloads(top["workloads"][1]) if "workloads" in top else []
        rules = self._rules(top["rules"][1]) if "rules" in top else []
        self._check_references(discover)
        if version is None or mode is None or default is None or self.errors:
            return None
        return Policy(default=default, mode=mode, workloads=tuple(workloads),  # type: ignore[arg-type]
                      rules=tuple(rules), version=version, discover=discover)

    def _discover(self, node: Node) -> Discovery:
        """`discover: {docker: {socket: PATH}}`; the socket is optional."""
        fields = self.mapping(node, "discover", DISCOVER_KEYS)
        if not fields:
            if fields is not None:
                self.error(node, "discover: empty; expected docker: {socket: PATH}")
            return Discovery()
        vnode = fields["docker"][1]
        if isinstance(vnode, ScalarNode) and vnode.value in ("", None, "~", "null"):
            return Discovery(DEFAULT_DOCKER_SOCKET)  # `docker:` alone: the default socket
        docker = self.mapping(vnode, "discover.docker", DOCKER_KEYS)
        if docker is None:
            return Discovery()
        if "socket" not in docker:
            return Discovery(DEFAULT_DOCKER_SOCKET)
        snode = docker["socket"][1]
        path = self.scalar(snode, "discover.docker.socket", "the engine's socket path")
        if path is None:
            return Discovery()
        if not path.startswith("/") or "\0" in path:
            self.error(snode, f"discover.docker.socket: '{path}' is not an absolute path "
                              "(e.g. /var/run/docker.sock)")
            return Discovery()
        return Discovery(os.path.normpath(path))

    def _version(self, top: dict[str, tuple[Node, Node]], root: Node) -> int | None:
        if "version" not in top:
            self.error(root, "version: missing (expected 'version: 1')")
            return None
        node = top["version"][1]
        # A plain 1: libyaml reports a plain scalar's style as '' (None in
        # ruamel's own parser); "1" in quotes is a string, not a version.
        if not (isinstance(node, ScalarNode) and not node.style
                and str(node.value).strip() == "1"):
            self.error(node, f"version: unsupported version '{getattr(node, 'value', '?')}' "
                             "(expected 1)")
            return None
        return 1

    # -- workloads ------------------------------------------------------------

    def _workloads(self, node: Node) -> list[Workload]:
        entries = self.mapping(node, "workloads", ())
        if entries is None:
            return []
        out: list[Workload] = []
        owner_of: dict[IPNetwork, str] = {}
        for key, (knode, vnode) in entries.items():
            path = f"workloads.{key}"
            name = self.name(knode, path, "workload")
            if name is None:
                continue
            self._workload_names.add(name)
            w = self._workload(name, vnode, path, owner_of)
            if w is not None:
                out.append(w)
                self._label_sets.append(frozenset(w.labels))
        return out

    def _workload(self, name: str, node: Node, path: str,
                  owner_of: dict[IPNetwork, str]) -> Workload | None:
        fields = self.mapping(node, path, WORKLOAD_KEYS)
        if fields is None:
            return None
        labels = self._labels(fields["labels"][1], f"{path}.labels") if "labels" in fields else {}
        mode = None
        if "mode" in fields:
            mode = self.choice(fields["mode"][1], f"{path}.mode", ("enforce", "audit"))
        addresses: list[IPNetwork] = []
        if "addresses" not in fields:
            self.error(node, f"{path}: missing 'addresses' (a list of IPs or CIDRs)")
        else:
            items = self.sequence(fields["addresses"][1], f"{path}.addresses")
            if items is not None and not items:
                self.error(fields["addresses"][1], f"{path}.addresses: empty; expected at least "
                                                   "one IP or CIDR")
            for i, item in enumerate(items or []):
                net = self._network(item, f"{path}.addresses[{i}]")
                if net is None:
                    continue
                if net in owner_of:
                    self.error(item, f"{path}.addresses[{i}]: {net} already belongs to workload "
                                     f"'{owner_of[net]}'")
                    continue
                owner_of[net] = name
                addresses.append(net)
        if labels is None or (mode is None and "mode" in fields) or not addresses:
            return None
        return Workload(name, tuple(addresses), tuple(sorted(labels.items())), mode)  # type: ignore[arg-type]

    def _labels(self, node: Node, path: str) -> dict[str, str] | None:
        fields = self.mapping(node, path, ())
        if fields is None:
            return None
        out: dict[str, str] = {}
        for key, (_k, vnode) in fields.items():
            value = self.scalar(vnode, f"{path}.{key}", "a label value")
            if value is not None:
                out[key] = value
        return out

    def _network(self, node: Node, path: str) -> IPNetwork | None:
        text = self.scalar(node, path, "an IP address or CIDR")
        if text is None:
            return None
        try:
            return ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as e:
            try:
                fixed = ipaddress.ip_network(text.strip(), strict=False)
                self.error(node, f"{path}: '{text}' has host bits set; did you mean {fixed}?")
            except ValueError:
                self.error(node, f"{path}: '{text}' is not an IP address or CIDR ({e})")
            return None

    # -- rules ----------------------------------------------------------------

    def _rules(self, node: Node) -> list[Rule]:
        items = self.sequence(node, "rules")
        if items is None:
            return []
        if len(items) >= abi.MAX_RULES:
            self.error(node, f"rules: {len(items)} rules, at most {abi.MAX_RULES - 1}")
            return []
        out: list[Rule] = []
        names: dict[str, int] = {}
        for i, item in enumerate(items):
            rule = self._rule(item, f"rules[{i}]", names)
            if rule is not None:
                out.append(rule)
        return out

    def _rule(self, node: Node, path: str, names: dict[str, int]) -> Rule | None:
        fields = self.mapping(node, path, RULE_KEYS)
        if fields is None:
            return None
        ok = True
        name = None
        if "name" not in fields:
            self.error(node, f"{path}: missing 'name'")
            ok = False
        else:
            name = self.name(fields["name"][1], f"{path}.name", "rule")
            if name is not None:
                path = f"{path} ({name})"
                if name in names:
                    self.error(fields["name"][1], f"{path}: duplicate rule name '{name}' "
                                                  f"(first at line {names[name]})")
                    ok = False
                else:
                    names[name] = _pos(fields["name"][1])[0]
            else:
                ok = False
        sides = []
        for key in ("from", "to"):
            if key not in fields:
                self.error(node, f"{path}: missing '{key}' (any, or selectors)")
                ok = False
                continue
            sels = self._selectors(fields[key][1], f"{path}.{key}")
            ok &= sels is not None
            sides.append(sels)
        action = None
        if "action" not in fields:
            self.error(node, f"{path}: missing 'action' (allow or deny)")
            ok = False
        else:
            action = self.choice(fields["action"][1], f"{path}.action", ("allow", "deny"))
            ok &= action is not None
        protocol = "any"
        if "protocol" in fields:
            protocol = self.choice(fields["protocol"][1], f"{path}.protocol",
                                   ("tcp", "udp", "icmp", "icmpv6", "any"))
            ok &= protocol is not None
        ports: list[tuple[int, int]] = []
        if "ports" in fields:
            pnode = fields["ports"][1]
            if protocol not in ("tcp", "udp"):
                self.error(pnode, f"{path}.ports: ports need protocol tcp or udp "
                                  f"(protocol is {protocol or 'invalid'})")
                ok = False
            parsed = self._ports(pnode, f"{path}.ports")
            ok &= parsed is not None
            ports = parsed or []
        if not ok or name is None or action is None or len(sides) != 2:
            return None
        return Rule(name, sides[0], sides[1], action,  # type: ignore[arg-type]
                    None if protocol in (None, "any") else PROTOCOLS[protocol], tuple(ports))

    def _ports(self, node: Node, path: str) -> list[tuple[int, int]] | None:
        items = self.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.error(node, f"{path}: empty; omit 'ports' for all ports")
            return None
        out = []
        ok = True
        for i, item in enumerate(items):
            text = self.scalar(item, f"{path}[{i}]", "a port or range like 8000-8100")
            if text is None:
                ok = False
                continue
            m = _PORT_RANGE.match(text)
            try:
                lo, hi = (int(m.group(1)), int(m.group(2))) if m else (int(text, 10),) * 2
            except ValueError:
                self.error(item, f"{path}[{i}]: '{text}' is not a port (1-65535) or a range "
                                 "like 8000-8100")
                ok = False
                continue
            if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
                self.error(item, f"{path}[{i}]: {text} is outside 1-65535")
                ok = False
            elif lo > hi:
                self.error(item, f"{path}[{i}]: range {text} is reversed (expected {hi}-{lo})")
                ok = False
            else:
                out.append((lo, hi))
        return out if ok else None

    def _selectors(self, node: Node, path: str) -> tuple[Selector, ...] | None:
        if isinstance(node, SequenceNode):
            items = self.sequence(node, path)
            if items is None:
                return None
            if not items:
                self.error(node, f"{path}: empty list; expected any or selectors")
                return None
            sels = [self._selector(item, f"{path}[{i}]") for i, item in enumerate(items)]
            if any(s is None for s in sels):
                return None
            return tuple(s for s in sels if s is not None)
        s = self._selector(node, path)
        return None if s is None else (s,)

    def _selector(self, node: Node, path: str) -> Selector | None:
        if isinstance(node, ScalarNode):
            if str(node.value) == "any":
                return Selector.any()
            self.error(node, f"{path}: '{node.value}' is not a selector (expected any, "
                             "{workload: NAME}, {labels: {k: v}} or {cidr: PREFIX})")
            return None
        fields = self.mapping(node, path, SELECTOR_KEYS)
        if fields is None:
            return None
        if len(fields) != 1:
            self.error(node, f"{path}: a selector has exactly one of workload, labels, cidr "
                             f"(got {', '.join(fields) or 'none'})")
            return None
        (kind, (_k, vnode)), = fields.items()
        where = f"{path}.{kind}"
        if kind == "workload":
            name = self.scalar(vnode, where, "a workload name")
            if name is None:
                return None
            self._references.append((_pos(vnode), where, Selector.of_workload(name)))
            return self._references[-1][2]
        if kind == "labels":
            labels = self._labels(vnode, where)
            if labels is None:
                return None
            self._references.append((_pos(vnode), where, Selector.of_labels(labels)))
            return self._references[-1][2]
        net = self._network(vnode, where)
        return None if net is None else Selector("cidr", cidr=net)

    def _check_references(self, discover: Discovery) -> None:
        """Workload references and label matches, once every workload is
        known (rules may come before workloads in a file)."""
        check = ReferenceCheck(self._workload_names, self._label_sets, discover)
        for pos, path, sel in self._references:
            if not check.fine(sel):
                severity, message = check.issue(path, sel)
                if severity == "error":
                    self.error_at(pos, message)
                else:
                    self.warn_at(pos, message)


class ReferenceCheck:
    """Whether a rule's selector names what the policy has. With discovery,
    a name or labels no static workload has may be a container's: said, not
    refused."""

    def __init__(self, workload_names: set[str], label_sets: list[frozenset[tuple[str, str]]],
                 discover: Discovery) -> None:
        self.names = workload_names
        self.label_sets = label_sets
        self.discovering = bool(discover.sources)
        self._labels_fine: dict[tuple[tuple[str, str], ...], bool] = {}

    def fine(self, sel: Selector) -> bool:
        if sel.kind == "workload":
            return sel.workload in self.names
        if self.discovering or sel.kind != "labels":
            return True  # labels: containers carry their own
        ok = self._labels_fine.get(sel.labels)
        if ok is None:
            want = set(sel.labels)
            ok = self._labels_fine[sel.labels] = any(want <= ls for ls in self.label_sets)
        return ok

    def issue(self, path: str, sel: Selector) -> tuple[str, str]:
        """(severity, message) of a selector that is not fine."""
        if sel.kind == "workload":
            close = difflib.get_close_matches(sel.workload or "", self.names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            if self.discovering:
                return "warning", (f"{path}: no static workload '{sel.workload}'{hint}; it "
                                   "matches once a discovered container of that name runs")
            return "error", f"{path}: undefined workload '{sel.workload}'{hint}"
        shown = ", ".join(f"{k}={v}" for k, v in sel.labels) or "{}"
        return "warning", f"{path}: no workload has labels {shown}"
