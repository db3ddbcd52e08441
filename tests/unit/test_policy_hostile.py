"""The policy loader against hostile input (issue 9): deep nesting, files at
the 16 MiB limit, bad encodings, alias bombs, dense files, huge numbers and
strings, duplicate keys, YAML tags, files that are not files. Every one is a
PolicyError — one clear ``FILE:LINE:COL: message`` line per issue, never
another exception — within a bounded time; the ones that could exhaust a
machine run in a child with a time and an address-space limit.

The basics (random bytes, mutated policies, `[` nesting, one billion-laughs
file in process) are in test_policy_parse.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.policy.parse import (
    MAX_ERRORS,
    MAX_FILE_BYTES,
    MAX_MESSAGE,
    MAX_NESTING,
    MAX_NODES,
    RULE_KEYS,
    SELECTOR_KEYS,
    TOP_KEYS,
    WORKLOAD_KEYS,
    PolicyError,
    load_policy_file,
    parse_policy,
)

REPO = Path(__file__).resolve().parents[2]
ISSUE_LINE = re.compile(r"^p\.yaml:\d+:\d+: \S[^\n]*$")
BOUND_S = 5  # a sanity bound against a hang, not a benchmark


def refused(data: bytes | str) -> list[str]:
    """The error lines for a policy text that must be refused: each one
    FILE:LINE:COL: message, of bounded length, found within BOUND_S."""
    raw = data.encode() if isinstance(data, str) else data
    t0 = time.perf_counter()
    with pytest.raises(PolicyError) as e:
        parse_policy(raw, "p.yaml")
    assert time.perf_counter() - t0 < BOUND_S
    lines = [i.format("p.yaml") for i in e.value.issues]
    assert lines and all(ISSUE_LINE.match(x) for x in lines), lines
    assert all(len(i.message) <= MAX_MESSAGE for i in e.value.issues)
    return lines


def refused_one(data: bytes | str) -> str:
    lines = [x for x in refused(data) if ": warning:" not in x]
    assert len(lines) == 1, lines
    return lines[0]


# A child that loads one file with its address space capped, and prints the
# error; exit 0 only for a PolicyError (a crash, MemoryError or an accepted
# file exit non-zero).
CHILD = textwrap.dedent("""\
    import resource, sys
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from microseg.policy.parse import PolicyError, load_policy_file
    try:
        load_policy_file(sys.argv[1])
    except PolicyError as e:
        print(e)
        sys.exit(0)
    sys.exit("accepted")
    """)


def refused_confined(path: Path, *, seconds: float = 60,
                     memory: int = 512 * 1024 * 1024) -> list[str]:
    """Load `path` in a child killed after `seconds`, that cannot map more
    than `memory` bytes; return its error lines (named p.yaml)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(memory)],
                       capture_output=True, text=True, timeout=seconds, cwd=REPO)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.replace(str(path), "p.yaml").splitlines()
    assert lines and all(ISSUE_LINE.match(x) for x in lines), lines[:5]
    assert time.monotonic() - t0 < seconds
    return lines


class TestNesting:
    @pytest.mark.parametrize("text", [
        "version: 1\nrules: " + "{a: " * 100_000 + "}" * 100_000 + "\n",
        "version: 1\nrules: " + "[{a: " * 50_000 + "}]" * 50_000 + "\n",
        "version: 1\nworkloads:\n" + "".join(" " * i + "a:\n" for i in range(1, 1000)),
        "version: 1\nrules: " + "[" * 100_000 + "\n",  # never closed
    ], ids=["flow-mappings", "mixed", "block-mappings", "unclosed"])
    def test_deep_nesting_is_refused_before_parsing(self, text: str) -> None:
        """Nesting the recursive composer could not survive is refused by
        the pre-scan, whatever the brackets or indentation."""
        err = refused_one(text)
        assert err.startswith("p.yaml:1:1: nesting too deep (up to ")
        assert err.endswith(f"at most {MAX_NESTING})")

    def test_nesting_under_the_limit_reaches_the_validator(self) -> None:
        """The limit leaves the parser room: 490 levels give an ordinary
        validation error, not a crash."""
        depth = MAX_NESTING - 10
        err = refused_one("version: 1\nrules: " + "[" * depth + "]" * depth + "\n")
        assert err == "p.yaml:2:9: rules[0]: expected a mapping"

    def test_nesting_over_16_mib_runs_in_bounded_memory(self, tmp_path: Path) -> None:
        """16 MiB of `[` is refused by the pre-scan, in a child capped at
        512 MiB of address space."""
        f = tmp_path / "p.yaml"
        f.write_text("version: 1\nrules: " + "[" * (MAX_FILE_BYTES - 20))
        [err] = refused_confined(f)
        assert err.startswith("p.yaml:1:1: nesting too deep")


class TestSize:
    def test_a_file_of_exactly_16_mib_loads(self, tmp_path: Path) -> None:
        """The limit is inclusive: a valid policy padded to 16 MiB exactly
        loads (the padding is a comment), and soon."""
        head = b"version: 1\ndefault: allow\n#"
        f = tmp_path / "p.yaml"
        f.write_bytes(head + b"x" * (MAX_FILE_BYTES - len(head) - 1) + b"\n")
        assert f.stat().st_size == MAX_FILE_BYTES
        t0 = time.perf_counter()
        assert load_policy_file(f).policy.default == "allow"
        assert time.perf_counter() - t0 < BOUND_S

    def test_one_byte_over_16_mib_is_refused_unread(self, tmp_path: Path) -> None:
        """Refused on its size, before a byte of it is parsed."""
        f = tmp_path / "p.yaml"
        f.write_bytes(b"version: 1\n" + b"#" * (MAX_FILE_BYTES - 11) + b"\n")
        assert f.stat().st_size == MAX_FILE_BYTES + 1
        with pytest.raises(PolicyError) as e:
            load_policy_file(f)
        assert str(e.value) == f"{f}:1:1: file is {MAX_FILE_BYTES + 1} bytes, over the 16 MiB limit"
        # The same bytes handed over directly (policy apply) are refused too.
        assert refused_one(f.read_bytes()).endswith("over the 16 MiB limit")

    def test_a_dense_16_mib_file_is_refused_in_bounded_memory(self, tmp_path: Path) -> None:
        """8 million nodes in 16 MiB would take gigabytes to compose: the
        node count is capped, so the child stays under 512 MiB."""
        f = tmp_path / "p.yaml"
        f.write_text("version: 1\nrules: [" + "1," * ((MAX_FILE_BYTES - 30) // 2) + "1]\n")
        assert f.stat().st_size <= MAX_FILE_BYTES
        assert refused_confined(f) == [
            f"p.yaml:1:1: more than {MAX_NODES:,} YAML nodes; no policy needs that many"]


class TestEncoding:
    @pytest.mark.parametrize(("data", "expected"), [
        ("version: 1\n".encode("utf-16"), "p.yaml:1:1: not valid UTF-8"),  # with its BOM
        ("version: 1\n".encode("utf-32"), "p.yaml:1:1: not valid UTF-8"),
        ("version: 1\n".encode("utf-16-be"),
         "p.yaml:1:1: YAML syntax error: character U+0000 is not allowed"),
        (b"version: 1\nmode: enf\x00orce\n",
         "p.yaml:2:10: YAML syntax error: character U+0000 is not allowed"),
        (b"version: 1\x00", "p.yaml:1:11: YAML syntax error: character U+0000 is not allowed"),
        (b"version: 1\nmode: \xed\xa0\x80\n", "p.yaml:2:7: not valid UTF-8"),  # a surrogate
        (b"version: 1\nmode: \xc0\xaf\n", "p.yaml:2:7: not valid UTF-8"),      # overlong '/'
        (b"version: 1\nmode: \xe2\x82", "p.yaml:2:7: not valid UTF-8"),        # cut short
        ("version: 1\nmode: \x9b\n".encode(),
         "p.yaml:2:7: YAML syntax error: character U+009B is not allowed"),
    ], ids=["utf16-bom", "utf32-bom", "utf16-no-bom", "nul", "nul-at-end", "surrogate",
            "overlong", "truncated", "c1-control"])
    def test_bad_encodings_are_located(self, data: bytes, expected: str) -> None:
        assert refused_one(data) == expected

    def test_a_utf8_bom_is_fine(self) -> None:
        assert parse_policy("\ufeffversion: 1\n".encode()).policy.version == 1


def laughs(kind: str, levels: int = 12) -> str:
    """A billion-laughs file: each level refers to the one below 9 times."""
    if kind == "sequences":  # the classic, where the rules are
        lines = ["x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]"
                  for i in range(1, levels)]
        return ("version: 1\nanchors:\n" + "".join(f"  {x}\n" for x in lines)
                + f"rules: *x{levels - 1}\n")
    if kind == "merge-keys":  # mappings merged into mappings
        lines = ["x0: &x0 {addresses: [10.0.0.1]}"]
        lines += [f"x{i}: &x{i} {{<<: [" + ", ".join([f"*x{i - 1}"] * 9) + "]}"
                  for i in range(1, levels)]
        return "version: 1\nworkloads:\n" + "".join(f"  {x}\n" for x in lines)
    # A scalar aliased millions of times: linear, but 16 MiB of it.
    n = (MAX_FILE_BYTES - 200) // len("*any, ")
    return ("version: 1\nrules:\n  - name: a\n    to: &any any\n    action: allow\n"
            "    from: [" + "*any, " * n + "*any]\n")


class TestAliases:
    # An alias is the very node it names: the position is the anchor's.
    @pytest.mark.parametrize(("kind", "expected"), [
        ("sequences", "p.yaml:13:8: rules[1]: aliases (*name) are not allowed"),
        ("merge-keys", "p.yaml:4:12: workloads.x1: unknown key '<<' (expected one of: labels, "
                       "addresses, mode)"),
        ("scalar-flood", "p.yaml:4:9: rules[0] (a).from[0]: aliases (*name) are not allowed"),
    ])
    def test_billion_laughs_is_refused_in_bounded_time_and_memory(
            self, tmp_path: Path, kind: str, expected: str) -> None:
        """Expanding any of these would take terabytes, or (the flood of
        one alias) minutes and gigabytes: the loader refuses the first alias
        it walks into and merges nothing, in a child that is killed after
        60 s and cannot map more than 512 MiB."""
        f = tmp_path / "p.yaml"
        f.write_text(laughs(kind))
        assert f.stat().st_size <= MAX_FILE_BYTES
        lines = refused_confined(f)
        assert expected in lines, lines

    def test_merge_keys_are_unknown_keys(self) -> None:
        """`<<` merges nothing: it is a key like any other, and not one a
        workload has."""
        err = refused("version: 1\nworkloads:\n  web:\n    <<: {addresses: [10.0.0.1]}\n")
        assert err[0].startswith("p.yaml:4:5: workloads.web: unknown key '<<'")

    def test_an_anchor_without_alias_changes_nothing(self) -> None:
        p = parse_policy(b"version: 1\nworkloads: &w {web: {addresses: [10.0.0.1]}}\n").policy
        assert [w.name for w in p.workloads] == ["web"]


class TestTags:
    @pytest.mark.parametrize(("text", "expected"), [
        ("mode: !!python/object/apply:os.system ['touch {marker}']",
         "p.yaml:2:7: mode: YAML tags (!!python/object/apply:os.system) are not allowed"),
        ("mode: !!python/object/apply:os.system enforce",
         "p.yaml:2:7: mode: YAML tags (!!python/object/apply:os.system) are not allowed"),
        ("rules: [!!python/object/new:os.system {{args: ['touch {marker}']}}]",
         "p.yaml:2:9: rules[0]: YAML tags (!!python/object/new:os.system) are not allowed"),
        ("? !!python/name:os.system\n: x",
         "p.yaml:2:3: policy: YAML tags (!!python/name:os.system) are not allowed"),
        ("workloads: !include other.yaml",
         "p.yaml:2:12: workloads: YAML tags (!include) are not allowed"),
        ("default: !<tag:yaml.org,2002:python/name:os.system> allow",
         "p.yaml:2:10: default: YAML tags (!!python/name:os.system) are not allowed"),
        ("default: !!bool allow", "p.yaml:2:10: default: YAML tags (!!bool) are not allowed"),
    ], ids=["python-apply", "python-on-a-valid-value", "python-new", "python-key",
            "custom", "verbatim", "core-bool"])
    def test_tags_are_refused_and_never_run(self, tmp_path: Path, text: str,
                                            expected: str) -> None:
        """A tag is never constructed (so `!!python/…` runs nothing) and
        never silently dropped either: the value would not be what its
        writer meant."""
        marker = tmp_path / "ran"
        assert refused_one("version: 1\n" + text.format(marker=marker) + "\n") == expected
        assert not marker.exists()

    def test_a_tagged_root_is_refused(self) -> None:
        assert refused_one("!!python/object:os.Foo {version: 1}\n") == \
            "p.yaml:1:1: policy: YAML tags (!!python/object:os.Foo) are not allowed"


class TestValues:
    @pytest.mark.parametrize(("port", "expected"), [
        ("9" * 5000, "is not a port (1-65535)"),  # past Python's int() digit limit
        ("9" * 30, "is outside 1-65535"),
        ('"1-' + "9" * 30 + '"', "is outside 1-65535"),
        ("-1", "is outside 1-65535"),
        ("65536", "is outside 1-65535"),
        ("8e1", "is not a port"),
        ("0x50", "is not a port"),
        ("80.0", "is not a port"),
        ("'80 - 79'", "is reversed (expected 79-80)"),
    ])
    def test_huge_and_odd_ports(self, port: str, expected: str) -> None:
        err = refused_one("version: 1\nrules:\n  - {name: a, from: any, to: any, "
                          f"protocol: tcp, ports: [{port}], action: allow}}\n")
        assert err.startswith("p.yaml:3:58: rules[0] (a).ports[0]: ") and expected in err

    def test_huge_version(self) -> None:
        err = refused_one("version: " + "1" * 100_000 + "\n")
        assert err.startswith("p.yaml:1:10: version: unsupported version '111")
        assert err.endswith("' (expected 1)")

    @pytest.mark.parametrize(("text", "head", "tail"), [
        ("mode: " + "m" * 1_000_000, "p.yaml:2:7: mode: 'mmm", "' is not one of enforce | audit"),
        ("workloads:\n  ? " + "w" * 1_000_000 + "\n  : {addresses: [10.0.0.1]}",
         "p.yaml:3:5: workloads.www", "starting with a letter or digit"),
        ("rules:\n  - {name: a, from: {cidr: " + "1" * 1_000_000 + "}, to: any, action: allow}",
         "p.yaml:3:28: rules[0] (a).from.cidr: '111",
         "does not appear to be an IPv4 or IPv6 network)"),
        ("? " + "k" * 1_000_000 + "\n: v", "p.yaml:2:3: policy: unknown key 'kkk",
         "(expected one of: version, mode, default, discover, workloads, rules)"),
    ], ids=["value", "workload-name", "cidr", "key"])
    def test_megabyte_strings_give_short_messages(self, text: str, head: str,
                                                  tail: str) -> None:
        """A value echoed in a message is cut in the middle: the message
        keeps where and what was expected, and stays one short line."""
        errors = [x for x in refused("version: 1\n" + text + "\n") if head in x]
        assert len(errors) == 1, errors
        assert errors[0].startswith(head) and errors[0].endswith(tail)
        assert "…" in errors[0]

    def test_errors_are_capped(self) -> None:
        """Thousands of errors are reported as the first MAX_ERRORS and one
        line that says how many more, not a message of megabytes."""
        n = 5000
        lines = refused("version: 1\nworkloads:\n"
                        + "".join(f"  w{i}: {{addresses: [bad]}}\n" for i in range(n)))
        assert len(lines) == MAX_ERRORS + 1
        assert lines[-1] == (f"p.yaml:{MAX_ERRORS + 3}:22: too many errors: "
                             f"{n - MAX_ERRORS} more after the first {MAX_ERRORS} not shown")


class TestDuplicateKeys:
    @pytest.mark.parametrize(("text", "expected"), [
        ("rules: []\nrules:\n  - {name: all, from: any, to: any, action: allow}",
         "p.yaml:3:1: policy: duplicate key 'rules'"),
        ("version: 1", "p.yaml:2:1: policy: duplicate key 'version'"),
        ("rules:\n  - {name: a, from: any, to: any, action: deny, action: allow}",
         "p.yaml:3:49: rules[0]: duplicate key 'action'"),
        ("workloads:\n  w: {addresses: [10.0.0.1], labels: {t: a, t: b}}",
         "p.yaml:3:45: workloads.w.labels: duplicate key 't'"),
        ('default: deny\n"default": allow', "p.yaml:3:1: policy: duplicate key 'default'"),
    ], ids=["rules", "version", "action", "label", "quoted"])
    def test_the_second_one_is_an_error_not_a_silent_override(self, text: str,
                                                              expected: str) -> None:
        """Most YAML loaders keep the last of two equal keys: an allow-all
        rule list could hide behind an innocent one."""
        assert refused_one("version: 1\n" + text + "\n") == expected


class TestNotAPolicy:
    @pytest.mark.parametrize(("data", "expected"), [
        (b"", "p.yaml:1:1: empty file: expected a policy with 'version: 1'"),
        (b"\n\n   \n", "p.yaml:1:1: empty file: expected a policy with 'version: 1'"),
        (b"# nothing here\n", "p.yaml:1:1: empty file: expected a policy with 'version: 1'"),
        ("\ufeff".encode(), "p.yaml:1:1: empty file: expected a policy with 'version: 1'"),
        (b"---\n", "p.yaml:2:1: policy: expected a mapping"),
        (b"~\n", "p.yaml:1:1: policy: expected a mapping"),
        (b"version: 1\n---\nversion: 1\n", "p.yaml:2:1: YAML syntax error: expected a single "
                                           "document in the stream at line 1, but found "
                                           "another document"),
        (b"a: &x 1\nb: &x 2\n", "p.yaml:2:4: YAML syntax error: found duplicate anchor; first "
                               "occurrence at line 1, second occurrence"),
        (b"%YAML 9.9\n---\nversion: 1\n", "p.yaml:1:1: YAML syntax error: found incompatible "
                                          "YAML document"),
    ], ids=["empty", "blank", "comment", "bom-only", "document-marker", "null", "two-documents",
            "duplicate-anchor", "yaml-9.9"])
    def test_empty_and_odd_documents(self, data: bytes, expected: str) -> None:
        assert refused_one(data) == expected

    def test_a_directory_is_refused_and_left_closed(self, tmp_path: Path) -> None:
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            with pytest.raises(PolicyError) as e:
                load_policy_file(tmp_path)
        assert str(e.value) == f"{tmp_path}:1:1: cannot read: a directory, not a regular file"
        assert len(os.listdir("/proc/self/fd")) == fds  # the daemon retries: no fd may leak

    def test_a_fifo_does_not_block(self, tmp_path: Path) -> None:
        """Opening a FIFO nobody writes to would block forever (and with it
        the daemon's reloads): it is refused at once."""
        fifo = tmp_path / "p.yaml"
        os.mkfifo(fifo)
        assert refused_confined(fifo, seconds=20) == [
            "p.yaml:1:1: cannot read: a FIFO, not a regular file"]

    def test_a_device_is_not_read_forever(self, tmp_path: Path) -> None:
        link = tmp_path / "p.yaml"
        link.symlink_to("/dev/zero")
        assert refused_confined(link, seconds=20) == [
            "p.yaml:1:1: cannot read: a device, not a regular file"]

    def test_a_dangling_symlink(self, tmp_path: Path) -> None:
        link = tmp_path / "p.yaml"
        link.symlink_to(tmp_path / "gone.yaml")
        with pytest.raises(PolicyError) as e:
            load_policy_file(link)
        assert str(e.value) == f"{link}:1:1: cannot read: No such file or directory"


# -- random YAML-ish structures ------------------------------------------------

KEYS = st.sampled_from(TOP_KEYS + WORKLOAD_KEYS + RULE_KEYS + SELECTOR_KEYS
                       + ("<<", "web", "db", "x", "~", "", "1"))
WORDS = st.sampled_from(["any", "tcp", "udp", "icmp", "allow", "deny", "audit", "enforce", "1",
                         "80", "0", "65536", "8000-8100", "9-1", "10.0.0.1", "10.0.0.1/24",
                         "fd00::1", "::/0", "web", "db", "~", "null", "true", "-", ":", "",
                         "\u0085", "\ufeff", "é", "\U0001f600"])
SCALARS = st.one_of(WORDS, st.text(max_size=8), st.integers().map(str))


def _render(draw: st.DrawFn, node: object, depth: int = 0) -> str:
    """Flow-style YAML for a tree of dicts, lists and strings, with random
    quoting, anchors, aliases and tags sprinkled in."""
    deco = draw(st.sampled_from(["", "", "", "", "&a ", "!t ", "!!str ", "!!python/none "]))
    if draw(st.integers(0, 20)) == 0:
        return "*a"
    if isinstance(node, dict):
        items = ", ".join(f"{_render(draw, k, depth + 1)}: {_render(draw, v, depth + 1)}"
                          for k, v in node.items())
        return f"{deco}{{{items}}}"
    if isinstance(node, list):
        return f"{deco}[{', '.join(_render(draw, v, depth + 1) for v in node)}]"
    text = str(node)
    style = draw(st.sampled_from(["plain", "single", "double"]))
    if style == "single":
        return deco + "'" + text.replace("'", "''") + "'"
    if style == "double":
        return deco + '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return deco + text


@st.composite
def yamlish(draw: st.DrawFn) -> str:
    tree = draw(st.recursive(
        SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(KEYS, inner, max_size=5)),
        max_leaves=30))
    top = draw(st.dictionaries(KEYS, st.just(tree) | SCALARS, max_size=5))
    version = draw(st.sampled_from(["version: 1\n", ""]))
    return version + "".join(f"{_render(draw, k)}: {_render(draw, v)}\n"
                             for k, v in top.items())


@settings(max_examples=400, deadline=None)
@given(yamlish())
def test_random_yamlish_structures_load_or_fail_cleanly(text: str) -> None:
    """Random structures with the policy's own keys and values, tags,
    anchors and aliases: a policy, or a PolicyError whose every line is
    FILE:LINE:COL: message pointing inside the file; nothing else."""
    t0 = time.perf_counter()
    try:
        parse_policy(text.encode(), "p.yaml")
    except PolicyError as e:
        # YAML's line breaks, as libyaml counts them: CR and NEL, LS, PS too.
        last_line = len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text))
        for issue in e.issues:
            assert 1 <= issue.line <= last_line and issue.col >= 1, (issue, text)
            assert ISSUE_LINE.match(issue.format("p.yaml")), issue
            assert len(issue.message) <= MAX_MESSAGE
    assert time.perf_counter() - t0 < BOUND_S
