"""Drive the loaded program one crafted packet at a time and collect what
it did: the TC action, the events it wrote, the counters it bumped."""

from __future__ import annotations

from typing import NamedTuple

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from microseg.kernel import abi
from microseg.kernel.datapath import Datapath
from microseg.kernel.maps import RINGS
from microseg.kernel.records import RawEvent, SessionEntry, decode_events
from microseg.kernel.ringbuf import RingBuffer
from microseg.policy.compile import CompiledPolicy, compile_policy
from microseg.policy.model import Policy

TC_ACT_OK = 0
TC_ACT_SHOT = 2

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"


def eth(payload: Packet) -> Packet:
    return Ether(src=MAC_A, dst=MAC_B) / payload


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S",
        payload: bytes = b"") -> Packet:
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return eth(ip / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload))


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> Packet:
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return eth(ip / UDP(sport=sport, dport=dport) / Raw(payload))


def ping(src: str, dst: str, ident: int = 7, seq: int = 1, reply: bool = False) -> Packet:
    if ":" in src:
        icmp = ICMPv6EchoReply(id=ident, seq=seq) if reply else ICMPv6EchoRequest(id=ident,
                                                                                  seq=seq)
        return eth(IPv6(src=src, dst=dst) / icmp)
    return eth(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=seq))


class Outcome(NamedTuple):
    action: int
    events: list[RawEvent]

    @property
    def passed(self) -> bool:
        return self.action == TC_ACT_OK

    @property
    def dropped(self) -> bool:
        return self.action == TC_ACT_SHOT

    def of_type(self, t: abi.EventType) -> list[RawEvent]:
        return [e for e in self.events if e.type == t]

    @property
    def verdict(self) -> RawEvent:
        """The one verdict or drop event of this packet."""
        vs = [e for e in self.events if e.type in (abi.EventType.VERDICT, abi.EventType.DROP)]
        assert len(vs) == 1, f"expected one verdict/drop event, got {self.events}"
        return vs[0]

    @property
    def states(self) -> list[tuple[abi.State, abi.State]]:
        """(state, prev_state) of each session event."""
        return [(abi.State(e.state), abi.State(e.prev_state))
                for e in self.of_type(abi.EventType.SESSION)]


class Harness:
    def __init__(self, datapath: Datapath) -> None:
        self.dp = datapath
        # Both rings: denied verdicts and drops have their own.
        self.rings = [RingBuffer(datapath.maps[name].fd, abi.EVENT.size)
                      for name in RINGS.values()]
        self.compiled: CompiledPolicy | None = None

    def drain(self, limit: int = 1 << 20) -> list[RawEvent]:
        """What the rings hold, in time order (each ring is in order; the
        sort is stable)."""
        events = [e for ring in self.rings for e in decode_events(ring.drain(limit).runs)]
        return sorted(events, key=lambda e: e.ts_ns)

    def reset(self) -> None:
        self.dp.reset_state()
        self.dp.clear_staged()
        self.dp.write_settings(0, 0)  # no aggregation; the default handover
        self.drain(1 << 30)

    def install(self, policy: Policy) -> CompiledPolicy:
        self.compiled = compile_policy(policy, self.compiled)
        self.generation = self.dp.apply_policy(self.compiled)
        return self.compiled

    def rule_id(self, name: str) -> int:
        assert self.compiled is not None
        return self.compiled.rule_ids[name]

    def rule_name(self, rule_id: int) -> str | None:
        assert self.compiled is not None
        return self.compiled.rule_names.get(rule_id)

    def send(self, pkt: Packet | bytes,
             direction: abi.Direction = abi.Direction.INGRESS, *, ifindex: int = 0,
             gso_segs: int = 0, repeat: int = 1) -> Outcome:
        data = bytes(pkt)
        res = self.dp.test_run(data, direction, ifindex=ifindex, gso_segs=gso_segs,
                               repeat=repeat)
        return Outcome(res.retval, self.drain())

    def events_pending(self) -> list[RawEvent]:
        return self.drain()

    def stats(self) -> dict[tuple[abi.Direction, abi.Verdict, abi.Reason], tuple[int, int]]:
        return {tuple(k): v for k, v in self.dp.read_stats().items()}

    def sessions(self) -> list[SessionEntry]:
        return list(self.dp.sessions())

    def session(self, src: str, dst: str, proto: int | None = None) -> SessionEntry:
        found = [s for s in self.sessions()
                 if {s.src_ip, s.dst_ip} == {src, dst} and (proto is None or s.proto == proto)]
        assert len(found) == 1, f"expected one session {src}<->{dst}, got {found}"
        return found[0]
