"""Re-reading an edited policy file (microseg/policy/reparse.py) gives what
a full parse gives — the same policy and warnings, or the same errors at
the same FILE:LINE:COL — over random edits, valid or not; a rule edit is
read without parsing the rest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.policy.parse import PolicyError, parse_policy
from microseg.policy.reparse import Reparser

FILE = "policy.yaml"

HEAD = """version: 1
default: deny
# the estate
workloads:
  web: {addresses: [10.0.0.1], labels: {tier: web}}
  db:
    addresses: ["10.0.0.2", "fd00::2"]
    labels: {tier: db}
  cache: {addresses: [10.0.0.3, 10.0.1.0/24]}
"""
HEAD_DISCOVER = HEAD.replace("default: deny\n", "default: deny\ndiscover:\n  docker:\n")
HEAD_ALLOW = HEAD.replace("default: deny", "default: allow")
TAILS = ("", "mode: enforce\n", "# trailing comment\n", "mode: audit\n\n")

NAMES = ("web", "db", "cache", "ghost")


def _rule(i: int, variant: int, src: str = "web", dst: str = "db", port: int = 80) -> str:
    if variant == 0:
        return (f"  - name: r{i}\n    from: {{workload: {src}}}\n    to: {{workload: {dst}}}\n"
                f"    protocol: tcp\n    ports: [{port}]\n    action: allow\n")
    if variant == 1:
        return (f"  - name: r{i}  # a comment\n    from: [{{workload: {src}}}, "
                f"{{labels: {{tier: web}}}}]\n    to: any\n    action: deny\n\n")
    if variant == 2:
        return (f"  -\n    name: r{i}\n    from:\n      - cidr: 10.0.0.0/24\n    to:\n"
                f"      - workload: {dst}\n    protocol: udp\n    ports:\n      - {port}\n"
                f"      - \"{port + 1}-{port + 9}\"\n    action: allow\n")
    return (f"  - {{name: r{i}, from: {{workload: {src}}}, to: any, protocol: icmp, "
            f"action: allow}}\n")


BAD = (
    "  - name: bad\n    from: any\n    to: any\n    ports: [80]\n    action: allow\n",
    "  - name: undef\n    from: {workload: nope}\n    to: any\n    action: allow\n",
    "  - name: typo\n    frm: any\n    to: any\n    action: allow\n",
    "  - name: [unclosed\n",
    "  - &a\n    name: anchored\n    from: any\n    to: any\n    action: allow\n",
    "  - name: tabbed\n\tfrom: any\n",
    "  - name: aliased\n    from: *a\n    to: any\n    action: allow\n",
    "  - name: r0\n    from: any\n    to: any\n    action: allow\n",
    "    stray: indent\n",
    "oops: 1\n",
    "  - name: nolabel\n    from: {labels: {tier: nope}}\n    to: any\n    action: allow\n",
    "  - name: brackets\n    from: {labels: {tier: \"[[[\"}}\n    to: any\n    action: allow\n",
    "  - name: closers\n    from: {labels: {tier: \"]]}\"}}\n    to: any\n    action: allow\n",
    "  - name: port\n    from: any\n    to: any\n    protocol: tcp\n    ports: [70000]\n"
    "    action: allow\n",
    "  - name: crlf\r\n    from: any\r\n    to: any\r\n    action: allow\r\n",
    "---\n",
    "  - !!str name: tagged\n",
    "  - name: \"multi\n  - line\"\n    from: any\n    to: any\n    action: allow\n",
)


def _outcome(parse, data: bytes) -> tuple:
    try:
        loaded = parse(data, FILE)
    except PolicyError as e:
        return ("error", str(e), e.issues, e.hidden)
    return ("ok", loaded.policy, loaded.warnings, loaded.sha256, loaded.data)


@st.composite
def versions(draw: st.DrawFn) -> list[bytes]:
    items = [_rule(i, draw(st.integers(0, 3)), draw(st.sampled_from(NAMES[:3])),
                   draw(st.sampled_from(NAMES[:3]))) for i in range(draw(st.integers(1, 12)))]
    head, tail = HEAD, draw(st.sampled_from(TAILS))
    out = []
    serial = 100
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["change", "change", "insert", "delete", "bad", "bad",
                                   "comment", "head", "tail", "append", "same"]))
        serial += 1
        new = _rule(serial, draw(st.integers(0, 3)), draw(st.sampled_from(NAMES)),
                    draw(st.sampled_from(NAMES)), draw(st.integers(1, 60000)))
        i = draw(st.integers(0, len(items)))
        if op == "change" and items:
            items[min(i, len(items) - 1)] = new
        elif op == "insert":
            items.insert(i, new)
        elif op == "append":
            items.append(new)
        elif op == "delete" and len(items) > 1:
            del items[min(i, len(items) - 1)]
        elif op == "bad":
            items.insert(i, draw(st.sampled_from(BAD)))
        elif op == "comment" and items:
            j = min(i, len(items) - 1)
            items[j] = items[j] + "    # note\n"
        elif op == "head":
            head = draw(st.sampled_from((HEAD, HEAD_DISCOVER, HEAD_ALLOW)))
        elif op == "tail":
            tail = draw(st.sampled_from(TAILS))
        out.append((head + "rules:\n" + "".join(items) + tail).encode())
        if draw(st.integers(0, 4)) == 0:  # a fix: drop what went bad
            items = [t for t in items if t not in BAD]
    return out


@settings(max_examples=300, deadline=None)
@given(versions())
def test_reading_edits_gives_what_a_full_parse_gives(texts: list[bytes]) -> None:
    reader = Reparser()
    for data in texts:
        assert _outcome(reader.parse, data) == _outcome(parse_policy, data)


def _file(n: int, head: str = HEAD) -> list[str]:
    return [_rule(i, i % 4, NAMES[i % 3], NAMES[(i + 1) % 3], 1000 + i) for i in range(n)]


def _text(items: list[str], head: str = HEAD, tail: str = "") -> bytes:
    return (head + "rules:\n" + "".join(items) + tail).encode()


def test_a_rule_edit_reparses_only_that_rule() -> None:
    items = _file(200)
    reader = Reparser()
    first = reader.parse(_text(items), FILE)
    edits = [[*items[:57], _rule(999, 0, "db", "web", 8443), *items[58:]]]
    edits.append(edits[-1][:3] + edits[-1][4:])    # one deleted
    edits.append(edits[-1] + [_rule(1000, 2)])     # one appended
    for version in edits:
        data = _text(version)
        got = reader.parse(data, FILE)
        assert _outcome(lambda d, f, got=got: got, data) == _outcome(parse_policy, data)
    assert reader.shortcuts == 3
    # Untouched rules are the same objects: the compiler sees what changed.
    assert got.policy.rules[0] is first.policy.rules[0]
    assert got.policy.rules[150] is first.policy.rules[151]
    assert got.policy.workloads is first.policy.workloads


def test_warnings_follow_their_rules_to_new_lines() -> None:
    items = _file(20)
    items[5] = _rule(500, 0, "ghost", "web")  # a container's name, with discovery
    reader = Reparser()
    data = _text(items, HEAD_DISCOVER)
    assert _outcome(reader.parse, data) == _outcome(parse_policy, data)
    items.insert(2, _rule(600, 2, "db", "ghost"))
    data = _text(items, HEAD_DISCOVER)
    got = reader.parse(data, FILE)
    assert reader.shortcuts == 1
    assert [w.format(FILE) for w in got.warnings] == \
        [w.format(FILE) for w in parse_policy(data, FILE).warnings]
    assert len(got.warnings) == 2


@pytest.mark.parametrize("bad", BAD)
def test_an_edit_that_breaks_the_file_reports_what_a_full_parse_reports(bad: str) -> None:
    items = _file(30)
    reader = Reparser()
    before = reader.parse(_text(items), FILE)
    broken = _text([*items[:10], bad, *items[10:]])
    outcome = _outcome(reader.parse, broken)
    assert outcome == _outcome(parse_policy, broken)
    if outcome[0] == "ok":  # not broken after all (an anchor alone, CRLF): read in full
        before = reader.parse(broken, FILE)
        items = [*items[:10], bad, *items[10:]]
    # The file mended: read against the last good version as before.
    items[4] = _rule(4, 1)
    mended = _text(items)
    got = reader.parse(mended, FILE)
    assert _outcome(lambda d, f: got, mended) == _outcome(parse_policy, mended)
    if b"\r" not in mended:  # LF line breaks only: read as an edit
        assert got.policy.rules[-1] is before.policy.rules[-1]


def test_edits_outside_the_rules_parse_the_whole_file() -> None:
    items = _file(10)
    reader = Reparser()
    reader.parse(_text(items), FILE)
    for data in (_text(items, HEAD_DISCOVER), _text(items, HEAD_DISCOVER, "mode: audit\n"),
                 _text(items[:3], HEAD.replace("web: {", "www: {"))):
        assert _outcome(reader.parse, data) == _outcome(parse_policy, data)
    assert reader.shortcuts == 0


def test_a_changed_mode_or_default_line_is_read_alone() -> None:
    items = _file(10)
    reader = Reparser()
    first = reader.parse(_text(items, HEAD, "mode: enforce\n"), FILE)
    for data in (_text(items, HEAD_ALLOW, "mode: enforce\n"),
                 _text(items, HEAD_ALLOW, "mode: audit\n"),
                 _text(items, HEAD, "mode: audit\n")):
        got = reader.parse(data, FILE)
        assert _outcome(lambda d, f, got=got: got, data) == _outcome(parse_policy, data)
        assert got.policy.rules is first.policy.rules
    assert reader.shortcuts == 3
    # Not one of its words, or not a plain word: the whole file, its errors.
    for data in (_text(items, HEAD.replace("default: deny", "default: maybe")),
                 _text(items, HEAD.replace("default: deny", "default: 'allow'")),
                 _text(items, HEAD.replace("default: deny", "mode: audit"))):
        assert _outcome(reader.parse, data) == _outcome(parse_policy, data)
    assert reader.shortcuts == 3


def test_brackets_left_open_in_quotes_count_for_the_rules_after() -> None:
    """parse.nesting_bound counts brackets inside quotes too: an edit that
    leaves 300 open before a rule that opens 300 more makes the file too
    deep, though neither rule alone is."""
    deep = ("  - name: deep\n    from: {labels: {tier: \"" + "[" * 300 + "\"}}\n"
            "    to: any\n    action: allow\n")
    items = [*_file(10), deep]
    reader = Reparser()
    reader.parse(_text(items), FILE)
    items[3] = deep.replace("deep", "deeper")
    data = _text(items)
    outcome = _outcome(reader.parse, data)
    assert outcome == _outcome(parse_policy, data)
    assert outcome[0] == "error" and "nesting too deep" in outcome[1]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_common_prefix_and_suffix(a: bytes, b: bytes) -> None:
    """The byte comparison that finds the changed lines, blockwise (small
    blocks here), against the obvious loop."""
    from microseg.policy import reparse

    old = reparse._BLOCK
    reparse._BLOCK = 8
    try:
        pre = reparse._common_prefix(a, b)
        post = reparse._common_suffix(a, b, min(len(a), len(b)) - pre)
    finally:
        reparse._BLOCK = old
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert pre == n
    m = 0
    while m < min(len(a), len(b)) - pre and a[-1 - m] == b[-1 - m]:
        m += 1
    assert post == m
    assert reparse._common_prefix(a, a) == len(a)


def test_removing_an_anchor_that_an_unchanged_rule_aliases_is_an_error() -> None:
    # Rule 2 defines an anchor, rule 6 (outside the edit) uses it: the edit
    # of rule 2 alone no longer defines it, so the file does not parse.
    items = [_rule(i, 0) for i in range(8)]
    items[2] = ("  - name: r2\n    from: &src {workload: web}\n    to: {workload: db}\n"
                "    action: allow\n")
    items[6] = "  - name: r6\n    from: *src\n    to: any\n    action: deny\n"
    reader = Reparser()
    data = (HEAD + "rules:\n" + "".join(items)).encode()
    assert _outcome(reader.parse, data) == _outcome(parse_policy, data)
    items[2] = "  - name: r2\n    from: {workload: web}\n    to: {workload: db}\n" \
               "    action: allow\n"
    edited = (HEAD + "rules:\n" + "".join(items)).encode()
    full = _outcome(parse_policy, edited)
    assert full[0] == "error"
    assert _outcome(reader.parse, edited) == full
