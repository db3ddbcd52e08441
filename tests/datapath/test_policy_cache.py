"""The per-CPU cache of policy decisions (policy_cache_map, bpf/lib/policy.h):
it answers only for exactly the question it was asked under exactly the
slot write it was made under — a new generation, a generation number that
comes again, a staged candidate, a colliding flow all get the lookups'
answer, never a stale one."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.kernel import abi
from microseg.kernel.abi import Verdict
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.kernel.loader import bpf_source_dir, program_identity
from microseg.policy.compile import compile_policy
from microseg.policy.model import Policy, Rule, Selector, Workload

from .harness import Harness, tcp

WEB, DB = "10.31.0.10", "10.31.0.30"
WORKLOADS = (Workload.make("web", [WEB]), Workload.make("db", [DB]))
ALLOW = Policy(workloads=WORKLOADS, rules=(
    Rule.make("web-db", Selector.of_workload("web"), Selector.of_workload("db"), "allow",
              "tcp", [5432]),))
DENY = Policy(workloads=WORKLOADS, rules=())


@pytest.fixture(autouse=True)
def one_cpu() -> Iterator[None]:
    """Every test run on one CPU: the cache is per CPU, and a process the
    scheduler moves between runs would fill an entry on each."""
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(was)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, was)


_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def cache_index(src: str, dst: str, dport: int, proto: int, gen: int) -> int:
    """policy_cache_index() of bpf/lib/policy.h (addresses as the packet
    struct holds them: 16 bytes, an IPv4 address in the first 4)."""
    def words(addr: str) -> tuple[int, int]:
        raw = ipaddress.ip_address(addr).packed.ljust(16, b"\0")
        return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")

    s0, s1 = words(src)
    d0, d1 = words(dst)
    h = s0 ^ (s1 >> 7)
    h = ((h * _MIX) & _M64) ^ d0 ^ (d1 >> 5)
    h = ((h * _MIX) & _M64) ^ ((dport << 40) | (proto << 32) | gen)
    return ((h * _MIX) & _M64) >> (64 - abi.POLICY_CACHE_BITS)


def cached(datapath: Datapath, index: int, gen: int) -> list[dict]:
    """policy_cache_map[index] on every CPU that holds an entry there made
    under generation gen (earlier tests' entries may be there too)."""
    m = datapath.maps["policy_cache_map"]
    raw = m.lookup(index.to_bytes(4, "little"))
    assert raw is not None
    entries = (abi.POLICY_CACHE_ENTRY.struct.unpack_from(raw, cpu * m.value_stride)
               for cpu in range(len(raw) // m.value_stride))
    names = [n for n, _ in abi.POLICY_CACHE_ENTRY.fields if not n.startswith("_")]
    return [entry for entry in (dict(zip(names, e, strict=True)) for e in entries)
            if entry["stamp"] and entry["generation"] == gen]


def verdict(dp: Harness, src: str, dst: str, sport: int, dport: int = 5432) -> Verdict:
    return Verdict(dp.send(tcp(src, dst, sport, dport)).verdict.verdict)


def test_a_judged_flow_is_cached_under_its_generation(dp: Harness) -> None:
    dp.install(ALLOW)
    assert verdict(dp, WEB, DB, 41000) == Verdict.ALLOWED
    entries = cached(dp.dp, cache_index(WEB, DB, 5432, 6, dp.generation), dp.generation)
    assert [(e["generation"], e["dport"], e["proto"], e["family"], e["verdict"],
             e["rule_id"]) for e in entries] == [
        (dp.generation, 5432, 6, 4, Verdict.ALLOWED, dp.rule_id("web-db"))]
    # A second new flow of the pair is answered the same way (from it).
    assert verdict(dp, WEB, DB, 41001) == Verdict.ALLOWED


def test_a_new_generation_is_judged_afresh(dp: Harness) -> None:
    dp.install(ALLOW)
    assert verdict(dp, WEB, DB, 41100) == Verdict.ALLOWED
    dp.install(DENY)
    assert verdict(dp, WEB, DB, 41101) == Verdict.DENIED
    dp.install(ALLOW)
    assert verdict(dp, WEB, DB, 41102) == Verdict.ALLOWED


def test_a_generation_number_that_comes_again_is_judged_afresh(dp: Harness) -> None:
    """The same number in the same slot (as after a reset): the slot's new
    stamp, not the number, is what a cached decision must match."""
    dp.install(ALLOW)
    gen = dp.generation
    assert verdict(dp, WEB, DB, 41200) == Verdict.ALLOWED
    # Number the next generation as this one again.
    dp.dp.maps["active_map"].update((abi.Active.POLICY).to_bytes(4, "little"),
                                    (gen - 1).to_bytes(4, "little"))
    dp.dp._generation = gen - 1
    dp.compiled = None
    dp.install(DENY)
    assert dp.generation == gen
    assert verdict(dp, WEB, DB, 41201) == Verdict.DENIED


def test_a_staged_number_that_comes_again_is_judged_afresh(dp: Harness) -> None:
    """Staged numbers start again at 1 in a daemon restarted on its pins."""
    dp.install(DENY)
    dp.dp._staged = 0
    first = dp.dp.stage_policy(compile_policy(ALLOW))
    v = dp.send(tcp(WEB, DB, 41300, 5432)).verdict
    assert v.staged_verdict - 1 == Verdict.ALLOWED
    dp.dp.clear_staged()
    dp.dp._staged = 0
    again = dp.dp.stage_policy(compile_policy(DENY))
    assert again == first and first & abi.STAGED_GENERATION
    v = dp.send(tcp(WEB, DB, 41301, 5432)).verdict
    assert (v.staged_verdict - 1, v.staged_generation) == (Verdict.DENIED, again)
    dp.dp.clear_staged()


def test_flows_sharing_an_entry_each_get_their_own_answer(dp: Harness) -> None:
    """Two sources whose questions hash to the same entry, one allowed, one
    not: each evicts the other, and neither is ever answered for the other."""
    net = ipaddress.ip_network("10.32.0.0/16")
    dp.install(Policy(workloads=WORKLOADS, rules=(
        Rule.make("net-db", Selector.of_cidr(str(net)), Selector.of_workload("db"), "allow",
                  "tcp", [5432]),)))
    gen = dp.generation
    inside = str(net.network_address + 7)
    want = cache_index(inside, DB, 5432, 6, gen)
    outside = next(str(a) for a in ipaddress.ip_network("10.33.0.0/16").hosts()
                   if cache_index(str(a), DB, 5432, 6, gen) == want)
    for i in range(3):
        assert verdict(dp, inside, DB, 41400 + i) == Verdict.ALLOWED
        assert verdict(dp, outside, DB, 41400 + i) == Verdict.DENIED
    assert [e["verdict"] for e in cached(dp.dp, want, gen)] == [Verdict.DENIED]


def test_another_build_on_the_same_pins_is_not_served_this_builds_decisions(
        pin_dir: str, tmp_path: Path) -> None:
    """An upgrade keeps the pinned maps (the same ABI): the new build's
    programs must judge afresh, not take the old build's cached answers —
    also under the same generation and stamp, before the new daemon applies
    anything (the old programs may still be attached meanwhile)."""
    other = tmp_path / "other.bpf.c"  # the same program, another text: another build
    other.write_text(f'/* another build */\n#include "{bpf_source_dir()}/microseg.bpf.c"\n')
    configs = [DatapathConfig(pin_dir=pin_dir, session_capacity=4096, ringbuf_bytes=1 << 16,
                              source=src) for src in (None, other)]
    # Their identities differ, and so the MSEG_BUILD_TAG each is compiled with.
    assert program_identity(configs[0]) != program_identity(configs[1])
    stamps = []
    for i, cfg in enumerate(configs):
        dp = Datapath(cfg)
        dp.load()
        try:
            if i == 0:
                dp.apply_policy(compile_policy(ALLOW))
            gen = dp.active_generation()
            assert dp.test_run(bytes(tcp(WEB, DB, 41500 + i, 5432))).retval == 0
            (entry,) = cached(dp, cache_index(WEB, DB, 5432, 6, gen), gen)
            stamps.append(entry["stamp"])
        finally:
            dp.close()
    assert stamps[0] != stamps[1]  # made again by the second build, not served
    Datapath(configs[1]).unpin()
