"""A staged candidate in the real program (docs/policy.md "Staging"): new
flows are judged by it beside the active policy, which alone decides; the
event carries the staged judgment, the staged counters and rule hits count
it, established packets never consult it, and clearing it is one write."""

from __future__ import annotations

from microseg.kernel import abi
from microseg.kernel.abi import Verdict
from microseg.policy.compile import compile_policy
from microseg.policy.model import Policy, Rule, Selector, Workload

from .harness import Harness, tcp, udp

WEB, DB, OTHER = "10.9.0.10", "10.9.0.30", "10.9.0.99"
WORKLOADS = (Workload.make("web", [WEB], {"tier": "web"}),
             Workload.make("db", [DB], {"tier": "db"}),
             Workload.make("other", [OTHER]))
ACTIVE = Policy(mode="audit", workloads=WORKLOADS, rules=(
    Rule.make("web-db", Selector.of_workload("web"), Selector.of_workload("db"), "allow",
              "tcp", [5432]),))
CANDIDATE = Policy(workloads=WORKLOADS, rules=(
    Rule.make("web-db-staged", Selector.of_labels({"tier": "web"}),
              Selector.of_labels({"tier": "db"}), "allow", "tcp", [5432]),
    Rule.make("other-web", Selector.of_workload("other"), Selector.of_workload("web"),
              "allow", "udp", [53]),))


def _stage(dp: Harness, policy: Policy) -> tuple[int, dict[int, str]]:
    compiled = compile_policy(policy)
    gen = dp.dp.stage_policy(compiled)
    return gen, compiled.rule_names


def test_new_flows_carry_the_staged_judgment(dp: Harness) -> None:
    dp.install(ACTIVE)
    gen, names = _stage(dp, CANDIDATE)
    assert gen & abi.STAGED_GENERATION and dp.dp.staged_generation() == gen

    # Same verdict both ways (allowed): the staged rule is the candidate's.
    out = dp.send(tcp(WEB, DB, 40000, 5432))
    v = out.verdict
    assert out.passed and Verdict(v.verdict) == Verdict.ALLOWED
    assert dp.rule_name(v.rule_id) == "web-db"
    assert (v.staged_verdict - 1, names[v.staged_rule], v.staged_generation) == (
        Verdict.ALLOWED, "web-db-staged", gen)

    # Audit (active, passes) vs denied by the candidate's default.
    out = dp.send(tcp(OTHER, DB, 40001, 22))
    v = out.verdict
    assert out.passed and Verdict(v.verdict) == Verdict.AUDIT
    assert (v.staged_verdict - 1, v.staged_rule) == (Verdict.DENIED, 0)

    # The active policy decides: audit passes what the candidate allows too.
    out = dp.send(udp(OTHER, WEB, 40002, 53))
    v = out.verdict
    assert Verdict(v.verdict) == Verdict.AUDIT
    assert (v.staged_verdict - 1, names[v.staged_rule]) == (Verdict.ALLOWED, "other-web")

    stats = dp.dp.read_staged_stats()
    assert stats == {(Verdict.ALLOWED, False): 1, (Verdict.DENIED, True): 1,
                     (Verdict.ALLOWED, True): 1}
    hits = dp.dp.read_rule_stats("staged_rule_stats_map")
    assert {names[r]: h for r, (h, _t) in hits.items()} == {"web-db-staged": 1, "other-web": 1}


def test_established_packets_do_not_consult_it(dp: Harness) -> None:
    dp.install(ACTIVE)
    _stage(dp, CANDIDATE)
    dp.send(tcp(WEB, DB, 40010, 5432, "S"))
    dp.send(tcp(DB, WEB, 5432, 40010, "SA"), abi.Direction.INGRESS)
    before = dp.dp.read_staged_stats()
    for _ in range(5):
        out = dp.send(tcp(WEB, DB, 40010, 5432, "A"))
        assert out.passed and not out.of_type(abi.EventType.VERDICT)
    assert dp.dp.read_staged_stats() == before


def test_denied_flows_carry_it_through_aggregation(dp: Harness) -> None:
    enforce = Policy(workloads=WORKLOADS)  # default deny
    dp.install(enforce)
    _gen, names = _stage(dp, CANDIDATE)
    dp.dp.write_settings(1_000_000_000, 0)  # aggregate denials in 1 s windows
    out = dp.send(udp(OTHER, WEB, 40020, 53))
    v = out.verdict
    assert out.dropped and Verdict(v.verdict) == Verdict.DENIED
    assert (v.staged_verdict - 1, names[v.staged_rule]) == (Verdict.ALLOWED, "other-web")


def test_cleared_and_restaged(dp: Harness) -> None:
    dp.install(ACTIVE)
    first, _ = _stage(dp, CANDIDATE)
    dp.dp.clear_staged()
    v = dp.send(tcp(OTHER, DB, 40030, 22)).verdict
    assert v.staged_verdict == 0 and dp.dp.staged_generation() == 0
    # A new candidate goes to the other staged slot; its rules are its own.
    second, _names = _stage(dp, Policy(default="allow", workloads=WORKLOADS))
    assert second != first and abi.policy_slot(second) != abi.policy_slot(first)
    assert abi.policy_slot(second) in (2, 3)
    v = dp.send(tcp(OTHER, DB, 40031, 22)).verdict
    assert (v.staged_verdict - 1, v.staged_rule, v.staged_generation) == (
        Verdict.ALLOWED, 0, second)
    # The active generation's slots were not touched.
    assert Verdict(v.verdict) == Verdict.AUDIT and dp.dp.active_generation() == dp.generation


def test_a_lost_sessions_reply_is_still_picked_up(dp: Harness) -> None:
    """The staged stage goes on as the entry program would: a reply whose
    session was lost (denied its own way, allowed the other) still passes
    and opens the session, through the reply stage it tail-calls in turn."""
    enforce = Policy(workloads=WORKLOADS, rules=ACTIVE.rules)
    dp.install(enforce)
    _stage(dp, CANDIDATE)
    out = dp.send(tcp(DB, WEB, 5432, 40040, "A"))  # db -> web: only web -> db is allowed
    assert out.passed
    s = dp.session(WEB, DB, 6)
    assert (s.src_ip, s.dst_ip) == (WEB, DB)          # the originator is web
    out = dp.send(tcp(OTHER, DB, 40041, 5432, "A"))   # neither way: dropped
    assert out.dropped


def test_counters_agree_with_the_events(dp: Harness) -> None:
    """staged_stats_map counts what the events say, packet for packet: a
    GSO denial counts its segments (the event's count), and a lost
    session's reply picked up by the reply stage is no staged judgment
    (its event carries none)."""
    enforce = Policy(workloads=WORKLOADS, rules=ACTIVE.rules)
    dp.install(enforce)
    _stage(dp, Policy(workloads=WORKLOADS))  # deny everything
    # A reply whose session was lost: passes, judged as web -> db's reply.
    out = dp.send(tcp(DB, WEB, 5432, 40050, "A"))
    assert out.passed and all(e.staged_verdict == 0 for e in out.of_type(
        abi.EventType.VERDICT))
    assert dp.dp.read_staged_stats() == {}
    # A denied GSO super-packet of 4 segments: the event counts 4, so do
    # the staged counters.
    out = dp.send(tcp(OTHER, WEB, 40051, 22, "S"), gso_segs=4)
    v = out.verdict
    assert out.dropped and v.count == 4 and v.staged_verdict - 1 == Verdict.DENIED
    assert dp.dp.read_staged_stats() == {(Verdict.DENIED, False): 4}
