"""The datapath interface: compile and load the TC program with BCC, pin and
check its maps, attach it to interfaces, and read and write its maps.

Everything kernel-facing the daemon needs goes through ``Datapath``; policy
compilation, event decoding and aggregation stay pure and never import BCC.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from microseg.kernel import abi, bpfsys, tc
from microseg.kernel.clock import ClockSample
from microseg.kernel.records import SessionEntry, decode_sessions

log = logging.getLogger(__name__)

DEFAULT_PIN_DIR = "/sys/fs/bpf/microseg"
IDENT_CAPACITY = 131072
POLICY_CAPACITY = 1 << 20
FRAG_CAPACITY = 16384
EVENT_TYPE_SLOTS = 4  # EVENT_TYPE_MAX
PROG_INGRESS = "mseg_ingress"
PROG_EGRESS = "mseg_egress"
PROG_CLOCK = "mseg_clock"

_U32 = struct.Struct("<I")
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


class MapSpec(NamedTuple):
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class DatapathConfig:
    pin_dir: str | None = DEFAULT_PIN_DIR
    session_capacity: int = 1 << 20
    ringbuf_bytes: int = 16 << 20
    bench_harness: bool = False  # bench/ only: the new-flow harness entries

    def __post_init__(self) -> None:
        rb = self.ringbuf_bytes
        if rb < mmap.PAGESIZE or rb & (rb - 1):
            raise ValueError(f"ring buffer size must be a power of two >= {mmap.PAGESIZE}")
        if self.session_capacity < 1:
            raise ValueError("session capacity must be positive")

    def map_specs(self) -> dict[str, MapSpec]:
        """Every map the program defines, as the kernel should report it."""
        B = bpfsys
        percpu = (B.BPF_MAP_TYPE_PERCPU_ARRAY, 4)
        return {
            "session_map": MapSpec(B.BPF_MAP_TYPE_LRU_HASH, abi.SESSION_KEY.size,
                                   abi.SESSION_VALUE.size, self.session_capacity, 0),
            "host4_map": MapSpec(B.BPF_MAP_TYPE_HASH, abi.HOST4_KEY.size,
                                 abi.IDENT_VALUE.size, IDENT_CAPACITY, B.BPF_F_NO_PREALLOC),
            "host6_map": MapSpec(B.BPF_MAP_TYPE_HASH, abi.HOST6_KEY.size,
                                 abi.IDENT_VALUE.size, IDENT_CAPACITY, B.BPF_F_NO_PREALLOC),
            "ident4_map": MapSpec(B.BPF_MAP_TYPE_LPM_TRIE, abi.IDENT4_KEY.size,
                                  abi.IDENT_VALUE.size, IDENT_CAPACITY, B.BPF_F_NO_PREALLOC),
            "ident6_map": MapSpec(B.BPF_MAP_TYPE_LPM_TRIE, abi.IDENT6_KEY.size,
                                  abi.IDENT_VALUE.size, IDENT_CAPACITY, B.BPF_F_NO_PREALLOC),
            "policy_map": MapSpec(B.BPF_MAP_TYPE_HASH, abi.POLICY_KEY.size,
                                  abi.POLICY_VALUE.size, POLICY_CAPACITY, B.BPF_F_NO_PREALLOC),
            "port_class_map": MapSpec(B.BPF_MAP_TYPE_ARRAY, 4, 4, abi.PORT_CLASS_SLOTS, 0),
            "config_map": MapSpec(B.BPF_MAP_TYPE_ARRAY, 4, abi.POLICY_CONFIG.size, 2, 0),
            "active_map": MapSpec(B.BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0),
            "stats_map": MapSpec(*percpu, abi.STATS_VALUE.size, abi.STATS_SLOTS, 0),
            "rule_stats_map": MapSpec(*percpu, abi.RULE_STATS.size, abi.MAX_RULES, 0),
            "event_stats_map": MapSpec(*percpu, abi.EVENT_STATS.size, EVENT_TYPE_SLOTS, 0),
            "meta_map": MapSpec(B.BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0),
            "clock_map": MapSpec(B.BPF_MAP_TYPE_ARRAY, 4, abi.CLOCK_SAMPLE.size, 1, 0),
            "daemon_map": MapSpec(B.BPF_MAP_TYPE_ARRAY, 4, abi.DAEMON_STATE.size, 1, 0),
            "session_stats_map": MapSpec(*percpu, abi.SESSION_STATS.size, 1, 0),
            "frag_map": MapSpec(B.BPF_MAP_TYPE_LRU_HASH, abi.FRAG_KEY.size,
                                abi.FRAG_VALUE.size, FRAG_CAPACITY, 0),
            "events": MapSpec(B.BPF_MAP_TYPE_RINGBUF, 0, 0, self.ringbuf_bytes, 0),
        }

    def cflags(self) -> list[str]:
        flags = [
            f"-DMSEG_SESSION_CAPACITY={self.session_capacity}",
            f"-DMSEG_RINGBUF_PAGES={self.ringbuf_bytes // mmap.PAGESIZE}",
            f"-DMSEG_IDENT_CAPACITY={IDENT_CAPACITY}",
            f"-DMSEG_POLICY_CAPACITY={POLICY_CAPACITY}",
            f"-DMSEG_FRAG_CAPACITY={FRAG_CAPACITY}",
            "-Wno-unused-function",
        ]
        if self.pin_dir:
            flags.append(f'-DMSEG_PIN_DIR="{self.pin_dir}"')
        if self.bench_harness:
            flags.append("-DMSEG_BENCH_HARNESS")
        return flags


def bpf_source_dir() -> Path:
    """bpf/ beside the package in a source tree (also when the package is
    imported from the checkout rather than through the editable install),
    else the copy installed as package data."""
    tree = Path(__file__).resolve().parents[2] / "bpf"
    if (tree / "microseg.bpf.c").is_file():
        return tree
    return Path(str(resources.files("microseg.bpf")))


def program_source(entry: str = "microseg.bpf.c") -> str:
    """The program as one text, our own ``#include "..."`` files inlined.

    BCC rewrites map method calls (``session_map.lookup(&k)``) only in its
    main file, so the headers under bpf/lib must be part of that file.
    """
    root = bpf_source_dir()
    seen: set[Path] = set()

    def inline(path: Path) -> list[str]:
        out = [f"#line 1 \"{path.name}\""]
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            inc = (path.parent / m.group(1)).resolve()
            if inc not in seen:
                seen.add(inc)
                out.extend(inline(inc))
            out.append(f"#line {n + 1} \"{path.name}\"")
        return out

    return "\n".join(inline(root / entry)) + "\n"


def check_pins(config: DatapathConfig) -> list[str]:
    """Remove pinned maps that this program must not reuse; return warnings.

    BCC reuses a pin of the right path blindly, whatever its type or sizes.
    A pin whose kind, key/value size, capacity or flags differ, or pins
    written under another ABI version, are unlinked here first so BCC
    creates fresh maps (the old ones live on only as long as an attached
    old program holds them).
    """
    if not config.pin_dir or not os.path.isdir(config.pin_dir):
        return []
    warnings: list[str] = []
    specs = config.map_specs()
    pins = {name: os.path.join(config.pin_dir, name) for name in specs}
    present = {n: p for n, p in pins.items() if os.path.exists(p)}
    if not present:
        return []

    abi_found = None
    if "meta_map" in present:
        try:
            m = bpfsys.BpfMap.from_pin(present["meta_map"])
            try:
                raw = m.lookup(_U32.pack(0))
                abi_found = _U32.unpack(raw)[0] if raw else None
            finally:
                m.close()
        except OSError:
            abi_found = None
    if abi_found != abi.ABI_VERSION:
        warnings.append(f"pinned maps in {config.pin_dir} were made by datapath ABI "
                        f"{abi_found or 'unknown'}, this is ABI {abi.ABI_VERSION}: "
                        "replacing all of them (sessions are re-evaluated)")
        for p in present.values():
            os.unlink(p)
        return warnings

    for name, path in present.items():
        spec = specs[name]
        try:
            fd = bpfsys.obj_get(path)
        except OSError as e:
            warnings.append(f"pinned {name} unreadable ({e}); replacing it")
            os.unlink(path)
            continue
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        got = MapSpec(info.type, info.key_size, info.value_size, info.max_entries,
                      info.map_flags)
        if got != spec:
            warnings.append(f"pinned {name} has layout {tuple(got)}, expected "
                            f"{tuple(spec)}: replacing it")
            os.unlink(path)
    return warnings


@dataclass
class LoadReport:
    compile_s: float
    load_s: float
    warnings: list[str] = field(default_factory=list)
    reused_pins: list[str] = field(default_factory=list)


class CounterKey(NamedTuple):
    direction: abi.Direction
    verdict: abi.Verdict
    reason: abi.Reason


class Datapath:
    """One loaded instance of the TC program and its maps."""

    def __init__(self, config: DatapathConfig | None = None) -> None:
        self.config = config or DatapathConfig()
        self.bpf = None
        self.maps: dict[str, bpfsys.BpfMap] = {}
        self.ingress_fd = -1
        self.egress_fd = -1
        self.clock_fd = -1
        # What each generation slot holds (None until read or written).
        self._slots: dict[int, tuple[dict[str, dict[bytes, bytes]], bytes]] = {}
        self._converge: tuple[int, dict[str, dict[bytes, bytes]], bytes] | None = None
        self._generation = 0
        self._ipr = None

    # -- loading -----------------------------------------------------------

    def load(self) -> LoadReport:
        from bcc import BPF  # BCC is imported only where the kernel is touched

        cfg = self.config
        warnings = check_pins(cfg)
        reused = []
        if cfg.pin_dir:
            os.makedirs(cfg.pin_dir, mode=0o700, exist_ok=True)
            reused = [n for n in cfg.map_specs() if os.path.exists(os.path.join(cfg.pin_dir, n))]
        t0 = time.perf_counter()
        self.bpf = BPF(text=program_source().encode(), cflags=cfg.cflags())
        t1 = time.perf_counter()
        self.ingress_fd = self.bpf.load_func(PROG_INGRESS.encode(), BPF.SCHED_CLS).fd
        self.egress_fd = self.bpf.load_func(PROG_EGRESS.encode(), BPF.SCHED_CLS).fd
        self.clock_fd = self.bpf.load_func(PROG_CLOCK.encode(), BPF.SCHED_CLS).fd
        t2 = time.perf_counter()
        for name in cfg.map_specs():
            self.maps[name] = bpfsys.BpfMap(self.bpf.get_table(name.encode()).map_fd, name)
        self.maps["meta_map"].update(_U32.pack(0), _U32.pack(abi.ABI_VERSION))
        self._generation = self.active_generation()
        return LoadReport(t1 - t0, t2 - t1, warnings, reused)

    def close(self) -> None:
        """Release our handles. Pins and attached filters stay (see unpin)."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        self.maps.clear()

    def unpin(self) -> None:
        if not self.config.pin_dir:
            return
        for name in self.config.map_specs():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.config.pin_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.config.pin_dir)

    # -- attaching ---------------------------------------------------------

    def _netlink(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def attach(self, ifindex: int) -> tc.Attachment:
        return tc.attach(self._netlink(), ifindex, self.ingress_fd, self.egress_fd)

    def detach(self, ifindex: int, *, remove_clsact: bool = True) -> None:
        tc.detach(self._netlink(), ifindex, remove_clsact=remove_clsact)

    # -- policy ------------------------------------------------------------

    def active_generation(self) -> int:
        raw = self.maps["active_map"].lookup(_U32.pack(0))
        return _U32.unpack_from(raw)[0] if raw else 0

    # The maps a generation lives in, and where each key holds its slot.
    _POLICY_MAPS = ("host4_map", "host6_map", "ident4_map", "ident6_map", "policy_map")
    _LPM_MAPS = ("ident4_map", "ident6_map")  # key: prefixlen, slot, addr

    def apply_policy(self, compiled, *, grace_s: float | None = 0.01) -> int:
        """Switch to compiled (a CompiledPolicy) as a new generation.

        The new generation is written fully into the idle slot — only the
        entries that differ from what that slot holds — then switched in
        with one 4-byte write to active_map. Packets read the active
        generation once and do all their lookups in its slot, so a packet
        sees either the old or the new generation, never a mix.

        Then the old slot is brought to the same content (converge()): the
        old generation is gone, and the next generation's diff is small.
        With grace_s=None the caller calls converge() itself, after a grace
        period that lets packets still in the old generation finish.
        """
        if self._converge is not None:
            self.converge()
        contents, ports = compiled.map_contents(), compiled.port_class_values()
        gen = max(self.active_generation(), self._generation) + 1
        slot = gen & 1
        self._write_slot(slot, contents, ports)
        self.maps["config_map"].update(_U32.pack(slot), compiled.config_record(gen))
        self.maps["active_map"].update(_U32.pack(0), _U32.pack(gen))  # the switch
        self._generation = gen
        self._converge = (slot ^ 1, contents, ports)
        if grace_s is not None:
            time.sleep(grace_s)
            self.converge()
        return gen

    def converge(self) -> None:
        """Rewrite the previous generation's slot with the active content."""
        if self._converge is not None:
            slot, contents, ports = self._converge
            self._write_slot(slot, contents, ports)
            self._converge = None

    def _slot_key(self, name: str, slot: int, rest: bytes) -> bytes:
        if name in self._LPM_MAPS:
            return rest[:4] + _U32.pack(slot) + rest[4:]
        return _U32.pack(slot) + rest

    def _write_slot(self, slot: int, contents: dict[str, dict[bytes, bytes]],
                    ports: bytes) -> None:
        cur, cur_ports = self._slots.get(slot) or self._read_slot(slot)
        for name in self._POLICY_MAPS:
            m, old, new = self.maps[name], cur.get(name, {}), contents[name]
            gone = [self._slot_key(name, slot, k) for k in old if k not in new]
            m.delete_batch(b"".join(gone), len(gone))
            changed = [(k, v) for k, v in new.items() if old.get(k) != v]
            m.update_batch(b"".join(self._slot_key(name, slot, k) for k, _ in changed),
                           b"".join(v for _, v in changed), len(changed))
        self._write_port_classes(slot, cur_ports, ports)
        self._slots[slot] = (contents, ports)

    def _write_port_classes(self, slot: int, old: bytes, new: bytes) -> None:
        """Write the 4 KiB stretches of the slot's port classes that differ."""
        base = abi.port_class_index(slot, False, 0)
        chunk = 1024  # ports per write
        m = self.maps["port_class_map"]
        for start in range(0, len(new) // 4, chunk):
            part = new[start * 4:(start + chunk) * 4]
            if old[start * 4:(start + chunk) * 4] == part:
                continue
            n = len(part) // 4
            keys = b"".join(_U32.pack(base + start + i) for i in range(n))
            m.update_batch(keys, part, n)

    def _read_slot(self, slot: int) -> tuple[dict[str, dict[bytes, bytes]], bytes]:
        """What a slot holds in the kernel (after a restart, or a crash in
        the middle of an apply), without the slot fields."""
        contents: dict[str, dict[bytes, bytes]] = {}
        for name in self._POLICY_MAPS:
            m, off = self.maps[name], 4 if name in self._LPM_MAPS else 0
            mine = contents[name] = {}
            for key, value in self._all_items(m):
                if _U32.unpack_from(key, off)[0] == slot:
                    mine[key[:off] + key[off + 4:]] = value
        # The array in index order: batch lookups walk it from index 0.
        whole = b"".join(values for _k, values, _n in
                         self.maps["port_class_map"].lookup_batch_raw(chunk=65536))
        first = abi.port_class_index(slot, False, 0)
        return contents, whole[first * 4:(first + 2 * 65536) * 4]

    @staticmethod
    def _all_items(m: bpfsys.BpfMap) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value): batch lookups where the map has them (hash
        maps), get_next_key and lookup where it does not (LPM tries)."""
        if m.type == bpfsys.BPF_MAP_TYPE_LPM_TRIE:
            for key in m.iter_keys():
                value = m.lookup(key)
                if value is not None:
                    yield key, value
            return
        yield from m.lookup_batch()

    # -- reading -----------------------------------------------------------

    def _percpu_sums(self, name: str, layout: abi.Layout) -> dict[int, tuple[int, ...]]:
        """index -> field sums over CPUs, for the non-zero entries."""
        m = self.maps[name]
        out: dict[int, tuple[int, ...]] = {}
        unpack = layout.struct.unpack_from
        stride = m.value_stride
        for keys, values, count in m.lookup_batch_raw(chunk=min(m.max_entries, 8192)):
            vs = m.full_value_size
            for i in range(count):
                idx = _U32.unpack_from(keys, i * 4)[0]
                base = i * vs
                sums = None
                for cpu in range(bpfsys.possible_cpus()):
                    t = unpack(values, base + cpu * stride)
                    sums = t if sums is None else tuple(map(sum, zip(sums, t, strict=True)))
                if sums and any(sums):
                    out[idx] = sums
        return out

    def read_stats(self) -> dict[CounterKey, tuple[int, int]]:
        """(direction, verdict, reason) -> (packets, bytes), non-zero only."""
        nr, nv = len(abi.Reason), len(abi.Verdict)
        out = {}
        for idx, (pkts, byts) in self._percpu_sums("stats_map", abi.STATS_VALUE).items():
            d, rest = divmod(idx, nv * nr)
            v, r = divmod(rest, nr)
            out[CounterKey(abi.Direction(d), abi.Verdict(v), abi.Reason(r))] = (pkts, byts)
        return out

    def read_rule_stats(self) -> dict[int, tuple[int, int]]:
        """rule id -> (hits, last hit ns); last hit is the max over CPUs."""
        m = self.maps["rule_stats_map"]
        out: dict[int, tuple[int, int]] = {}
        stride, vs = m.value_stride, m.full_value_size
        unpack = abi.RULE_STATS.struct.unpack_from
        ncpu = bpfsys.possible_cpus()
        for keys, values, count in m.lookup_batch_raw():
            for i in range(count):
                hits = last = 0
                for cpu in range(ncpu):
                    h, t = unpack(values, i * vs + cpu * stride)
                    hits += h
                    last = max(last, t)
                if hits:
                    out[_U32.unpack_from(keys, i * 4)[0]] = (hits, last)
        return out

    def read_event_stats(self) -> dict[abi.EventType, tuple[int, int]]:
        """event type -> (submitted, lost) records."""
        return {abi.EventType(i): v  # type: ignore[misc]
                for i, v in self._percpu_sums("event_stats_map", abi.EVENT_STATS).items()
                if i in abi.EventType._value2member_map_}

    def read_session_stats(self) -> tuple[int, int]:
        """(created, revoked): session_map entries the datapath added and
        deleted since the pins were made."""
        return self._percpu_sums("session_stats_map", abi.SESSION_STATS).get(0, (0, 0))

    def sessions(self, chunk: int = 8192) -> Iterator[SessionEntry]:
        """Stream the session table (batch lookups, never all in memory)."""
        return decode_sessions(self.maps["session_map"].lookup_batch_raw(chunk))

    def session_count(self) -> int:
        return sum(c for _, _, c in self.maps["session_map"].lookup_batch_raw())

    def clock_sample(self) -> ClockSample:
        """jiffies and CLOCK_MONOTONIC at one instant, read in the kernel."""
        bpfsys.prog_test_run(self.clock_fd, bytes(64))
        raw = self.maps["clock_map"].lookup(_U32.pack(0))
        assert raw is not None
        return ClockSample(*abi.CLOCK_SAMPLE.struct.unpack(raw))

    def run_stats(self) -> tuple[int, int]:
        """(run_time_ns, run_cnt) of both programs, from kernel bpf stats
        (counted only while run-time stats are enabled)."""
        a = bpfsys.prog_info(self.ingress_fd)
        b = bpfsys.prog_info(self.egress_fd)
        return a.run_time_ns + b.run_time_ns, a.run_cnt + b.run_cnt

    def reset_state(self) -> None:
        """Empty sessions, fragments and counters (tests and benchmarks)."""
        for name in ("session_map", "frag_map"):
            m = self.maps[name]
            for keys, _values, count in list(m.lookup_batch_raw()):
                m.delete_batch(keys, count)
        for name in ("stats_map", "rule_stats_map", "event_stats_map", "session_stats_map"):
            m = self.maps[name]
            n = m.max_entries
            keys = b"".join(_U32.pack(i) for i in range(n))
            m.update_batch(keys, bytes(m.full_value_size * n), n)

    # -- testing -----------------------------------------------------------

    def test_run(self, packet: bytes, direction: abi.Direction = abi.Direction.INGRESS,
                 *, repeat: int = 1) -> bpfsys.TestRunResult:
        fd = self.ingress_fd if direction == abi.Direction.INGRESS else self.egress_fd
        return bpfsys.prog_test_run(fd, packet, repeat=repeat)
