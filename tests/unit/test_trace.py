"""`microseg policy trace` and the Evaluator behind it: explanations,
resolution of --from/--to, errors, the JSON shape, the command offline and
against a daemon, and — on random policies and packets — the trace, the
Evaluator and the literal reference (tests/unit/reference.py) agreeing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.cli import main
from microseg.kernel import abi
from microseg.policy.evaluate import (
    Evaluator,
    TraceError,
    check_port,
    parse_protocol,
    resolve,
    trace,
)
from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

from .reference import reference_verdict, selector_matches
from .test_compile import PORTS, V4, V6, policies

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
NAMES = {abi.Verdict.ALLOWED: "allowed", abi.Verdict.DENIED: "denied",
         abi.Verdict.AUDIT: "audit"}

SHOP = Policy(
    default="deny",
    workloads=(
        Workload.make("web", ["10.0.0.10", "fd00::10"], {"app": "shop", "tier": "web"}),
        Workload.make("api", ["10.0.0.5"], {"app": "shop", "tier": "api"}),
        Workload.make("db", ["10.0.0.30"], {"app": "shop", "tier": "db"}, mode="audit"),
        Workload.make("lab", ["10.1.0.0/24"]),
        Workload.make("probe", ["10.1.0.1"]),
        Workload.make("v6only", ["fd00::60"]),
    ),
    rules=(
        Rule.make("web-to-db", S.of_workload("web"), S.of_workload("db"), "allow", "tcp",
                  [5432, (8000, 8100)]),
        Rule.make("tier-web", [S.of_labels({"tier": "web"}), S.of_cidr("192.0.2.0/24")],
                  S.of_workload("db"), "allow", "udp"),
        Rule.make("no-ssh", S.any(), S.of_labels({"tier": "db"}), "deny", "tcp", [22]),
        Rule.make("shop-any", S.of_labels({"app": "shop"}), S.of_workload("db"), "allow"),
        Rule.make("typo", S.of_workload("api"), S.of_labels({"tier": "database"}), "allow",
                  "tcp"),
        Rule.make("to-lab", S.any(), S.of_cidr("10.1.0.0/16"), "allow", "icmp"),
    ))

SHOP_YAML = """\
version: 1
default: deny
workloads:
  web: {labels: {app: shop, tier: web}, addresses: [10.0.0.10, "fd00::10"]}
  db: {labels: {app: shop, tier: db}, addresses: [10.0.0.30], mode: audit}
  lab: {addresses: [10.1.0.0/24]}
rules:
  - {name: web-to-db, from: {workload: web}, to: {workload: db}, protocol: tcp,
     ports: [5432], action: allow}
  - {name: no-ssh, from: any, to: {workload: db}, protocol: tcp, ports: [22], action: deny}
"""


# -- the Evaluator ------------------------------------------------------------

def test_evaluator_answers_like_the_datapath() -> None:
    ev = Evaluator(SHOP)
    assert ev.verdict("10.0.0.10", "10.0.0.30", TCP, 5432) == ("allowed", "web-to-db")
    # Deny beats the earlier allow (shop-any covers every protocol and port).
    assert ev.verdict("10.0.0.10", "10.0.0.30", TCP, 22) == ("audit", "no-ssh")
    assert ev.verdict("10.0.0.5", "10.0.0.30", TCP, 9) == ("allowed", "shop-any")
    assert ev.verdict("10.0.0.5", "10.0.0.10", TCP, 80) == ("denied", None)
    assert ev.verdict("203.0.113.1", "10.1.0.7", ICMP, 0) == ("allowed", "to-lab")
    assert ev.owner("10.1.0.1") == "probe" and ev.owner("10.1.0.2") == "lab"
    assert ev.owner("203.0.113.1") is None


def test_evaluator_memo_keeps_ports_and_protocols_apart() -> None:
    ev = Evaluator(SHOP)
    for _ in range(2):  # the second round answers from the memo
        assert ev.verdict("10.0.0.10", "10.0.0.30", TCP, 8000) == ("allowed", "web-to-db")
        assert ev.verdict("10.0.0.10", "10.0.0.30", TCP, 8101) == ("allowed", "shop-any")
        assert ev.verdict("10.0.0.10", "10.0.0.30", UDP, 8000) == ("allowed", "tier-web")
        assert ev.verdict("10.0.0.10", "10.0.0.30", TCP, 22) == ("audit", "no-ssh")


def test_evaluator_ignores_ports_of_other_protocols() -> None:
    ev = Evaluator(SHOP)
    assert ev.verdict("10.0.0.2", "10.1.0.9", ICMP, 0) == ev.verdict(
        "10.0.0.2", "10.1.0.9", ICMP, 70000) == ("allowed", "to-lab")


def test_evaluator_refuses_mixed_families_and_bad_ports() -> None:
    ev = Evaluator(SHOP)
    with pytest.raises(ValueError, match="same IP version"):
        ev.verdict("10.0.0.10", "fd00::10", TCP, 80)
    with pytest.raises(ValueError, match="0-65535"):
        ev.verdict("10.0.0.10", "10.0.0.30", TCP, 65536)
    with pytest.raises(ValueError):
        ev.verdict("web", "10.0.0.30", TCP, 80)


# -- explanations -------------------------------------------------------------

def test_trace_lists_matches_in_file_order_and_names_the_decider() -> None:
    t = trace(SHOP, "10.0.0.10", "10.0.0.30", TCP, 22)
    assert (t.verdict, t.rule, t.reason) == ("audit", "no-ssh", "rule")
    assert t.matched == [{"rule": "no-ssh", "action": "deny"},
                         {"rule": "shop-any", "action": "allow"}]
    assert (t.mode, t.mode_from) == ("audit", "workload db")
    assert (t.src_workload, t.dst_workload, t.port) == ("web", "db", 22)
    assert t.inconsistency is None


def test_trace_says_which_part_of_a_rule_naming_the_destination_failed() -> None:
    t = trace(SHOP, "10.0.0.5", "10.0.0.30", UDP, 53)
    why = {m["rule"]: m["why"] for m in t.not_matched}
    assert why == {
        "web-to-db": "source 10.0.0.5 (workload api) is not workload web; "
                     "protocol udp, rule is tcp",
        "tier-web": "source 10.0.0.5 (workload api) has no labels tier=web "
                    "(its labels: app=shop,tier=api) and is outside 192.0.2.0/24",
        "no-ssh": "protocol udp, rule is tcp",
    }
    assert (t.verdict, t.rule) == ("allowed", "shop-any")
    t = trace(SHOP, "10.0.0.10", "10.0.0.30", TCP, 443)
    assert {m["rule"]: m["why"] for m in t.not_matched}["web-to-db"] == \
        "port 443 not in 5432,8000-8100"
    t = trace(SHOP, "203.0.113.9", "10.0.0.30", TCP, 443)
    assert {m["rule"]: m["why"] for m in t.not_matched}["shop-any"] == \
        "source 203.0.113.9 (no workload) has no labels app=shop"


def test_rules_that_miss_only_by_the_destination_are_near_misses() -> None:
    t = trace(SHOP, "10.0.0.5", "10.0.0.30", TCP, 5432)
    assert t.near_misses == [{"rule": "typo", "why": "destination 10.0.0.30 (workload db) "
                              "has no labels tier=database (its labels: app=shop,tier=db)"}]
    # Not a rule that names the destination: not in not_matched.
    assert "typo" not in {m["rule"] for m in t.not_matched}
    # A rule whose protocol misses too is no near miss: too far to be meant.
    assert trace(SHOP, "10.0.0.5", "10.0.0.30", UDP, 53).near_misses == []


def test_a_workload_selector_of_no_running_workload_says_so() -> None:
    pol = Policy(workloads=(Workload.make("a", ["10.0.0.1"]), Workload.make("b",
                                                                          ["10.0.0.2"])),
                 rules=(Rule.make("from-ghost", S.of_workload("ghost"), S.of_workload("b"),
                                  "allow"),))
    t = trace(pol, "10.0.0.1", "10.0.0.2", TCP, 80)
    assert t.not_matched == [{"rule": "from-ghost", "why": "source 10.0.0.1 (workload a) is "
                              "not workload ghost (no such workload now)"}]


def test_default_and_enforce_override_in_an_audit_policy() -> None:
    pol = Policy(mode="audit", default="deny",
                 workloads=(Workload.make("a", ["10.0.0.1"]),
                            Workload.make("b", ["10.0.0.2"], mode="enforce")))
    t = trace(pol, "10.0.0.1", "10.0.0.2", ICMP, None)
    assert (t.verdict, t.rule, t.reason, t.port) == ("denied", None, "default", None)
    assert (t.mode, t.mode_from) == ("enforce", "workload b")
    t = trace(pol, "10.0.0.2", "10.0.0.1", ICMP, None)
    assert (t.verdict, t.mode_from) == ("audit", "the policy")


def test_an_inconsistent_compile_is_reported_and_the_datapath_wins(monkeypatch) -> None:
    monkeypatch.setattr(Evaluator, "verdict", lambda self, *a: ("denied", "no-ssh"))
    t = trace(SHOP, "10.0.0.10", "10.0.0.30", TCP, 5432)
    assert (t.verdict, t.rule) == ("denied", "no-ssh")
    assert t.inconsistency is not None and "a bug in microseg" in t.inconsistency


def test_as_dict_is_the_documented_shape() -> None:
    d = trace(SHOP, "10.0.0.10", "10.0.0.30", TCP, 22).as_dict()
    assert d == {
        "verdict": "audit", "rule": "no-ssh",
        "matched": [{"rule": "no-ssh", "action": "deny"},
                    {"rule": "shop-any", "action": "allow"}],
        "not_matched": [{"rule": "web-to-db", "why": "port 22 not in 5432,8000-8100"},
                        {"rule": "tier-web", "why": "protocol tcp, rule is udp"}],
        "from": {"ip": "10.0.0.10", "workload": "web"},
        "to": {"ip": "10.0.0.30", "workload": "db"},
        "protocol": "tcp", "port": 22}
    d = trace(SHOP, "10.0.0.10", "10.0.0.30", 47, None).as_dict()
    assert (d["protocol"], d["port"]) == (47, None)


# -- resolution and arguments -------------------------------------------------

def test_resolve_addresses_and_workload_names() -> None:
    s, d = resolve(SHOP, "10.0.0.10", "db")
    assert (s.ip, s.workload, d.ip, d.workload, d.note) == (
        "10.0.0.10", "web", "10.0.0.30", "db", None)
    s, d = resolve(SHOP, "203.0.113.1", "10.1.0.1")
    assert (s.workload, d.workload) == (None, "probe")


def test_resolve_a_cidr_workload_to_its_first_host_of_its_own() -> None:
    # 10.1.0.1 is probe's: lab's first host of its own is 10.1.0.2.
    s, _ = resolve(SHOP, "lab", "db")
    assert (s.ip, s.workload) == ("10.1.0.2", "lab")
    assert s.note == "lab is 10.1.0.0/24: traced from its first host of its own, 10.1.0.2"
    pol = Policy(workloads=(Workload.make("n", ["10.9.0.0/30", "fd00:9::/64"]),))
    s, _ = resolve(pol, "n", "10.0.0.1")
    assert (s.ip, s.note) == ("10.9.0.1", "n is 10.9.0.0/30: traced from its first host, "
                                          "10.9.0.1")
    s, _ = resolve(pol, "n", "fd00::1")
    assert s.ip == "fd00:9::1"
    pol = Policy(workloads=(Workload.make("p2p", ["10.9.0.0/31"]),))
    assert resolve(pol, "p2p", "10.0.0.1")[0].ip == "10.9.0.0"  # RFC 3021: both usable


def test_resolve_picks_the_address_family_of_the_other_end() -> None:
    s, d = resolve(SHOP, "web", "fd00::99")
    assert (s.ip, s.note) == ("fd00::10", "web has 2 addresses: traced from fd00::10")
    s, d = resolve(SHOP, "web", "v6only")
    assert (s.ip, d.ip) == ("fd00::10", "fd00::60")
    assert resolve(SHOP, "web", "db")[0].ip == "10.0.0.10"


@pytest.mark.parametrize(("src", "dst", "message", "usage"), [
    ("wbe", "db", "--from wbe: not an IP address, and no workload has that name; "
                  "did you mean 'web'?", False),
    ("db", "v6only", "workloads db and v6only have no address family in common "
                     "(db: IPv4; v6only: IPv6)", False),
    ("10.0.0.1", "v6only", "workload v6only has no IPv4 address (--from 10.0.0.1 is IPv4)",
     False),
    ("10.0.0.1", "fd00::1", "--from 10.0.0.1 is IPv4 but --to fd00::1 is IPv6", True),
])
def test_resolve_errors_are_one_line(src: str, dst: str, message: str, usage: bool) -> None:
    with pytest.raises(TraceError) as e:
        resolve(SHOP, src, dst)
    assert str(e.value) == message and e.value.usage is usage


def test_resolve_a_workload_without_addresses_or_without_one_of_its_own() -> None:
    pol = Policy(workloads=(Workload("hostnet", ()), Workload.make("a", ["10.0.0.0/30"]),
                            Workload.make("b", ["10.0.0.1", "10.0.0.2"])))
    with pytest.raises(TraceError, match="workload hostnet has no addresses"):
        resolve(pol, "hostnet", "10.0.0.9")
    with pytest.raises(TraceError, match="every address of workload a is owned by another "
                                         "workload"):
        resolve(pol, "10.0.0.9", "a")


def test_protocols_and_ports() -> None:
    assert [parse_protocol(p) for p in ("tcp", "UDP", "icmp", "icmpv6", "47", "0")] == [
        6, 17, 1, 58, 47, 0]
    for bad in ("gre", "256", "-1", "any", ""):
        with pytest.raises(TraceError, match="expected tcp, udp, icmp, icmpv6 or a number"):
            parse_protocol(bad)
    assert check_port(TCP, 443) == 443 and check_port(ICMP, None) is None
    with pytest.raises(TraceError, match="--port is required with udp"):
        check_port(UDP, None)
    with pytest.raises(TraceError, match="--port applies to tcp and udp only"):
        check_port(ICMPV6, 5)
    with pytest.raises(TraceError, match="expected 0-65535"):
        check_port(TCP, 70000)


# -- the command, offline -------------------------------------------------------

@pytest.fixture
def shop_file(tmp_path: Path) -> Path:
    f = tmp_path / "policy.yaml"
    f.write_text(SHOP_YAML)
    return f


def test_cli_json_is_one_object(shop_file: Path, capsys) -> None:
    rc = main(["policy", "trace", "--file", str(shop_file), "--from", "web", "--to", "db",
               "--port", "22", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("\n") == 1
    assert orjson.loads(out) == {
        "verdict": "audit", "rule": "no-ssh", "matched": [{"rule": "no-ssh", "action": "deny"}],
        "not_matched": [{"rule": "web-to-db", "why": "port 22 not in 5432"}],
        "from": {"ip": "10.0.0.10", "workload": "web"},
        "to": {"ip": "10.0.0.30", "workload": "db"}, "protocol": "tcp", "port": 22}


def test_cli_human_output(shop_file: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    rc = main(["policy", "trace", "--file", str(shop_file), "--from", "lab", "--to", "db",
               "--port", "5432"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines() == [
        "lab 10.1.0.1 -> db 10.0.0.30, tcp port 5432",
        "  (lab is 10.1.0.0/24: traced from its first host, 10.1.0.1)",
        "verdict: AUDIT: denied by the default (no rule matches; default: deny), but passes: "
        "workload db is in audit mode",
        "matched: no rule",
        "not matched, naming 10.0.0.30 as destination:",
        "  web-to-db  source 10.1.0.1 (workload lab) is not workload web",
        "  no-ssh     port 5432 not in 22",
    ]
    assert "\033[" not in out  # not a TTY: no colour
    rc = main(["policy", "trace", "--file", str(shop_file), "--from", "web", "--to", "db",
               "--port", "5432"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:5] == ["verdict: ALLOWED by rule web-to-db", "matched:",
                          "  web-to-db  allow  <- decides"]


def test_cli_colours_the_verdict_on_a_tty_only_without_no_color(monkeypatch) -> None:
    from microseg import cli_trace

    t = trace(SHOP, "10.0.0.10", "10.0.0.30", TCP, 5432)
    s, d = resolve(SHOP, "10.0.0.10", "10.0.0.30")
    assert "\033[32mALLOWED\033[0m" in cli_trace.render(t, SHOP, s, d, colour=True)

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli_trace.use_colour(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cli_trace.use_colour(Tty())


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--from", "web", "--to", "db"], 2, "--port is required with tcp"),
    (["--from", "web", "--to", "db", "--protocol", "icmp", "--port", "1"], 2,
     "--port applies to tcp and udp only"),
    (["--from", "web", "--to", "fd00::1", "--protocol", "icmp"], 2,
     "protocol icmp is IPv4's: use --protocol icmpv6"),
    (["--from", "10.0.0.1", "--to", "fd00::1", "--protocol", "47"], 2,
     "--from 10.0.0.1 is IPv4 but --to fd00::1 is IPv6"),
    (["--from", "web", "--to", "dbb", "--port", "1"], 1,
     "--to dbb: not an IP address, and no workload has that name; did you mean 'db'?"),
])
def test_cli_errors(shop_file: Path, capsys, argv: list[str], code: int, message: str) -> None:
    rc = main(["policy", "trace", "--file", str(shop_file), *argv])
    err = capsys.readouterr().err
    assert rc == code
    assert err.splitlines()[-1].startswith(f"microseg: {message}")


def test_cli_invalid_file_is_reported_like_policy_check(tmp_path: Path, capsys) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("version: 1\nmode: strict\n")
    rc = main(["policy", "trace", "--file", str(f), "--from", "10.0.0.1", "--to", "10.0.0.2",
               "--port", "80"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err.splitlines() == [
        f"{f}:2:7: mode: 'strict' is not one of enforce | audit", f"{f}: 1 error"]


# -- the command, against a daemon ----------------------------------------------

@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[str]:
    """A stand-in for the daemon's control socket answering the two reads
    the command makes: the active policy with what discovery knows, and the
    workload list."""
    known = [
        {"workload": "web", "source": "static", "labels": {"app": "shop", "tier": "web"},
         "addresses": ["10.0.0.10", "fd00::10"]},
        {"workload": "db", "source": "static", "labels": {"app": "shop", "tier": "db"},
         "addresses": ["10.0.0.30"]},
        {"workload": "lab", "source": "static", "labels": {}, "addresses": ["10.1.0.0/24"]},
        {"workload": "cache", "source": "docker", "labels": {"tier": "db"},
         "addresses": ["10.1.0.77"]},
        {"workload": "hostnet", "source": "docker", "labels": {}, "addresses": []},
    ]
    text = SHOP_YAML.replace("default: deny\n", "default: deny\ndiscover: {docker: {}}\n")

    async def source(_: web.Request) -> web.Response:
        return web.json_response({"generation": 7, "source": "/etc/microseg/policy.yaml",
                                  "text": text, "known": known})

    async def workloads(_: web.Request) -> web.Response:
        body = b"".join(orjson.dumps({**k, "sessions": 0}) + b"\n" for k in known)
        return web.Response(body=body, content_type="application/x-ndjson")

    app = web.Application()
    app.router.add_get("/v1/policy/source", source)
    app.router.add_get("/v1/workloads", workloads)
    path = str(tmp_path / "microseg.sock")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, path).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield path
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_cli_traces_the_daemons_policy_with_discovered_workloads(daemon: str, capsys) -> None:
    rc = main(["policy", "trace", "--socket", daemon, "--from", "cache", "--to", "db",
               "--port", "22", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    d = orjson.loads(out)
    assert (d["verdict"], d["rule"], d["from"]) == (
        "audit", "no-ssh", {"ip": "10.1.0.77", "workload": "cache"})
    # The container's host address inside lab's CIDR is the container's.
    rc = main(["policy", "trace", "--socket", daemon, "--from", "10.1.0.77", "--to", "web",
               "--protocol", "icmp", "--json"])
    assert rc == 0 and orjson.loads(capsys.readouterr().out)["from"]["workload"] == "cache"


def test_cli_daemon_workload_without_addresses_is_told_from_a_typo(daemon: str,
                                                                     capsys) -> None:
    rc = main(["policy", "trace", "--socket", daemon, "--from", "hostnet", "--to", "db",
               "--port", "80"])
    assert rc == 1
    assert capsys.readouterr().err.strip() == (
        "microseg: --from hostnet: workload hostnet has no addresses (a container on the "
        "host's network or none): nothing to trace")
    rc = main(["policy", "trace", "--socket", daemon, "--from", "hostnett", "--to", "db",
               "--port", "80"])
    assert rc == 1 and "no workload has that name" in capsys.readouterr().err


def test_cli_without_a_daemon_fails_with_one_line(tmp_path: Path, capsys) -> None:
    rc = main(["policy", "trace", "--socket", str(tmp_path / "none.sock"), "--from", "a",
               "--to", "b", "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "daemon not reachable" in err


# -- random policies: trace == Evaluator == the literal reference ---------------

@settings(max_examples=250, deadline=None)
@given(policy=policies(), data=st.data())
def test_trace_evaluator_and_reference_agree(policy: Policy, data: st.DataObject) -> None:
    ev = Evaluator(policy)
    for _ in range(20):
        v6 = data.draw(st.booleans())
        pool = V6 if v6 else V4
        src, dst = data.draw(st.sampled_from(pool)), data.draw(st.sampled_from(pool))
        proto = data.draw(st.sampled_from([TCP, UDP, ICMPV6 if v6 else ICMP, 47]))
        dport = data.draw(st.sampled_from([*PORTS, 0, 999, 2001, 65535]))
        want_v, want_rule = reference_verdict(policy, src, dst, proto, dport)
        want = (NAMES[want_v], want_rule)
        assert ev.verdict(src, dst, proto, dport) == want
        t = trace(policy, src, dst, proto, dport, evaluator=ev)
        assert t.inconsistency is None and (t.verdict, t.rule) == want
        assert t.reason == ("default" if want_rule is None else "rule")
        # The explanation is a literal reading too: every rule is matched,
        # explained (it names the destination) or a near miss, or none of them.
        names_dst = {r.name for r in policy.rules
                     if any(selector_matches(policy, s, dst) for s in r.destinations)}
        matched = {m["rule"] for m in t.matched}
        assert matched | {m["rule"] for m in t.not_matched} == names_dst
        assert matched.isdisjoint(m["rule"] for m in t.not_matched)
        assert all(m["why"] for m in t.not_matched)
        assert [m["rule"] for m in t.matched] == [r.name for r in policy.rules
                                                   if r.name in matched]
        assert not names_dst & {m["rule"] for m in t.near_misses}
