"""Policy decisions made by the real program: allow, deny, default, audit,
deny over allow, port ranges, CIDR nesting, revocation on a new generation."""

from __future__ import annotations

import pytest

from microseg.kernel.abi import Direction, EventType, Reason, State, Verdict
from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

from .harness import TC_ACT_SHOT, Harness, ping, tcp, udp
from .policies import (
    API4,
    CLIENT4,
    DB4,
    DB6,
    OUTSIDE4,
    OUTSIDE6,
    ROGUE4,
    WEB4,
    WEB6,
    WORKLOADS,
    shop,
)


def test_allowed_by_rule_names_the_rule(dp: Harness) -> None:
    dp.install(shop())
    out = dp.send(tcp(WEB4, DB4, 40000, 5432))
    assert out.passed
    v = out.verdict
    assert (v.verdict, v.reason) == (Verdict.ALLOWED, Reason.RULE)
    assert dp.rule_name(v.rule_id) == "web-to-db"
    assert v.generation == dp.generation


def test_no_rule_matches_default_deny(dp: Harness) -> None:
    dp.install(shop())
    out = dp.send(tcp(ROGUE4, DB4, 40000, 5432))
    assert out.dropped
    assert (out.verdict.verdict, out.verdict.reason) == (Verdict.DENIED, Reason.DEFAULT)
    assert out.verdict.rule_id == 0
    assert out.of_type(EventType.SESSION) == []  # a denied flow opens no session


def test_default_allow(dp: Harness) -> None:
    dp.install(shop(default="allow"))
    out = dp.send(udp(ROGUE4, API4, 5000, 53))
    assert out.passed
    assert (out.verdict.verdict, out.verdict.reason) == (Verdict.ALLOWED, Reason.DEFAULT)


def test_explicit_deny_rule(dp: Harness) -> None:
    dp.install(shop())
    out = dp.send(tcp(WEB4, DB4, 40000, 22))
    assert out.dropped
    assert out.verdict.verdict == Verdict.DENIED
    assert dp.rule_name(out.verdict.rule_id) == "no-ssh-to-db"


def test_deny_beats_allow_whatever_the_order(dp: Harness) -> None:
    allow_all = Rule.make("web-any-db", S.of_workload("web"), S.of_workload("db"), "allow")
    deny_5432 = Rule.make("deny-5432", S.any(), S.of_labels({"tier": "db"}), "deny", "tcp",
                          [5432])
    for rules in ((allow_all, deny_5432), (deny_5432, allow_all)):
        dp.reset()
        dp.install(Policy(default="allow", workloads=WORKLOADS, rules=rules))
        out = dp.send(tcp(WEB4, DB4, 40000, 5432))
        assert out.dropped
        assert dp.rule_name(out.verdict.rule_id) == "deny-5432"
        # The allow still decides for what the deny does not cover.
        out = dp.send(udp(WEB4, DB4, 40000, 5432))
        assert out.passed and dp.rule_name(out.verdict.rule_id) == "web-any-db"


def test_first_matching_allow_is_named(dp: Harness) -> None:
    a = Rule.make("first", S.of_workload("web"), S.any(), "allow", "tcp")
    b = Rule.make("second", S.any(), S.of_workload("db"), "allow")
    dp.install(Policy(workloads=WORKLOADS, rules=(a, b)))
    assert dp.rule_name(dp.send(tcp(WEB4, DB4, 1, 2)).verdict.rule_id) == "first"
    assert dp.rule_name(dp.send(udp(WEB4, DB4, 1, 2)).verdict.rule_id) == "second"


@pytest.mark.parametrize(("port", "allowed"), [
    (5432, True), (5431, False), (5433, False), (7999, False), (8000, True), (8063, True),
    (8064, True), (8099, True), (8100, True), (8101, False), (65535, False),
])
def test_port_list_and_range(dp: Harness, port: int, allowed: bool) -> None:
    dp.install(shop())
    out = dp.send(tcp(WEB4, DB4, 40000, port))
    assert out.passed is allowed
    assert out.verdict.verdict == (Verdict.ALLOWED if allowed else Verdict.DENIED)


def test_protocol_must_match(dp: Harness) -> None:
    dp.install(shop())
    assert dp.send(udp(WEB4, DB4, 40000, 5432)).dropped  # rule says tcp


def test_cidr_selector_covers_non_workload_addresses(dp: Harness) -> None:
    dp.install(shop())
    assert dp.send(tcp(CLIENT4, WEB4, 50000, 443)).passed
    assert dp.send(tcp("192.0.3.5", WEB4, 50000, 443)).dropped


def test_cidr_nesting_workload_inside_cidr_matches_both(dp: Harness) -> None:
    """An address of a workload inside a rule's CIDR satisfies the workload's
    selectors and the CIDR selector; a nested more specific CIDR too."""
    lab = Rule.make("lab-net-to-api", S.of_cidr("10.203.0.0/16"), S.of_workload("api"),
                    "allow", "tcp", [9000])
    web_only = Rule.make("web-to-api", S.of_workload("web"), S.of_workload("api"), "allow",
                         "tcp", [9001])
    inner = Rule.make("inner-deny", S.of_cidr("10.203.0.64/26"), S.of_cidr("10.203.0.0/24"),
                      "deny", "tcp", [9000])
    dp.install(Policy(workloads=WORKLOADS, rules=(lab, web_only, inner)))
    # web (10.203.0.10) is in the /16: both its own rule and the CIDR rule.
    assert dp.rule_name(dp.send(tcp(WEB4, API4, 1000, 9000)).verdict.rule_id) == \
        "lab-net-to-api"
    assert dp.rule_name(dp.send(tcp(WEB4, API4, 1001, 9001)).verdict.rule_id) == "web-to-api"
    # An address in the /16 that no workload owns.
    assert dp.send(tcp("10.203.9.9", API4, 1002, 9000)).passed
    assert dp.send(tcp("10.203.9.9", API4, 1003, 9001)).dropped
    # rogue (10.203.0.66) is in the /26 too: the deny wins over the /16 allow.
    out = dp.send(tcp(ROGUE4, API4, 1004, 9000))
    assert out.dropped and dp.rule_name(out.verdict.rule_id) == "inner-deny"


def test_any_matches_unknown_addresses(dp: Harness) -> None:
    anyone = Rule.make("anyone-ping-web", S.any(), S.of_workload("web"), "allow", "icmp")
    dp.install(shop(anyone))
    out = dp.send(ping(OUTSIDE4, WEB4))
    assert out.passed and out.verdict.src_identity == 0  # the world identity
    assert dp.send(ping(OUTSIDE4, API4)).dropped


def test_ipv6_rules(dp: Harness) -> None:
    dp.install(shop())
    assert dp.send(tcp(WEB6, DB6, 40000, 5432)).passed
    assert dp.send(tcp(WEB6, DB6, 40000, 22)).dropped
    assert dp.send(tcp(OUTSIDE6, DB6, 40000, 5432)).dropped


def test_global_audit_mode_passes_would_be_denials(dp: Harness) -> None:
    dp.install(shop(mode="audit"))
    out = dp.send(tcp(WEB4, DB4, 40000, 22))
    assert out.passed
    assert out.verdict.verdict == Verdict.AUDIT
    assert dp.rule_name(out.verdict.rule_id) == "no-ssh-to-db"
    out = dp.send(tcp(ROGUE4, DB4, 40000, 5432))
    assert out.passed and (out.verdict.verdict, out.verdict.reason) == (Verdict.AUDIT,
                                                                          Reason.DEFAULT)
    # Unknown destinations follow the global mode too.
    assert dp.send(udp(WEB4, OUTSIDE4, 1, 2)).verdict.verdict == Verdict.AUDIT
    # Allowed stays allowed.
    assert dp.send(tcp(WEB4, DB4, 40001, 5432)).verdict.verdict == Verdict.ALLOWED


def test_per_workload_audit_applies_to_traffic_to_it(dp: Harness) -> None:
    wl = tuple(Workload.make(w.name, [str(a) for a in w.addresses], dict(w.labels),
                             mode="audit" if w.name == "db" else None) for w in WORKLOADS)
    dp.install(shop(workloads=wl))
    out = dp.send(tcp(ROGUE4, DB4, 40000, 5432))
    assert out.passed and out.verdict.verdict == Verdict.AUDIT
    out = dp.send(tcp(ROGUE4, API4, 40000, 80))  # api enforces
    assert out.dropped and out.verdict.verdict == Verdict.DENIED
    assert dp.send(tcp(DB4, ROGUE4, 40000, 80)).dropped  # FROM db: not audited


def test_workload_enforce_overrides_global_audit(dp: Harness) -> None:
    wl = tuple(Workload.make(w.name, [str(a) for a in w.addresses], dict(w.labels),
                             mode="enforce" if w.name == "db" else None) for w in WORKLOADS)
    dp.install(shop(workloads=wl, mode="audit"))
    assert dp.send(tcp(ROGUE4, DB4, 40000, 5432)).dropped
    assert dp.send(tcp(ROGUE4, API4, 40000, 80)).verdict.verdict == Verdict.AUDIT


def test_audit_session_packets_count_as_audit(dp: Harness) -> None:
    dp.install(shop(mode="audit"))
    dp.send(tcp(ROGUE4, DB4, 40000, 5432, "S"))
    dp.send(tcp(DB4, ROGUE4, 5432, 40000, "SA"))
    out = dp.send(tcp(ROGUE4, DB4, 40000, 5432, "A"))
    assert out.passed and out.of_type(EventType.VERDICT) == []
    assert dp.stats()[(Direction.INGRESS, Verdict.AUDIT, Reason.SESSION)] == (2, 108)


def test_no_policy_fails_closed(dp: Harness) -> None:
    """Before any generation is written, nothing is allowed."""
    from microseg.kernel.datapath import Datapath, DatapathConfig

    fresh = Datapath(DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=1 << 16))
    fresh.load()
    try:
        assert fresh.test_run(bytes(tcp(WEB4, DB4, 1, 5432))).retval == TC_ACT_SHOT
    finally:
        fresh.close()


class TestRevocation:
    def _establish(self, dp: Harness) -> None:
        assert dp.send(tcp(WEB4, DB4, 40000, 5432, "S")).passed
        assert dp.send(tcp(DB4, WEB4, 5432, 40000, "SA")).passed
        assert dp.send(tcp(WEB4, DB4, 40000, 5432, "A")).passed

    def test_session_denied_by_new_generation_is_revoked(self, dp: Harness) -> None:
        dp.install(shop())
        self._establish(dp)
        old_gen = dp.generation
        revoke = Rule.make("revoke-web-db", S.of_workload("web"), S.of_workload("db"), "deny")
        dp.install(shop(revoke))
        assert dp.generation == old_gen + 1
        # The reply direction's next packet is judged in the session's
        # original direction (web -> db:5432) and dropped.
        out = dp.send(tcp(DB4, WEB4, 5432, 40000, "A"))
        assert out.dropped
        v = out.verdict
        assert (v.verdict, v.reason) == (Verdict.DENIED, Reason.REVOKED)
        assert dp.rule_name(v.rule_id) == "revoke-web-db"
        assert v.generation == dp.generation
        closed = out.of_type(EventType.SESSION)
        assert [(e.state, e.prev_state) for e in closed] == [(State.CLOSED, State.ESTABLISHED)]
        assert closed[0].src_ip == WEB4 and closed[0].dport == 5432  # original direction
        assert dp.sessions() == []
        # Later packets find no session and are judged (and denied) afresh.
        out = dp.send(tcp(WEB4, DB4, 40000, 5432, "A"))
        assert out.dropped and out.verdict.reason == Reason.RULE

    def test_session_still_allowed_survives_with_new_generation(self, dp: Harness) -> None:
        dp.install(shop())
        self._establish(dp)
        dp.install(shop(Rule.make("unrelated", S.any(), S.of_workload("api"), "deny")))
        out = dp.send(tcp(DB4, WEB4, 5432, 40000, "A"))
        assert out.passed and out.events == []  # quietly re-judged
        s = dp.session(WEB4, DB4)
        assert s.generation == dp.generation and State(s.state) == State.ESTABLISHED

    def test_audit_generation_reports_would_be_revocation(self, dp: Harness) -> None:
        dp.install(shop())
        self._establish(dp)
        revoke = Rule.make("revoke-web-db", S.of_workload("web"), S.of_workload("db"), "deny")
        dp.install(shop(revoke, mode="audit"))
        out = dp.send(tcp(WEB4, DB4, 40000, 5432, "A"))
        assert out.passed
        assert (out.verdict.verdict, out.verdict.reason) == (Verdict.AUDIT, Reason.REVOKED)
        # Reported once; the session carries on as an audited one.
        out = dp.send(tcp(WEB4, DB4, 40000, 5432, "A"))
        assert out.passed and out.events == []
        assert Verdict(dp.session(WEB4, DB4).verdict) == Verdict.AUDIT

    def test_udp_session_revoked(self, dp: Harness) -> None:
        allow_dns = Rule.make("dns", S.of_workload("web"), S.of_workload("api"), "allow", "udp",
                              [53])
        dp.install(shop(allow_dns))
        assert dp.send(udp(WEB4, API4, 3333, 53)).passed
        assert dp.send(udp(API4, WEB4, 53, 3333)).passed
        dp.install(shop())
        out = dp.send(udp(API4, WEB4, 53, 3333))
        assert out.dropped and out.verdict.reason == Reason.REVOKED
