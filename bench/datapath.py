"""Datapath cost per packet through BPF_PROG_TEST_RUN, next to the floor.

Every figure comes from the same run, interleaved round by round: an empty
TC program (the floor) and microseg for established TCP, a denied packet
(with its event) and a new allowed flow, IPv4 and IPv6 — with N sessions
and a large policy loaded, then again with a 10-rule policy to show the cost
does not follow the rule count.

Method: the kernel runs one packet `repeat` times and reports the mean ns
per run; each figure is the median over `runs` such runs. The ring buffer
(256 MiB) holds a whole run's events and is drained between runs, so no
reader competes with the measured program for the CPUs. A new flow cannot
repeat (its second run is an established packet), so new flows go through
the benchmark harness entry of bpf/microseg.bpf.c (compiled only here): it
rewrites the TCP source port from a per-CPU counter, then runs the real
ingress path, so every repetition is a new session. Its floor is the same
rewrite with nothing after it. A run creates `new_flows` sessions; they are
deleted before the next run.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from microseg.kernel import abi, bpfsys
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.kernel.maps import RINGS
from microseg.kernel.records import addr16, session_key
from microseg.kernel.ringbuf import RingBuffer
from microseg.policy.compile import compile_policy
from microseg.policy.model import Policy

from .policygen import synthetic_policy, workload_ip4, workload_ip6

# The production program plus the new-flow harness (bench/bpf/harness.bpf.c).
HARNESS = Path(__file__).with_name("bpf") / "harness.bpf.c"
BENCH_CTL = abi.Layout("bench_ctl", (
    ("sport_off", "I"), ("base", "I"), ("next", "I"), ("forget", "I"),
))


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: str) -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip
                 / TCP(sport=sport, dport=dport, flags=flags))


@dataclass
class Scenario:
    name: str
    policy: Policy
    sessions: int


def session_batches(n: int, gen: int, *, created_ns: int, last_seen: int,
                    chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
    """n established TCP sessions between workload addresses, as the
    datapath would have left them: (keys, values, count) for update_batch."""
    ks = abi.SESSION_KEY.struct
    keys, values = bytearray(), bytearray()
    for i in range(n):
        a = bytes(map(int, workload_ip4(i % 1000).split("."))) + bytes(12)
        b = bytes(map(int, workload_ip4((i + 1) % 1000).split("."))) + bytes(12)
        sport, dport = 10000 + i // 1000, 443
        key = session_key(4, 6, a, b, sport, dport)  # the datapath's canonical order
        lo = key[:16] == a
        keys += key
        values += abi.SESSION_VALUE.pack(
            created_ns=created_ns, last_seen=last_seen, seen=(last_seen, last_seen),
            packets=(10, 10), bytes=(1000, 1000), rule_id=1, generation=gen, owner=(2, 4),
            src_identity=1, dst_identity=2, state=abi.State.ESTABLISHED,
            flags=abi.SessionFlag.ORIG_LO if lo else 0, verdict=abi.Verdict.ALLOWED,
            reason=abi.Reason.RULE)
        if len(keys) >= chunk * ks.size or i == n - 1:
            yield bytes(keys), bytes(values), len(keys) // ks.size
            keys.clear()
            values.clear()


def fill_sessions(dp: Datapath, n: int, gen: int) -> None:
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    for keys, values, count in session_batches(n, gen, created_ns=now, last_seen=now):
        dp.maps["session_map"].update_batch(keys, values, count)


PRIMITIVES = Path(__file__).with_name("bpf") / "primitives.bpf.c"
# Its struct session4_key: an IPv4 session's key with IPv4's fields only.
SESSION4_KEY = abi.Layout("session4_key", (
    ("addr_lo", "4s"), ("addr_hi", "4s"), ("port_lo", "H"), ("port_hi", "H"),
    ("proto", "B"), ("_pad", "3x"),
))


def primitives(runs: int, new_flows: int, sessions: int) -> dict:
    """The kernel's own cost, on this machine, of the two map operations any
    stateful firewall keeping its sessions in hash tables pays for a new flow
    (bench/bpf/primitives.bpf.c): a lookup that misses in a table of 2^20
    sessions holding `sessions`, and an insert into an LRU hash of 2^18;
    microseg's key and value sizes, a new key every repetition, over a floor
    that only makes the key. Interleaved; the LRU emptied between runs.
    And an established packet's: a lookup that finds one of those sessions
    (hit), and the same with an IPv4-only 16-byte key (hit4), over a floor
    that copies the key."""
    from bcc import BPF

    bpf = BPF(src_file=str(PRIMITIVES).encode(),
              cflags=[f"-I{PRIMITIVES.parent}", "-Wno-unused-function", "-O1"])
    try:
        fds = {n: bpf.load_func(f"prim_{n}".encode(), _SCHED_CLS).fd
               for n in ("floor", "miss", "insert", "hit_floor", "hit", "hit4")}
        big = bpfsys.BpfMap(bpf.get_table(b"big_map").map_fd)
        one_way = bpfsys.BpfMap(bpf.get_table(b"one_way_map").map_fd)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for keys, values, count in session_batches(sessions, 1, created_ns=now,
                                                   last_seen=now):
            big.update_batch(keys, values, count)
        # The hit rows' session: the first of those, and its IPv4-only twin.
        key, value = keys[:abi.SESSION_KEY.size], values[:abi.SESSION_VALUE.size]
        lo, hi, port_lo, port_hi, proto, _family = abi.SESSION_KEY.struct.unpack(key)
        key4 = SESSION4_KEY.pack(addr_lo=lo[:4], addr_hi=hi[:4], port_lo=port_lo,
                                 port_hi=port_hi, proto=proto)
        bpfsys.BpfMap(bpf.get_table(b"hit_key_map").map_fd).update(bytes(4), key)
        bpfsys.BpfMap(bpf.get_table(b"hit4_key_map").map_fd).update(bytes(4), key4)
        bpfsys.BpfMap(bpf.get_table(b"big4_map").map_fd).update(key4, value)
        pkt = tcp_packet("10.0.0.1", "10.0.0.2", 1, 80, "S")
        for n in ("hit", "hit4"):  # a miss here would be measured as a hit
            assert bpfsys.prog_test_run(fds[n], pkt).retval == 0, f"{n}: session not found"
        samples: dict[str, list[float]] = {n: [] for n in fds}
        for _ in range(runs):
            for name, fd in fds.items():
                samples[name].append(
                    bpfsys.prog_test_run(fd, pkt, repeat=new_flows).duration_ns)
                for keys, _values, count in list(one_way.lookup_batch_raw()):
                    one_way.delete_batch(keys, count)
        floors = {n: statistics.median(samples["hit_floor" if n.startswith("hit")
                                               else "floor"]) for n in samples}
        return {name: {"median_ns": statistics.median(v), "runs_ns": v,
                       "over_floor_ns": statistics.median(v) - floors[name]}
                for name, v in samples.items()}
    finally:
        bpf.cleanup()


def measure(runs: int = 5, repeat: int = 1_000_000, new_flows: int = 60_000,
            sessions: int = 100_000, big_rules: int = 10_000,
            workloads: int = 1_000) -> dict:
    from bcc import BPF

    floor_bpf = BPF(text=b"int empty_tc(struct __sk_buff *skb) { return 0; }")
    floor_fd = floor_bpf.load_func(b"empty_tc", BPF.SCHED_CLS).fd
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1 << 20,
                                 ringbuf_bytes=1 << 28, source=HARNESS))
    load = dp.load()
    ring = Rings(dp)
    dp.l3_programs()
    # The verifier's own figures on this kernel, per program.
    results: dict = {"compile_s": round(load.compile_s, 3), "load_s": round(load.load_s, 3),
                     "verifier": dp.verifier_figures(measure=True), "scenarios": {}}
    try:
        for label, n_rules in (("rules_10000", big_rules), ("rules_10", 10)):
            pol = synthetic_policy(workloads, n_rules)
            t0 = time.perf_counter()
            compiled = compile_policy(pol)
            t1 = time.perf_counter()
            dp.reset_state()
            gen = dp.apply_policy(compiled)
            t2 = time.perf_counter()
            fill_sessions(dp, sessions, gen)
            results["scenarios"][label] = _scenario(dp, ring, floor_fd, pol, runs, repeat,
                                                    new_flows, workloads)
            results["scenarios"][label].update(
                compile_s=round(t1 - t0, 3), apply_s=round(t2 - t1, 3),
                policy_entries=len(compiled.entries), sessions=dp.session_count())
    finally:
        ring.close()
        dp.close()
        floor_bpf.cleanup()
    results["primitives"] = primitives(runs, new_flows, sessions)
    return results


def _allowed_pair(pol: Policy) -> tuple[int, int, int]:
    """A (src workload, dst workload, port) some allow rule admits."""
    for r in pol.rules:
        s, d = r.sources[0], r.destinations[0]
        if (r.action == "allow" and s.kind == d.kind == "workload" and r.protocol == 6
                and r.ports):
            return int(s.workload[1:]), int(d.workload[1:]), r.ports[0][0]
    raise ValueError("no workload-to-workload tcp allow rule")


def _scenario(dp: Datapath, ring: Rings, floor_fd: int, pol: Policy, runs: int,
              repeat: int, new_flows: int, workloads: int) -> dict:
    src, dst, port = _allowed_pair(pol)
    s4, d4 = workload_ip4(src), workload_ip4(dst)
    s6, d6 = workload_ip6(src), workload_ip6(dst)
    # Establish one v4 and one v6 session through the program itself.
    for a, b in ((s4, d4), (s6, d6)):
        for pkt in (tcp_packet(a, b, 40000, port, "S"), tcp_packet(b, a, port, 40000, "SA"),
                    tcp_packet(a, b, 40000, port, "A")):
            assert dp.test_run(pkt).retval == 0
    ring.drain(1 << 30)
    # Denied: default deny between two workloads no rule pairs (checked).
    rogue4, rogue6 = "10.99.0.1", "fd00:99::1"
    deny4 = tcp_packet(rogue4, d4, 40000, port, "S")
    deny6 = tcp_packet(rogue6, d6, 40000, port, "S")
    assert dp.test_run(deny4).retval == 2 and dp.test_run(deny6).retval == 2
    cases = {
        "floor": (floor_fd, tcp_packet(s4, d4, 40000, port, "A")),
        "established_v4": (dp.ingress_fd, tcp_packet(s4, d4, 40000, port, "A")),
        "established_v6": (dp.ingress_fd, tcp_packet(s6, d6, 40000, port, "A")),
        "denied_v4": (dp.ingress_fd, deny4),
        "denied_v6": (dp.ingress_fd, deny6),
    }
    samples: dict[str, list[int]] = {k: [] for k in cases}
    for _ in range(runs):  # interleaved: every case once per round
        for name, (fd, pkt) in cases.items():
            samples[name].append(bpfsys.prog_test_run(fd, pkt, repeat=repeat).duration_ns)
            ring.drain(1 << 30)  # between runs: no reader competes for the CPUs
    out = {name: {"median_ns": statistics.median(v), "runs_ns": v}
           for name, v in samples.items()}

    # New flows through the harness: every repetition a fresh source port.
    newflow_fd = dp.bpf.load_func(b"mseg_bench_newflow", _SCHED_CLS).fd
    rewrite_fd = dp.bpf.load_func(b"mseg_bench_rewrite", _SCHED_CLS).fd
    ctl = bpfsys.BpfMap(dp.bpf.get_table(b"bench_ctl_map").map_fd)
    # The same policy staged as a candidate (docs/policy.md "Staging"): every
    # new flow judged twice. Switched on and off by its one word between
    # interleaved runs; established packets measured with it on too.
    # An empty candidate too: what the stage itself costs (the tail call,
    # the counters), apart from the second policy lookup.
    empty_gen = dp.stage_policy(compile_policy(Policy(default="allow")))
    staged_gen = dp.stage_policy(compile_policy(pol))
    dp.clear_staged()
    nsamples: dict[str, list[int]] = {k: [] for k in (
        "rewrite_floor", "new_flow_v4", "new_flow_v6", "rewrite_uncached_floor",
        "new_flow_uncached_v4", "new_flow_uncached_v6", "new_flow_staged_v4",
        "new_flow_staged_v6", "new_flow_staged_empty_v4", "new_flow_staged_empty_v6",
        "established_staged_v4")}
    flows = (("new_flow_v4", s4, d4, 34), ("new_flow_v6", s6, d6, 54))
    for _ in range(runs):
        for name, a, b, off in flows:
            _arm(ctl, off)
            pkt = tcp_packet(a, b, 0, port, "S")
            nsamples["rewrite_floor"].append(
                bpfsys.prog_test_run(rewrite_fd, pkt, repeat=new_flows).duration_ns)
            # The first flow of a pair: its decision forgotten each time.
            _arm(ctl, off, forget=True)
            nsamples["rewrite_uncached_floor"].append(
                bpfsys.prog_test_run(rewrite_fd, pkt, repeat=new_flows).duration_ns)
            _arm(ctl, off, forget=True)
            r = bpfsys.prog_test_run(newflow_fd, pkt, repeat=new_flows)
            assert r.retval == 0, "new flows must be allowed"
            nsamples[name.replace("new_flow", "new_flow_uncached")].append(r.duration_ns)
            ring.drain(1 << 30)
            _delete_flows(dp, a, b, port, new_flows)
            for staged, kind in ((0, ""), (empty_gen, "_staged_empty"),
                                 (staged_gen, "_staged")):
                _switch_staged(dp, staged)
                _arm(ctl, off)
                r = bpfsys.prog_test_run(newflow_fd, pkt, repeat=new_flows)
                assert r.retval == 0, "new flows must be allowed"
                key = name.replace("new_flow", "new_flow" + kind)
                nsamples[key].append(r.duration_ns)
                ring.drain(1 << 30)
                _delete_flows(dp, a, b, port, new_flows)
        _switch_staged(dp, staged_gen)
        fd, pkt = cases["established_v4"]
        nsamples["established_staged_v4"].append(
            bpfsys.prog_test_run(fd, pkt, repeat=repeat).duration_ns)
        _switch_staged(dp, 0)
    ctl.close()
    for name, v in nsamples.items():
        out[name] = {"median_ns": statistics.median(v), "runs_ns": v}
    floor = out["floor"]["median_ns"]
    for k in ("established_v4", "established_v6", "denied_v4", "denied_v6"):
        out[k]["over_floor_ns"] = out[k]["median_ns"] - floor
    out["established_staged_v4"]["over_floor_ns"] = \
        out["established_staged_v4"]["median_ns"] - floor
    rf = out["rewrite_floor"]["median_ns"]
    ruf = out["rewrite_uncached_floor"]["median_ns"]
    for k in ("new_flow_uncached_v4", "new_flow_uncached_v6"):
        out[k]["over_floor_ns"] = out[k]["median_ns"] - ruf
    for k in ("new_flow_v4", "new_flow_v6", "new_flow_staged_v4", "new_flow_staged_v6",
              "new_flow_staged_empty_v4", "new_flow_staged_empty_v6"):
        out[k]["over_floor_ns"] = out[k]["median_ns"] - rf
    for fam in ("v4", "v6"):  # what staging adds to a new flow, run for run
        for kind in ("staged", "staged_empty"):
            out[f"new_flow_{kind}_{fam}"]["over_unstaged_ns"] = statistics.median(
                st - un for st, un in zip(out[f"new_flow_{kind}_{fam}"]["runs_ns"],
                                          out[f"new_flow_{fam}"]["runs_ns"], strict=True))
    return out


def _switch_staged(dp: Datapath, generation: int) -> None:
    """The candidate on (its generation) or off (0): the one word a stage
    or a clear writes."""
    dp.maps["active_map"].update(struct.pack("<I", abi.Active.STAGED),
                                 struct.pack("<I", generation))


_SCHED_CLS = 3  # BPF_PROG_TYPE_SCHED_CLS
_BASE_PORT = 1024


def _arm(ctl: bpfsys.BpfMap, sport_off: int, *, forget: bool = False) -> None:
    """Reset the harness counter on every CPU (the run lands on one); forget:
    each repetition forgets its pair's cached policy decision first."""
    one = BENCH_CTL.struct.pack(sport_off, _BASE_PORT, 0, int(forget))
    ctl.update(b"\0\0\0\0", one * bpfsys.possible_cpus())


class Rings:
    """Both ring buffers, drained together (denials have their own)."""

    def __init__(self, dp: Datapath) -> None:
        self.rings = [RingBuffer(dp.maps[name].fd, abi.EVENT.size) for name in RINGS.values()]

    def drain(self, limit: int) -> None:
        for r in self.rings:
            r.drain(limit)

    def close(self) -> None:
        for r in self.rings:
            r.close()


def _delete_flows(dp: Datapath, src: str, dst: str, dport: int, n: int) -> None:
    """Remove the sessions a harness run created (the base load stays)."""
    fam = 6 if ":" in src else 4
    a, b = addr16(src), addr16(dst)
    keys = b"".join(session_key(fam, 6, a, b, _BASE_PORT + i, dport) for i in range(n))
    dp.maps["pending_map"].delete_batch(keys, n)  # a SYN's session waits for its reply
