"""The policy file: every validation error of docs/policy.md reported as
FILE:LINE:COL with the field and what was expected, all at once; hostile
input refused with a clear error, never a crash or a hang."""

from __future__ import annotations

import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.policy.model import Selector
from microseg.policy.parse import MAX_FILE_BYTES, PolicyError, load_policy_file, parse_policy

GOOD = textwrap.dedent("""\
    version: 1
    mode: enforce            # enforce | audit
    default: deny
    workloads:
      web:
        labels: {app: shop, tier: web}
        addresses: [10.203.0.10, "fd00:203::10"]
      db:
        labels: {app: shop, tier: db}
        addresses: [10.203.0.30/32]
        mode: audit
    rules:
      - name: web-to-db
        from: {workload: web}
        to: {workload: db}
        protocol: tcp
        ports: [5432, "8000-8100"]
        action: allow
      - name: clients-to-web
        from: [{cidr: 192.0.2.0/24}, {labels: {role: client}}]
        to: {labels: {tier: web}}
        protocol: tcp
        ports: [80, 443]
        action: allow
      - name: no-ssh-to-db
        from: any
        to: {workload: db}
        protocol: tcp
        ports: [22]
        action: deny
    """)


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        parse_policy(textwrap.dedent(text).encode(), "p.yaml")
    return [i.format("p.yaml") for i in e.value.issues]


def one(text: str) -> str:
    errs = [e for e in errors(text) if ": warning:" not in e]
    assert len(errs) == 1, errs
    return errs[0]


def test_the_spec_example_is_valid() -> None:
    loaded = parse_policy(GOOD.encode(), "p.yaml")
    p = loaded.policy
    assert (p.mode, p.default, p.version) == ("enforce", "deny", 1)
    assert [w.name for w in p.workloads] == ["web", "db"]
    assert p.workloads[1].mode == "audit"
    assert [r.name for r in p.rules] == ["web-to-db", "clients-to-web", "no-ssh-to-db"]
    r0, r1, r2 = p.rules
    assert r0.ports == ((5432, 5432), (8000, 8100)) and r0.protocol == 6
    assert r1.sources == (Selector.of_cidr("192.0.2.0/24"), Selector.of_labels({"role": "client"}))
    assert r2.sources == (Selector.any(),) and r2.action == "deny"
    # `role: client` matches no workload: a warning, not an error.
    assert [w.format("p.yaml") for w in loaded.warnings] == [
        "p.yaml:20:43: warning: rules[1] (clients-to-web).from[1].labels: "
        "no workload has labels role=client"]
    assert len(loaded.sha256) == 64


def test_defaults() -> None:
    p = parse_policy(b"version: 1\n").policy
    assert (p.mode, p.default, p.workloads, p.rules) == ("enforce", "deny", (), ())


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 1\nrules: [\n", "p.yaml:3:1: YAML syntax error"),
    ("version: 1\n  bad: indent\n", "p.yaml:2:6: YAML syntax error"),
    ("version: 1\ncolour: blue\n", "p.yaml:2:1: policy: unknown key 'colour'"),
    ("version: 1\nrulez: []\n", "did you mean 'rules'?"),
    ("mode: enforce\n", "p.yaml:1:1: version: missing (expected 'version: 1')"),
    ("version: 2\n", "p.yaml:1:10: version: unsupported version '2' (expected 1)"),
    ("version: 1\nmode: strict\n", "p.yaml:2:7: mode: 'strict' is not one of enforce | audit"),
    ("version: 1\ndefault: maybe\n", "default: 'maybe' is not one of allow | deny"),
    ("version: 1\nworkloads: [web]\n", "p.yaml:2:12: workloads: expected a mapping"),
    ("version: 1\nrules: {a: 1}\n", "p.yaml:2:8: rules: expected a list"),
])
def test_file_level_errors(text: str, expected: str) -> None:
    assert expected in one(text)


def test_workload_errors() -> None:
    errs = errors("""\
        version: 1
        workloads:
          web: {addresses: [10.0.0.1], labels: {tier: web}, color: red}
          db: {labels: {tier: db}}
          api: {addresses: [10.0.0.300]}
          cache: {addresses: [10.0.0.5/24]}
          queue: {addresses: []}
          web: {addresses: [10.0.0.9]}
          bad name: {addresses: [10.0.0.7]}
          twin: {addresses: [10.0.0.1]}
          m: {addresses: [10.0.0.8], mode: strict}
        """)
    assert errors  # every one of them, at once:
    expected = [
        "p.yaml:3:53: workloads.web: unknown key 'color'",
        "p.yaml:4:7: workloads.db: missing 'addresses'",
        "p.yaml:5:21: workloads.api.addresses[0]: '10.0.0.300' is not an IP address or CIDR",
        "p.yaml:6:23: workloads.cache.addresses[0]: '10.0.0.5/24' has host bits set; "
        "did you mean 10.0.0.0/24?",
        "p.yaml:7:22: workloads.queue.addresses: empty",
        "p.yaml:8:3: workloads: duplicate key 'web'",
        "p.yaml:9:3: workloads.bad name: workload name 'bad name' must be",
        "p.yaml:10:22: workloads.twin.addresses[0]: 10.0.0.1/32 already belongs to workload "
        "'web'",
        "p.yaml:11:36: workloads.m.mode: 'strict' is not one of enforce | audit",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == len(expected)


def test_rule_errors_all_at_once() -> None:
    errs = errors("""\
        version: 1
        workloads:
          web: {addresses: [10.0.0.1]}
        rules:
          - name: a
            from: {workload: web}
            to: {workload: dbb}
            protocol: tcp
            ports: [0, 70000, "9000-8000", "http", 80]
            action: allow
          - name: a
            from: any
            to: any
            action: allow
          - from: any
            to: any
          - name: p
            from: any
            to: any
            protocol: icmp
            ports: [80]
            action: deny
          - name: q
            from: {cidr: 10.0.0.0/33}
            to: {workload: web, cidr: 10.0.0.0/8}
            protocol: sctp
            action: reject
            comment: nope
          - name: r
            from: everyone
            to: []
            action: allow
        """)
    expected = [
        "p.yaml:7:20: rules[0] (a).to.workload: undefined workload 'dbb'",
        "p.yaml:9:13: rules[0] (a).ports[0]: 0 is outside 1-65535",
        "p.yaml:9:16: rules[0] (a).ports[1]: 70000 is outside 1-65535",
        "p.yaml:9:23: rules[0] (a).ports[2]: range 9000-8000 is reversed (expected 8000-9000)",
        "p.yaml:9:36: rules[0] (a).ports[3]: 'http' is not a port (1-65535) or a range",
        "p.yaml:11:11: rules[1] (a): duplicate rule name 'a' (first at line 5)",
        "p.yaml:15:5: rules[2]: missing 'name'",
        "p.yaml:15:5: rules[2]: missing 'action' (allow or deny)",
        "p.yaml:21:12: rules[3] (p).ports: ports need protocol tcp or udp (protocol is icmp)",
        "p.yaml:24:18: rules[4] (q).from.cidr: '10.0.0.0/33' is not an IP address or CIDR",
        "p.yaml:25:9: rules[4] (q).to: a selector has exactly one of workload, labels, cidr",
        "p.yaml:26:15: rules[4] (q).protocol: 'sctp' is not one of tcp | udp | icmp | "
        "icmpv6 | any",
        "p.yaml:27:13: rules[4] (q).action: 'reject' is not one of allow | deny",
        "p.yaml:28:5: rules[4]: unknown key 'comment'",
        "p.yaml:30:11: rules[5] (r).from: 'everyone' is not a selector",
        "p.yaml:31:9: rules[5] (r).to: empty list",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == len(expected), errs
    lines = [int(e.split(":")[1]) for e in errs]
    assert lines == sorted(lines), "reported in file order"


def test_ports_without_protocol_are_refused() -> None:
    assert "ports need protocol tcp or udp (protocol is any)" in one("""\
        version: 1
        rules:
          - {name: x, from: any, to: any, ports: [80], action: allow}
        """)


def test_label_selector_matching_nothing_is_only_a_warning() -> None:
    loaded = parse_policy(textwrap.dedent("""\
        version: 1
        workloads:
          web: {addresses: [10.0.0.1], labels: {tier: web}}
        rules:
          - {name: x, from: {labels: {tier: db}}, to: any, action: allow}
        """).encode(), "p.yaml")
    assert [w.message for w in loaded.warnings] == [
        "rules[0] (x).from.labels: no workload has labels tier=db"]


def test_file_over_16_mib(tmp_path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"version: 1\n" + b"#" * MAX_FILE_BYTES)
    with pytest.raises(PolicyError) as e:
        load_policy_file(big)
    assert "over the 16 MiB limit" in str(e.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(PolicyError) as e:
        load_policy_file(tmp_path / "nope.yaml")
    assert "cannot read" in str(e.value)


class TestHostileInput:
    def test_invalid_utf8_is_located(self) -> None:
        with pytest.raises(PolicyError) as e:
            parse_policy(b"version: 1\nmode: \xff\xfe\n", "p.yaml")
        assert str(e.value) == "p.yaml:2:7: not valid UTF-8"

    def test_billion_laughs_is_refused_fast(self) -> None:
        lol = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        for i in range(1, 10):
            prev = chr(ord("a") + i - 1)
            cur = chr(ord("a") + i)
            lol.append(f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, "
                       f"*{prev}, *{prev}, *{prev}]")
        text = "version: 1\nworkloads:\n" + "\n".join("  " + x for x in lol) + "\n"
        t0 = time.perf_counter()
        errs = errors(text)
        assert time.perf_counter() - t0 < 5  # a sanity bound against a hang, not a benchmark
        assert errs

    def test_alias_anywhere_is_refused(self) -> None:
        assert "aliases (*name) are not allowed" in " ".join(errors("""\
            version: 1
            workloads:
              web: &w {addresses: [10.0.0.1]}
              api: *w
            """))

    @pytest.mark.parametrize("text", [
        "version: 1\nrules: " + "[" * 100_000 + "]" * 100_000 + "\n",
        # Closers hidden in a string must not mask the depth that follows.
        'version: 1\nx: "' + "]" * 100_000 + '"\nrules: ' + "[" * 100_000 + "]" * 100_000,
        "version: 1\nrules:\n" + "".join(" " * i + "-\n" for i in range(0, 4000, 2)),
    ], ids=["flow", "masked", "block"])
    def test_deep_nesting(self, text: str) -> None:
        assert "nesting too deep" in one(text)

    def test_not_a_mapping(self) -> None:
        assert "policy: expected a mapping" in one("- just\n- a list\n")
        assert "empty file" in one("")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        parse_policy(data, "p.yaml")
    except PolicyError as e:
        assert e.issues and all(i.line >= 1 and i.col >= 1 for i in e.issues)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.text(max_size=12))
def test_mutated_policies_never_crash(pos: int, junk: str) -> None:
    text = GOOD[:pos] + junk + GOOD[pos + len(junk):]
    try:
        parse_policy(text.encode(), "p.yaml")
    except PolicyError as e:
        assert all(f.startswith("p.yaml:") for f in str(e).splitlines())


# -- discover ------------------------------------------------------------------

def test_discover_docker_socket_and_its_default() -> None:
    p = parse_policy(b"version: 1\ndiscover:\n  docker: {socket: /run/podman/podman.sock}\n")
    assert p.policy.discover.docker_socket == "/run/podman/podman.sock"
    for text in ("docker: {}", "docker:", "docker: ~"):
        p = parse_policy(f"version: 1\ndiscover:\n  {text}\n".encode())
        assert p.policy.discover.docker_socket == "/var/run/docker.sock", text
    assert parse_policy(b"version: 1\n").policy.discover.docker_socket is None


def test_discover_errors_with_line_and_column() -> None:
    errs = errors("""\
        version: 1
        discover:
          docker: {socket: run/docker.sock, tls: true}
          kubernetes: {}
        """)
    assert errs == [
        "p.yaml:3:20: discover.docker.socket: 'run/docker.sock' is not an absolute path "
        "(e.g. /var/run/docker.sock)",
        "p.yaml:3:37: discover.docker: unknown key 'tls' (expected one of: socket)",
        "p.yaml:4:3: discover: unknown key 'kubernetes' (expected one of: docker)",
    ]
    assert one("version: 1\ndiscover: {}\n") == \
        "p.yaml:2:11: discover: empty; expected docker: {socket: PATH}"
    assert one("version: 1\ndiscover: [docker]\n") == "p.yaml:2:11: discover: expected a mapping"


def test_with_discovery_an_unknown_workload_name_is_a_warning() -> None:
    text = textwrap.dedent("""\
        version: 1
        {discover}rules:
          - {{name: to-db, from: {{labels: {{role: app}}}}, to: {{workload: shop-db}},
             protocol: tcp, ports: [5432], action: allow}}
        """)
    # Without discovery: an error, as ever.
    assert "undefined workload 'shop-db'" in one(text.format(discover=""))
    # With it: a container of that name may run; said, not refused.
    p = parse_policy(text.format(discover="discover: {docker: {}}\n").encode(), "p.yaml")
    assert [w.format("p.yaml") for w in p.warnings] == [
        "p.yaml:4:63: warning: rules[0] (to-db).to.workload: no static workload 'shop-db'; "
        "it matches once a discovered container of that name runs"]
