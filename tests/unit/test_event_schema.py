"""docs/events.schema.json against the events the code really makes.

Kernel records are built as the datapath writes them (struct event, with
the ring buffer's 8-byte record header) and go through the daemon's own
code: the Enricher, the EventHub (which numbers them), the Pipeline's loss
check and the PolicyManager — no kernel. Every event must validate; events
changed by one key, one type or one enum value must not; every event type
of the schema must be produced here; and docs/events.md must name every
field and value the schema knows, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from microseg.flow.enrich import Enricher, Names, TimeFormatter
from microseg.flow.hub import EventHub, ndjson
from microseg.flow.pipeline import Pipeline
from microseg.kernel import abi
from microseg.kernel.clock import monotonic_ns, wall_offset_ns
from microseg.kernel.records import RING_HEADER
from microseg.policy.compile import CompiledPolicy, compile_policy, lookup_identity
from microseg.policy.manager import PolicyManager
from microseg.policy.parse import parse_policy
from tests.schema import SCHEMA_PATH, schema, validate_event, validate_ndjson

EVENTS_MD = SCHEMA_PATH.parent / "events.md"

POLICY = """\
version: 1
mode: enforce
default: deny
workloads:
  client: {addresses: [10.0.0.1, "fd00::1"], labels: {role: client}}
  web: {addresses: [10.0.0.2, "fd00::2"], labels: {tier: web}}
  db: {addresses: [10.0.0.3/32, "fd00::3"], mode: audit}
rules:
  - name: client-to-web
    from: {labels: {role: client}}
    to: {workload: web}
    protocol: tcp
    ports: [80]
    action: allow
  - name: dns
    from: {workload: client}
    to: {workload: db}
    protocol: udp
    ports: [53]
    action: allow
  - name: no-ssh
    from: any
    to: [{workload: web}, {workload: db}]
    protocol: tcp
    ports: [22]
    action: deny
  - name: ping
    from: any
    to: any
    protocol: icmp
    action: allow
  - name: ping6
    from: any
    to: any
    protocol: icmpv6
    action: allow
  - name: partners
    from: {cidr: 192.0.2.0/24}
    to: {workload: web}
    action: allow
"""

GEN = 3            # the generation the datapath says judged the packets
OLD_GEN = 1        # a generation this daemon never applied (an earlier daemon's)
IFINDEX = {7: "msd-client", 8: "msd-web", 9: "msd-db"}
GONE_IF = 42       # an interface that vanished before its events were named
V, R, S, E = abi.Verdict, abi.Reason, abi.State, abi.EventType
F = abi.TcpFlag
ING, EGR = 0, 1


@pytest.fixture(scope="module")
def compiled() -> CompiledPolicy:
    return compile_policy(parse_policy(POLICY.encode(), "policy.yaml").policy)


@pytest.fixture(scope="module")
def enricher(compiled: CompiledPolicy) -> Enricher:
    names = Names(lambda g: compiled if g == GEN else None, IFINDEX.get, lambda: compiled)
    return Enricher(names, TimeFormatter(wall_offset_ns()), lambda: GEN)


def addr(ip: str) -> bytes:
    """A 16-byte address field: IPv4 in its first 4 bytes."""
    return ipaddress.ip_address(ip).packed.ljust(16, b"\0")


def family_of(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def pack(layout: abi.Layout, **values: object) -> bytes:
    """A record of `layout` from its fields by name (arrays as tuples; the
    rest zero), as the C program lays it out."""
    unknown = set(values) - set(layout.names())
    assert not unknown, f"struct {layout.c_name} has no field {unknown}"
    args: list[object] = []
    for name, fmt in layout.fields:
        if name.startswith("_"):
            continue
        m = re.fullmatch(r"(\d*)(\w)", fmt)
        assert m, fmt
        count, code = int(m.group(1) or 1), m.group(2)
        if code != "s" and count > 1:
            args.extend(values.get(name, (0,) * count))  # type: ignore[arg-type]
        else:
            args.append(values.get(name, b"" if code == "s" else 0))
    return layout.struct.pack(*args)


class Kernel:
    """Records as the datapath writes them: ring-buffer records and
    session_map entries, as bytes."""

    def __init__(self, compiled: CompiledPolicy) -> None:
        self.compiled = compiled
        self.now = monotonic_ns()

    def identity(self, ip: str) -> int:
        e = lookup_identity(self.compiled, ip)
        return e.identity if e is not None else 0

    def rule_id(self, name: str | None) -> int:
        return self.compiled.rule_ids[name] if name else 0

    def record(self, etype: int, src: str, dst: str, proto: int, sport: int = 0,
               dport: int = 0, *, verdict: int = 0, reason: int = 0, rule: str | None = None,
               gen: int = GEN, direction: int = ING, ifindex: int = 7, flags: int = 0,
               length: int = 74, state: int = 0, prev: int = 0, family: int | None = None,
               judged: bool = True, created_ago_ns: int = 0,
               packets: tuple[int, int] | None = None, byts: tuple[int, int] | None = None,
               count: int = 1, audit: bool = False) -> bytes:
        """One ring-buffer record: its 8-byte header, then struct event.
        judged: the policy looked the endpoints up (a drop before the lookup
        carries no identities and generation 0). Verdicts and drops carry
        their count (and its bytes) in packets[0] and bytes[0]."""
        self.now += 1_000
        if etype != E.SESSION:
            packets, byts = packets or (count, 0), byts or (count * length, 0)
        packets, byts = packets or (0, 0), byts or (0, 0)
        return bytes(RING_HEADER) + pack(
            abi.EVENT, ts_ns=self.now, created_ns=self.now - created_ago_ns, packets=packets,
            bytes=byts, saddr=addr(src), daddr=addr(dst), ifindex=ifindex,
            rule_id=self.rule_id(rule), generation=gen if judged else 0, pkt_len=length,
            src_identity=self.identity(src) if judged else 0,
            dst_identity=self.identity(dst) if judged else 0, sport=sport, dport=dport,
            type=etype, verdict=verdict, reason=reason, direction=direction,
            family=family_of(src) if family is None else family, proto=proto,
            tcp_flags=flags, state=state, prev_state=prev,
            flags=abi.EventFlag.AUDIT if audit else 0)

    def session_entry(self, src: str, dst: str, proto: int, sport: int, dport: int, *,
                      state: int, rule: str | None, gen: int = GEN, ifindex: int = 7,
                      packets: tuple[int, int] = (1, 1), byts: tuple[int, int] = (60, 60),
                      age_ns: int = 40_000_000_000) -> tuple[bytes, bytes]:
        """A session_map entry (key, value) under its canonical key."""
        (alo, plo), (ahi, phi) = sorted([(addr(src), sport), (addr(dst), dport)])
        key = pack(abi.SESSION_KEY, addr_lo=alo, addr_hi=ahi, port_lo=plo, port_hi=phi,
                   proto=proto, family=family_of(src))
        value = pack(abi.SESSION_VALUE, created_ns=self.now - age_ns, packets=packets,
                     bytes=byts, rule_id=self.rule_id(rule), generation=gen,
                     owner=(ifindex << 1, 0), src_identity=self.identity(src),
                     dst_identity=self.identity(dst), state=state,
                     flags=abi.SessionFlag.ORIG_LO if alo == addr(src) else 0,
                     verdict=V.ALLOWED, reason=R.RULE)
        return key, value


def kernel_records(k: Kernel) -> list[bytes]:
    """Every kind of record the datapath writes, over v4 and v6."""
    tcp, udp, icmp, icmp6, gre = 6, 17, 1, 58, 47
    c4, w4, d4, c6, w6, d6 = "10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2", "fd00::3"
    syn, synack, ack, fin_ack, rst = F.SYN, F.SYN | F.ACK, F.ACK, F.FIN | F.ACK, F.RST
    vt, dr, se = int(E.VERDICT), int(E.DROP), int(E.SESSION)
    out = []
    # A TCP session's life, v4 and v6: verdict, new, established, closing, closed.
    for c, w in ((c4, w4), (c6, w6)):
        out += [
            k.record(vt, c, w, tcp, 40000, 80, verdict=V.ALLOWED, reason=R.RULE,
                     rule="client-to-web", flags=syn),
            k.record(se, c, w, tcp, 40000, 80, state=S.NEW, rule="client-to-web", flags=syn,
                     packets=(1, 0), byts=(74, 0)),
            k.record(se, c, w, tcp, 40000, 80, state=S.ESTABLISHED, prev=S.NEW,
                     rule="client-to-web", flags=ack, packets=(2, 1), byts=(140, 74)),
            k.record(se, c, w, tcp, 40000, 80, state=S.CLOSING, prev=S.ESTABLISHED,
                     rule="client-to-web", flags=fin_ack, direction=EGR, ifindex=8),
            k.record(se, c, w, tcp, 40000, 80, state=S.CLOSED, prev=S.CLOSING,
                     rule="client-to-web", flags=ack, created_ago_ns=1_234_567_000,
                     packets=(6, 5), byts=(420, 1337)),
        ]
    out += [
        # Denied: by the default, by a rule; audited (db is in audit mode).
        k.record(vt, c4, w4, tcp, 40001, 81, verdict=V.DENIED, reason=R.DEFAULT, flags=syn),
        k.record(vt, c6, w6, tcp, 40002, 22, verdict=V.DENIED, reason=R.RULE, rule="no-ssh",
                 flags=syn),
        k.record(vt, c4, d4, tcp, 40003, 22, verdict=V.AUDIT, reason=R.RULE, rule="no-ssh",
                 flags=syn),
        k.record(vt, c6, d6, udp, 5353, 54, verdict=V.AUDIT, reason=R.DEFAULT),
        # UDP, ICMP, ICMPv6 and a protocol without a name (GRE): ports null for ICMP.
        k.record(vt, c4, d4, udp, 5353, 53, verdict=V.ALLOWED, reason=R.RULE, rule="dns"),
        k.record(se, c4, d4, udp, 5353, 53, state=S.NEW, rule="dns"),
        k.record(vt, c4, w4, icmp, 7, 7, verdict=V.ALLOWED, reason=R.RULE, rule="ping"),
        k.record(vt, c6, w6, icmp6, 9, 9, verdict=V.ALLOWED, reason=R.RULE, rule="ping6"),
        k.record(vt, c4, w4, gre, verdict=V.DENIED, reason=R.DEFAULT),
        # From outside every workload (a CIDR rule's identity: no workload).
        k.record(vt, "192.0.2.7", w4, udp, 1234, 8080, verdict=V.ALLOWED, reason=R.RULE,
                 rule="partners"),
        k.record(vt, "203.0.113.9", w4, tcp, 1234, 443, verdict=V.DENIED, reason=R.DEFAULT,
                 flags=syn),
        # On a reload: revoked (closed, and the packet's verdict), and audited revocation.
        k.record(se, c4, w4, tcp, 40010, 80, state=S.CLOSED, prev=S.ESTABLISHED,
                 rule="client-to-web", flags=ack, created_ago_ns=5_000_000_000,
                 packets=(10, 9), byts=(900, 8000)),
        k.record(vt, c4, w4, tcp, 40010, 80, verdict=V.DENIED, reason=R.REVOKED, flags=ack),
        k.record(vt, c4, d4, udp, 5353, 53, verdict=V.AUDIT, reason=R.REVOKED),
        # Mid-stream pickup: the session starts established (no "new").
        k.record(vt, c4, w4, tcp, 40011, 80, verdict=V.ALLOWED, reason=R.RULE,
                 rule="client-to-web", flags=ack),
        k.record(se, c4, w4, tcp, 40011, 80, state=S.ESTABLISHED, rule="client-to-web",
                 flags=ack, packets=(1, 0), byts=(66, 0)),
        # Drops: state (SYN-ACK without a SYN), fragment (v6 orphan), invalid
        # (bad TCP flags; and a frame whose IP header could not be read).
        k.record(dr, w4, c4, tcp, 80, 40020, verdict=V.DROPPED, reason=R.STATE, flags=synack,
                 direction=EGR, ifindex=8, judged=False),
        k.record(dr, c6, d6, udp, 0, 0, verdict=V.DROPPED, reason=R.FRAGMENT, judged=False),
        k.record(dr, c4, w4, tcp, 40021, 80, verdict=V.DROPPED, reason=R.INVALID,
                 flags=F.SYN | F.FIN, judged=False),
        k.record(dr, "::", "::", 0, verdict=V.DROPPED, reason=R.INVALID, family=0,
                 judged=False, length=20),
        # Aggregated: one event for 250 denied packets of one flow; an
        # audited would-be drop (audit mode let it pass).
        k.record(vt, c4, w4, tcp, 40022, 81, verdict=V.DENIED, reason=R.DEFAULT, flags=syn,
                 count=250),
        k.record(dr, w4, d4, tcp, 80, 40023, verdict=V.AUDIT, reason=R.STATE, flags=synack,
                 judged=False, audit=True, count=3),
        # An interface gone before the record was read; a RST.
        k.record(vt, c4, w4, tcp, 40030, 80, verdict=V.ALLOWED, reason=R.RULE,
                 rule="client-to-web", flags=rst, ifindex=GONE_IF),
        # Left in the ring by an earlier daemon: its rule numbers mean nothing here.
        k.record(vt, c4, w4, tcp, 40040, 80, verdict=V.ALLOWED, reason=R.RULE,
                 rule="client-to-web", gen=OLD_GEN, flags=syn),
    ]
    return out


def expired_entries(k: Kernel) -> list[tuple[bytes, bytes]]:
    return [
        k.session_entry("10.0.0.1", "10.0.0.3", 17, 5353, 53, state=S.ESTABLISHED, rule="dns"),
        k.session_entry("fd00::1", "fd00::2", 6, 40050, 80, state=S.SYN_RECV,
                        rule="client-to-web", ifindex=GONE_IF),
        k.session_entry("10.0.0.2", "10.0.0.1", 1, 7, 7, state=S.NEW, rule="ping",
                        packets=(1, 0), byts=(98, 0)),
        k.session_entry("fd00::1", "fd00::3", 6, 40051, 5432, state=S.CLOSING, rule=None),
    ]


class FakeDatapath:
    """What PolicyManager and Pipeline ask of the datapath, without a kernel."""

    def __init__(self) -> None:
        self.gen = 0
        self.lost = 0

    def apply_policy(self, compiled: CompiledPolicy, converge: bool = True) -> int:
        self.gen += 1
        return self.gen

    def converge(self) -> None:
        pass

    def read_event_stats(self) -> dict:
        return {(abi.Ring.DENIALS, abi.EventType.VERDICT): (1000, self.lost),
                (abi.Ring.EVENTS, abi.EventType.SESSION): (10, 0)}


def policy_events(tmp: Path) -> list[dict]:
    """`policy` events as the daemon publishes them: applied, then rejected."""
    hub = EventHub()
    path = tmp / "policy.yaml"
    path.write_text(POLICY)

    async def go() -> None:
        pm = PolicyManager(FakeDatapath(), str(path), publish=hub.publish)
        try:
            assert (await pm.reload("start", force=True)).result == "applied"
            path.write_text(POLICY.replace("ports: [80]", "ports: [0, 70000]")
                            .replace("action: deny", "action: drop"))
            assert (await pm.reload("file changed")).result == "rejected"
            path.unlink()
            assert (await pm.reload("SIGHUP", force=True)).result == "rejected"
        finally:
            await pm.converge_now()

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()  # the manager freezes what it compiled; not this test's business
    return list(hub.recent)


@pytest.fixture(scope="module")
def events(compiled: CompiledPolicy, enricher: Enricher,
           tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every event below, numbered by one hub as the daemon numbers them."""
    k = Kernel(compiled)
    hub = EventHub()
    slow = hub.subscribe(size=4)
    out: list[dict] = []

    # The pipeline: a drained batch of ring records, then the kernel's loss counters.
    dp = FakeDatapath()
    pipeline = Pipeline(dp, hub, enricher.names, lambda: GEN)
    pipeline.enricher = enricher
    pipeline._check_loss()  # the baseline
    batch = enricher.events([b"".join(kernel_records(k))])  # one drained run
    hub.publish_batch(batch)
    dp.lost = 17
    pipeline._check_loss()
    # The sweeper's expired sessions, in a batch of their own.
    hub.publish_batch(enricher.expired(expired_entries(k), k.now + 10**9, IFINDEX.get))
    out += list(hub.recent)

    # The slow subscriber fell behind: its stream opens with a `lost` report.
    got = slow.take(100)
    assert got[0]["type"] == "lost" and got[0]["source"] == "subscriber"
    assert got[0]["count"] == len(hub.recent) - 4
    out.append(got[0])

    out += policy_events(tmp_path_factory.mktemp("policy"))
    return out


def by_type(events: list[dict], t: str) -> list[dict]:
    return [e for e in events if e["type"] == t]


# -- every real event validates ---------------------------------------------------

def test_every_event_the_code_makes_validates(events: list[dict]) -> None:
    assert len(events) > 40
    for e in events:
        validate_event(e)
    # Serialised as the API and the flow log write them, too.
    for line in ndjson(events).splitlines():
        validate_event(json.loads(line))


def test_the_events_cover_what_the_schema_describes(events: list[dict]) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert {e["type"] for e in events} == set(schema["properties"]["type"]["enum"])
    seen = {(e["type"], key, json.dumps(e.get(key))) for e in events
            for key in ("verdict", "reason", "state", "prev_state", "result", "source",
                        "family", "protocol", "direction")}
    for want in [("verdict", "verdict", '"audit"'), ("verdict", "reason", '"revoked"'),
                 ("drop", "reason", '"invalid"'), ("drop", "reason", '"fragment"'),
                 ("drop", "reason", '"state"'), ("drop", "family", "null"),
                 ("session", "state", '"expired"'), ("session", "prev_state", "null"),
                 ("session", "direction", "null"), ("verdict", "protocol", "47"),
                 ("verdict", "protocol", '"icmpv6"'), ("lost", "source", '"ringbuf"'),
                 ("lost", "source", '"subscriber"'), ("policy", "result", '"rejected"')]:
        assert want in seen, want


def test_what_the_events_say(events: list[dict]) -> None:
    """The documented null rules, on the events themselves."""
    for e in by_type(events, "verdict") + by_type(events, "drop"):
        if e["protocol"] in ("icmp", "icmpv6"):
            assert e["src"]["port"] is None and e["dst"]["port"] is None
        if e["protocol"] != "tcp":
            assert e["tcp_flags"] == []
    (gre,) = [e for e in by_type(events, "verdict") if e["protocol"] == 47]
    assert gre["src"]["port"] == 0 and gre["rule"] is None and gre["reason"] == "default"
    (outside,) = [e for e in events if e.get("rule") == "partners"]
    assert outside["src"] == {"ip": "192.0.2.7", "port": 1234, "workload": None}
    (gone,) = [e for e in by_type(events, "verdict") if e["src"]["port"] == 40030]
    assert gone["interface"] is None and gone["tcp_flags"] == ["RST"]
    (old,) = [e for e in by_type(events, "verdict") if e["src"]["port"] == 40040]
    assert old["rule"] is None and old["src"]["workload"] == "client"  # named by address
    (synack,) = [e for e in by_type(events, "drop") if e["reason"] == "state"
                 and not e["audit"]]
    assert synack["tcp_flags"] == ["SYN", "ACK"] and synack["policy_generation"] == GEN
    assert synack["src"]["workload"] == "web" and synack["rule"] is None
    assert synack["verdict"] == "dropped" and synack["count"] == 1
    (audited,) = [e for e in by_type(events, "drop") if e["audit"]]
    assert (audited["verdict"], audited["reason"], audited["count"]) == ("audit", "state", 3)
    (flood,) = [e for e in by_type(events, "verdict") if e["count"] > 1]
    assert (flood["verdict"], flood["count"], flood["bytes"]) == ("denied", 250, 250 * 74)
    (closed,) = [e for e in by_type(events, "session") if e["state"] == "closed"
                 and e["family"] == "ipv6"]
    assert closed["packets"] == {"orig": 6, "reply": 5}
    assert closed["duration_s"] == pytest.approx(1.234567)
    expired = [e for e in by_type(events, "session") if e["state"] == "expired"]
    assert {e["prev_state"] for e in expired} == {"new", "established", "closing"}
    assert len({e["time"] for e in expired}) == 1  # one sweep, one time
    applied, rejected, missing = by_type(events, "policy")
    assert applied["result"] == "applied" and applied["rules"] == 6 and not applied["errors"]
    assert rejected["result"] == "rejected" and rejected["sha256"] is None
    assert any(re.search(r"policy\.yaml:\d+:\d+: ", x) for x in rejected["errors"])
    assert rejected["generation"] == applied["generation"] and missing["errors"]


def test_seq_numbers_every_event_once(events: list[dict]) -> None:
    published = [e for e in events if not (e["type"] == "lost"
                                           and e["source"] == "subscriber")]
    # The policy manager's events had a hub of their own.
    kernel_and_sweeper = [e for e in published if e["type"] not in ("policy", "workload")]
    seqs = [e["seq"] for e in kernel_and_sweeper]
    assert seqs == list(range(1, len(seqs) + 1))
    ringbuf = [e for e in events if e["type"] == "lost" and e["source"] == "ringbuf"]
    assert [e["count"] for e in ringbuf] == [17]


def test_validate_ndjson_reads_a_flow_log(events: list[dict], tmp_path: Path) -> None:
    log = tmp_path / "flow.log"
    log.write_bytes(ndjson(events) * 20 + b"\n")
    assert validate_ndjson(log) == 20 * len(events)
    bad = copy.deepcopy(events[0])
    bad["bytes"] = "74"
    log.write_bytes(ndjson(events) + ndjson([bad]))
    where = rf"flow\.log:{len(events) + 1}: event\.bytes must be integer"
    with pytest.raises(AssertionError, match=where):
        validate_ndjson(log)


# -- drift fails --------------------------------------------------------------------

def mutations() -> Iterator[tuple[str, str, object]]:
    """(label, event type, how to change one event of that type)."""
    def setter(path: str, value: object):
        def change(e: dict) -> None:
            *parents, last = path.split(".")
            for p in parents:
                e = e[p]
            e[last] = value
        return change

    def deleter(path: str):
        def change(e: dict) -> None:
            *parents, last = path.split(".")
            for p in parents:
                e = e[p]
            del e[last]
        return change

    yield "extra key", "verdict", setter("node", None)
    yield "staged without its rule", "verdict", setter("staged", {"verdict": "denied"})
    yield "staged verdict dropped", "verdict", setter("staged", {"verdict": "dropped",
                                                                  "rule": None})
    yield "extra key in an endpoint", "verdict", setter("src.node", "n1")
    yield "renamed key", "verdict", lambda e: e.__setitem__("generation",
                                                            e.pop("policy_generation"))
    yield "missing key", "verdict", deleter("tcp_flags")
    yield "missing endpoint key", "session", deleter("dst.workload")
    yield "wrong verdict", "verdict", setter("verdict", "deny")
    yield "drop reason on a verdict", "verdict", setter("reason", "state")
    yield "wrong state", "session", setter("state", "open")
    yield "wrong direction", "verdict", setter("direction", "in")
    yield "wrong family", "verdict", setter("family", "inet")
    yield "wrong flag", "verdict", setter("tcp_flags", ["syn"])
    yield "named protocol as a number", "verdict", setter("protocol", 6)
    yield "protocol out of range", "verdict", setter("protocol", 256)
    yield "string for a number", "verdict", setter("bytes", "74")
    yield "float for an integer", "verdict", setter("bytes", 74.5)
    yield "string for a port", "verdict", setter("dst.port", "80")
    yield "port out of range", "verdict", setter("dst.port", 70000)
    yield "string seq", "verdict", setter("seq", "1")
    yield "time without microseconds", "verdict", setter("time", "2026-11-27T09:00:00Z")
    yield "time not UTC", "verdict", setter("time", "2026-11-27T09:00:00.000000+01:00")
    yield "drop without its rule key", "drop", deleter("rule")
    yield "closed session without counters", "session", lambda e: (
        e.update(state="closed", packets=None))
    yield "open session with a duration", "session", lambda e: (
        e.update(state="established", duration_s=1.5, packets=None, bytes=None))
    yield "counters as a number", "session", lambda e: e.update(
        state="expired", packets=3, bytes={"orig": 1, "reply": 2}, duration_s=1.0)
    yield "applied policy with errors", "policy", lambda e: (
        e.update(result="applied", errors=["x"]))
    yield "policy apply_ms as text", "policy", setter("apply_ms", "12")
    yield "lost count zero", "lost", setter("count", 0)
    yield "lost source unknown", "lost", setter("source", "disk")
    yield "unknown type", "lost", setter("type", "workload")


@pytest.mark.parametrize(("label", "kind", "change"), list(mutations()),
                         ids=[m[0] for m in mutations()])
def test_drift_fails(events: list[dict], label: str, kind: str, change) -> None:
    original = next(e for e in events if e["type"] == kind)
    e = copy.deepcopy(original)  # endpoints are shared between events: never mutate them
    validate_event(e)
    change(e)
    with pytest.raises(AssertionError):
        validate_event(e)
    assert not Draft7Validator(schema()).is_valid(e), "jsonschema agrees"


def test_the_failure_names_the_path(events: list[dict]) -> None:
    e = copy.deepcopy(next(x for x in by_type(events, "verdict")))
    e["dst"]["port"] = "80"
    with pytest.raises(AssertionError, match=r"event\.dst\.port") as info:
        validate_event(e)
    assert '"seq":' in str(info.value)


# -- the documentation and the schema agree ----------------------------------------

def schema_words() -> tuple[set[str], set[str]]:
    """Every property name and every string enum/const value of the schema."""
    schema = json.loads(SCHEMA_PATH.read_text())
    keys: set[str] = set()
    values: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            values.update(v for v in node.get("enum", []) if isinstance(v, str))
            if isinstance(node.get("const"), str):
                values.add(node["const"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return keys, values


def test_events_md_names_every_field_and_value() -> None:
    text = EVENTS_MD.read_text()
    keys, values = schema_words()
    missing_keys = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing_keys, f"docs/events.md does not describe: {missing_keys}"
    missing_values = sorted(v for v in values if v not in text)
    assert not missing_values, f"docs/events.md does not mention: {missing_values}"


def test_events_md_examples_validate() -> None:
    """Every JSON line in docs/events.md's examples is a valid event."""
    text = EVENTS_MD.read_text()
    examples = [json.loads(line) for line in re.findall(r"^\{\"time\".*\}$", text, re.M)]
    assert len(examples) >= 8
    for e in examples:
        validate_event(e)
    assert {e["type"] for e in examples} == {"verdict", "drop", "session", "policy", "lost",
                                             "workload"}


def test_the_schema_is_valid_draft_07() -> None:
    Draft7Validator.check_schema(schema())


def test_fastjsonschema_and_jsonschema_agree(events: list[dict]) -> None:
    """Two implementations of the standard say the same of every event and
    of every drifted one: the schema means what it says."""
    exact = Draft7Validator(schema())
    cases = [copy.deepcopy(e) for e in events]
    for _label, kind, change in mutations():
        e = copy.deepcopy(next(x for x in events if x["type"] == kind))
        change(e)
        cases.append(e)
    lost = next(e for e in events if e["type"] == "lost")
    cases += [{**lost, "count": 2.0}, {**lost, "count": True}, {**lost, "seq": 1.5},
              {"type": "lost"}, {},
              {**lost, "type": None}]
    for e in cases:
        try:
            validate_event(e)
            fast = True
        except AssertionError:
            fast = False
        assert fast == exact.is_valid(e), e


def test_ipv4_and_ipv6_sharing_the_address_field_are_named_apart(
        compiled: CompiledPolicy) -> None:
    """10.0.0.1 and a00:1:: fill the 16-byte address field with the same
    bytes: the enricher's caches must still tell them apart (they did not:
    whichever came first named both)."""
    names = Names(lambda g: compiled if g == GEN else None, IFINDEX.get, lambda: compiled)
    en = Enricher(names, TimeFormatter(wall_offset_ns()), lambda: GEN)
    k = Kernel(compiled)
    v4 = k.record(E.VERDICT, "10.0.0.1", "10.0.0.2", 6, 40000, 80, rule="client-to-web")
    v6 = k.record(E.VERDICT, "a00:1::", "10.0.0.2", 6, 40000, 80, family=6, judged=False)
    first, second = en.events([v4 + v6])
    assert (first["family"], first["src"]["ip"]) == ("ipv4", "10.0.0.1")
    assert (second["family"], second["src"]["ip"]) == ("ipv6", "a00:1::")
    assert first["src"]["workload"] == "client" and second["src"]["workload"] is None
