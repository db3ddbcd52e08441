"""The datapath interface: the loaded TC program, its maps and hooks.

Everything kernel-facing the daemon needs goes through ``Datapath``: load
(microseg/kernel/loader.py), attach to interfaces, write a policy generation
into the idle slot and switch to it, read counters and the session table.
Policy compilation, event decoding and aggregation stay pure and never
import BCC.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from microseg.kernel import abi, bpfsys, tc
from microseg.kernel.clock import ClockSample
from microseg.kernel.loader import (
    PROG_CLOCK,
    PROG_EGRESS,
    PROG_EGRESS_L3,
    PROG_INGRESS,
    PROG_INGRESS_L3,
    DatapathConfig,
    LoadReport,
    Preload,
    compile_program,
    function_insns,
    load_functions,
    load_program,
    pin_programs,
    program_source,
    remove_pins,
    reuse_programs,
)
from microseg.kernel.loader import PROG_FLUSH as PROG_FLUSH
from microseg.kernel.loader import PROG_REPLY as PROG_REPLY
from microseg.kernel.loader import PROG_STAGED as PROG_STAGED
from microseg.kernel.maps import U64
from microseg.kernel.records import SessionEntry, decode_sessions


class CompiledPolicy(Protocol):
    """What the datapath needs of a compiled policy (microseg/policy/compile.py
    makes them; the kernel layer does not import the policy layer)."""

    serial: int
    # (the serial of the compile this one edited, its changed entries; None:
    # not an edit) — an entry None is one to delete.
    delta: tuple[int, dict[str, dict[bytes, bytes | None]]] | None

    def map_contents(self) -> dict[str, dict[bytes, bytes]]: ...

    def port_class_values(self) -> bytes: ...

    def config_record(self, generation: int, stamp: int) -> bytes: ...

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
_PORTS_PER_SLOT = abi.PORT_CLASS_SLOTS // abi.POLICY_SLOTS  # tcp and udp, every port


def _stamp() -> int:
    """A slot write's nonce (struct policy_config.stamp): random, never 0, so
    that no decision cached in policy_cache_map under an earlier write of
    the slot answers for this one — also when a generation number comes
    again (a reset, a staged number after a restart)."""
    return int.from_bytes(os.urandom(8), "little") | 1


class CounterKey(NamedTuple):
    direction: abi.Direction
    verdict: abi.Verdict
    reason: abi.Reason


class SessionCounts(NamedTuple):
    """struct session_stats, summed over CPUs."""

    created: int = 0
    revoked: int = 0
    reused: int = 0
    promoted: int = 0
    agg_full: int = 0


SESSION_TABLES = ("session_map", "pending_map")
"""Where sessions live: both directions seen, and not yet (bpf/lib/session.h)."""


class Datapath:
    """One loaded instance of the TC program and its maps."""

    def __init__(self, config: DatapathConfig | None = None,
                 preload: Preload | None = None) -> None:
        self.config = config or DatapathConfig()
        # A load begun before (microseg run: while the daemon imports).
        self._preload = preload
        self.bpf = None
        self.maps: dict[str, bpfsys.BpfMap] = {}
        self.ingress_fd = -1
        self.egress_fd = -1
        self.clock_fd = -1
        self.flush_fd = -1
        self._l3_fds: tuple[int, int] | None = None
        self._reply_fd = -1
        self._staged_fd = -1
        # Stack depth per program, from a verification with statistics
        # (verifier_figures(measure=True)): bytes per subprogram.
        self._stack_depths: dict[str, tuple[int, ...]] = {}
        # What each generation slot holds (None until read or written).
        # (the contents, or the CompiledPolicy that has them; the port classes)
        self._slots: dict[int, tuple[dict[str, dict[bytes, bytes]] | CompiledPolicy,
                                     bytes]] = {}
        # The serial of the CompiledPolicy each slot holds, when written from one.
        self._slot_serial: dict[int, int] = {}
        self._converge: tuple[int, CompiledPolicy] | None = None
        self._generation = 0
        self._staged = 0  # the last staged generation's number
        self._ipr = None
        self._report: LoadReport | None = None
        # Program fds opened from pins (a reuse): ours to close; BCC's module
        # owns those it loaded.
        self._owned_fds: list[int] = []

    # -- loading -----------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._report is not None

    @property
    def load_report(self) -> LoadReport | None:
        return self._report

    def load(self) -> LoadReport:
        if self._preload is not None and self._preload.config != self.config:
            self._preload.discard()
            self._preload = None
        prog = self._preload.take() if self._preload is not None else load_program(self.config)
        self.bpf, self.maps, self._report = prog.bpf, prog.maps, prog.report
        self._owned_fds = prog.owned_fds
        self.ingress_fd = prog.prog_fds[PROG_INGRESS]
        self.egress_fd = prog.prog_fds[PROG_EGRESS]
        self.clock_fd = prog.prog_fds[PROG_CLOCK]
        self.flush_fd = prog.prog_fds[PROG_FLUSH]
        self._reply_fd = prog.prog_fds[PROG_REPLY]
        self._staged_fd = prog.prog_fds[PROG_STAGED]
        self._generation = self.active_generation()
        return prog.report

    def l3_programs(self) -> tuple[int, int]:
        """(ingress, egress) fds of the entry points for links without a
        link-layer header, loaded the first time a link needs them."""
        if self._l3_fds is None:
            names = (PROG_INGRESS_L3, PROG_EGRESS_L3)
            assert self._report is not None
            identity = self._report.identity
            fds = None
            if self.bpf is None:  # programs reused from pins: theirs too, or compile now
                prog = reuse_programs(self.config, identity, names)
                if prog is not None:
                    fds = prog.prog_fds
                    self._owned_fds += fds.values()
                    for m in prog.maps.values():
                        m.close()
                else:
                    # The text the reused programs were made of (their
                    # identity), not what is on disk now.
                    text = self._report.text or program_source(self.config.source)
                    self.bpf = compile_program(self.config, text, identity)
            if fds is None:
                fds = load_functions(self.bpf, names)
                self._owned_fds += fds.values()
                pin_programs(self.config, identity, fds)
            self._l3_fds = (fds[PROG_INGRESS_L3], fds[PROG_EGRESS_L3])
        return self._l3_fds

    def program_fds(self) -> dict[str, int]:
        """The packet programs loaded so far, by name."""
        out = {PROG_INGRESS: self.ingress_fd, PROG_EGRESS: self.egress_fd,
               PROG_REPLY: self._reply_fd, PROG_STAGED: self._staged_fd}
        if self._l3_fds is not None:
            out[PROG_INGRESS_L3], out[PROG_EGRESS_L3] = self._l3_fds
        return out

    def verifier_figures(self, *, measure: bool = False) -> dict[str, dict]:
        """Per packet program: instructions the verifier processed (the
        kernel's count) and its stack depth in bytes. The stack depth needs
        the program verified once more with statistics (a second or so per
        program): measure=True does it for those not measured yet; until
        then it is null."""
        out = {}
        for name, fd in self.program_fds().items():
            if measure and name not in self._stack_depths and self.bpf is not None:
                st = bpfsys.verifier_stats(function_insns(self.bpf, name), name)
                self._stack_depths[name] = st.stack_depth
            depth = self._stack_depths.get(name)
            out[name] = {"instructions": bpfsys.prog_info(fd).verified_insns,
                         "stack_depth": list(depth) if depth is not None else None}
        return out

    def write_settings(self, event_window_ns: int, handover_jiffies: int) -> None:
        """settings_map[0]: the aggregation window and the owner handover."""
        self.maps["settings_map"].update(_U32.pack(0), abi.SETTINGS.struct.pack(
            event_window_ns, handover_jiffies))

    def close(self) -> None:
        """Release our handles. Pins and attached filters stay (see unpin)."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
        for fd in self._owned_fds:
            os.close(fd)
        self._owned_fds = []
        for m in self.maps.values():
            m.close()  # only those opened from pins are ours
        self.maps.clear()

    def unpin(self) -> list[str]:
        """Remove every pin this program owns, and the pin directory if it is
        then empty; the pins that could not be removed (logged)."""
        if not self.config.pin_dir:
            return []
        left = remove_pins(self.config)
        if left:
            log.error("pins left in %s after removing them: %s", self.config.pin_dir,
                      ", ".join(left))
        return left

    # -- attaching ---------------------------------------------------------

    def _netlink(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def attach(self, ifindex: int, *, l3: bool = False) -> tc.Attachment:
        """Both hooks of a link; l3: a link without a link-layer header."""
        ingress, egress = self.l3_programs() if l3 else (self.ingress_fd, self.egress_fd)
        return tc.attach(self._netlink(), ifindex, ingress, egress)

    def detach(self, ifindex: int, *, remove_clsact: bool = True) -> None:
        tc.detach(self._netlink(), ifindex, remove_clsact=remove_clsact)

    # -- policy ------------------------------------------------------------

    def active_generation(self) -> int:
        return self._active_word(abi.Active.POLICY)

    def staged_generation(self) -> int:
        """The staged candidate's generation (STAGED_GENERATION set), 0 when
        nothing is staged."""
        return self._active_word(abi.Active.STAGED)

    def _active_word(self, index: abi.Active) -> int:
        raw = self.maps["active_map"].lookup(_U32.pack(index))
        return _U32.unpack_from(raw)[0] if raw else 0

    # The maps a generation lives in, and where each key holds its slot.
    _POLICY_MAPS = ("host4_map", "host6_map", "ident4_map", "ident6_map", "policy_map")
    _LPM_MAPS = ("ident4_map", "ident6_map")  # key: prefixlen, slot, addr

    def apply_policy(self, compiled, *, converge: bool = True) -> int:
        """Switch to compiled (a CompiledPolicy) as a new generation.

        The new generation is written fully into the idle slot — only the
        entries that differ from what that slot holds — then switched in
        with one 4-byte write to active_map. Packets read the active
        generation once and do all their lookups in its slot, so a packet
        sees either the old or the new generation, never a mix.

        Then the old slot is brought to the same content (converge()): the
        old generation is gone, and the next generation's diff is small.
        With converge=False the caller calls converge() itself, later.
        """
        if self._converge is not None:
            self.converge()
        gen = max(self.active_generation(), self._generation) + 1
        slot = abi.policy_slot(gen)
        self._write_compiled(slot, compiled)
        self.maps["config_map"].update(_U32.pack(slot), compiled.config_record(gen, _stamp()))
        self.maps["active_map"].update(_U32.pack(abi.Active.POLICY), _U32.pack(gen))  # switch
        self._generation = gen
        self._converge = (slot ^ 1, compiled)
        if converge:
            self.converge()
        return gen

    def stage_policy(self, compiled) -> int:
        """Load compiled as the staged candidate (docs/policy.md "Staging"):
        new flows are judged by it too, the active policy still decides.
        Written into the staged slot not in use, then switched in with one
        4-byte write to active_map[STAGED], like a generation. Returns the
        staged generation (STAGED_GENERATION set)."""
        current = self.staged_generation() & ~abi.STAGED_GENERATION
        number = (max(current, self._staged) % 0x7FFFFFFF) + 1
        gen = abi.STAGED_GENERATION | number
        slot = abi.policy_slot(gen)
        # The slot was live two stages ago: no run that read it may still
        # be going when it is rewritten.
        self._wait_for_runs()
        self._write_compiled(slot, compiled)
        self.maps["config_map"].update(_U32.pack(slot), compiled.config_record(gen, _stamp()))
        self.maps["active_map"].update(_U32.pack(abi.Active.STAGED), _U32.pack(gen))
        self._staged = number
        return gen

    def clear_staged(self) -> None:
        """Stop judging new flows by the staged candidate (one write)."""
        self.maps["active_map"].update(_U32.pack(abi.Active.STAGED), _U32.pack(0))

    def empty_staged(self) -> None:
        """Free the staged slots' entries (they share the maps' capacity with
        the active policy), once no run can still read them. Nothing may be
        staged meanwhile (the caller serialises)."""
        self._wait_for_runs()
        empty = ({name: {} for name in self._POLICY_MAPS}, bytes(_PORTS_PER_SLOT * 4))
        for slot in abi.STAGED_SLOTS:
            self._write_slot(slot, *empty)

    def reset_staged_rule_stats(self) -> None:
        """Zero the staged rules' hits: a new candidate's count from 0 (its
        rule ids are its own). staged_stats_map stays monotonic (metrics)."""
        m = self.maps["staged_rule_stats_map"]
        n = m.max_entries
        m.update_batch(b"".join(_U32.pack(i) for i in range(n)),
                       bytes(m.full_value_size * n), n)

    def read_staged_stats(self) -> dict[tuple[abi.Verdict, bool], int]:
        """(staged verdict, differs from the active one) -> judgments."""
        out = {}
        for idx, (n,) in self._percpu_sums("staged_stats_map", U64).items():
            verdict, differs = divmod(idx, 2)
            if verdict < len(abi.Verdict):
                out[(abi.Verdict(verdict), bool(differs))] = n
        return out

    @staticmethod
    def _wait_for_runs() -> None:
        try:
            bpfsys.wait_for_running_programs()
        except OSError as e:
            # A nohz_full kernel has no MEMBARRIER_CMD_GLOBAL; runs take
            # microseconds, so a tenth of a second is far beyond any.
            log.warning("%s: waiting 0.1 s before rewriting a policy slot", e)
            time.sleep(0.1)

    def converge(self) -> None:
        """Rewrite the previous generation's slot with the active content,
        once no program run that read the old generation can still be
        running: after an RCU grace period, not a guess of how long one
        takes."""
        if self._converge is not None:
            self._wait_for_runs()
            slot, compiled = self._converge
            self._write_compiled(slot, compiled)
            self._converge = None

    def _slot_key(self, name: str, slot: int, rest: bytes) -> bytes:
        if name in self._LPM_MAPS:
            return rest[:4] + _U32.pack(slot) + rest[4:]
        return _U32.pack(slot) + rest

    def _write_compiled(self, slot: int, compiled: CompiledPolicy) -> None:
        """Write a compiled policy into a slot. A compile that edited the
        one the slot holds carries the entries that changed (its delta):
        only those are written, without comparing the hundreds of thousands
        that did not (docs/performance.md "Reloads"). Otherwise what differs
        from the slot's contents."""
        ports = compiled.port_class_values()
        delta = compiled.delta
        if (delta is None or slot not in self._slots
                or self._slot_serial.get(slot) != delta[0]):
            self._write_slot(slot, compiled.map_contents(), ports)
            self._slot_serial[slot] = compiled.serial
            return
        # Forgotten while written: after a failure the slot is read back.
        _contents, cur_ports = self._slots.pop(slot)
        del self._slot_serial[slot]
        for name, changes in delta[1].items():
            m = self.maps[name]
            gone = [self._slot_key(name, slot, k) for k, v in changes.items() if v is None]
            m.delete_batch(b"".join(gone), len(gone))
            keys = [k for k, v in changes.items() if v is not None]
            m.update_batch(b"".join(self._slot_key(name, slot, k) for k in keys),
                           b"".join(changes[k] for k in keys), len(keys))  # type: ignore[misc]
        self._write_port_classes(slot, cur_ports, ports)
        # Its contents are made only if ever needed (a full comparison).
        self._slots[slot] = (compiled, ports)
        self._slot_serial[slot] = compiled.serial

    def _write_slot(self, slot: int, contents: dict[str, dict[bytes, bytes]],
                    ports: bytes) -> None:
        self._slot_serial.pop(slot, None)
        # Forgotten while written, as a delta write does: a write that fails
        # half way leaves the slot holding neither, so the next one reads it
        # back instead of comparing against what it held before.
        cur, cur_ports = self._slots.pop(slot, None) or self._read_slot(slot)
        if not isinstance(cur, dict):
            cur = cur.map_contents()
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
        """Write the 4 KiB stretches of the slot's port classes that differ,
        into the mapped array (aligned 4-byte stores: a program reading a
        class sees the old or the new one — and it reads no idle slot)."""
        base = abi.port_class_index(slot, False, 0)
        chunk = 1024  # ports per comparison
        classes = self.maps["port_class_map"].array_u32()
        for start in range(0, len(new) // 4, chunk):
            part = new[start * 4:(start + chunk) * 4]
            if old[start * 4:(start + chunk) * 4] == part:
                continue
            at = 2 * (base + start)
            classes[at:at + 2 * (len(part) // 4):2] = memoryview(part).cast("I")

    def _read_slot(self, slot: int) -> tuple[dict[str, dict[bytes, bytes]], bytes]:
        """What a slot holds in the kernel (after a restart, or a crash in
        the middle of an apply), without the slot fields. The maps are read
        whole, so the other slots not known yet are noted too: at start the
        converge after the first apply would otherwise read back the
        hundreds of thousands of entries that apply just wrote."""
        every: dict[int, dict[str, dict[bytes, bytes]]] = {
            s: {name: {} for name in self._POLICY_MAPS} for s in range(abi.POLICY_SLOTS)}
        for name in self._POLICY_MAPS:
            m, off = self.maps[name], 4 if name in self._LPM_MAPS else 0
            for key, value in self._all_items(m):
                s = _U32.unpack_from(key, off)[0]
                if s in every:
                    every[s][name][key[:off] + key[off + 4:]] = value
        # Each slot's stretch of the array, read as memory (a batch lookup
        # of the whole took most of a restart's first apply).
        classes = self.maps["port_class_map"].array_u32()
        read = {}
        for s, contents in every.items():
            first = abi.port_class_index(s, False, 0)
            read[s] = (contents, classes[2 * first:2 * (first + _PORTS_PER_SLOT):2].tobytes())
            if s != slot and s not in self._slots and s not in self._slot_serial:
                self._slots[s] = read[s]
        return read[slot]

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

    def read_rule_stats(self, name: str = "rule_stats_map") -> dict[int, tuple[int, int]]:
        """rule id -> (hits, last hit ns); last hit is the max over CPUs.
        name="staged_rule_stats_map": the staged policy's rules."""
        m = self.maps[name]
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

    def read_event_stats(self) -> dict[tuple[abi.Ring, abi.EventType], tuple[int, int]]:
        """(ring, event type) -> (submitted, lost) records."""
        out = {}
        for i, v in self._percpu_sums("event_stats_map", abi.EVENT_STATS).items():
            ring, etype = divmod(i, abi.EVENT_TYPE_SLOTS)
            if etype in abi.EventType._value2member_map_ and ring < len(abi.Ring):
                out[(abi.Ring(ring), abi.EventType(etype))] = v
        return out  # type: ignore[return-value]

    def read_session_stats(self) -> SessionCounts:
        """Entries the datapath made, deleted and moved since the pins were
        made (struct session_stats)."""
        return SessionCounts(*self._percpu_sums("session_stats_map", abi.SESSION_STATS)
                             .get(0, ()))

    def session_batches(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
        """Both session tables as (keys, values, count) batch buffers."""
        for name in SESSION_TABLES:
            yield from self.maps[name].lookup_batch_raw(chunk)

    def sessions(self, chunk: int = 8192) -> Iterator[SessionEntry]:
        """Stream the session tables (batch lookups, never all in memory)."""
        return decode_sessions(self.session_batches(chunk))

    def session_count(self) -> int:
        return sum(c for _, _, c in self.session_batches())

    def aggregates(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every denied flow being aggregated (agg_map)."""
        return self.maps["agg_map"].lookup_batch()

    def flush_flow(self, key: bytes) -> int:
        """Run mseg_flush for one agg_map key: report what the flow holds,
        or retire it (bpf/lib/aggregate.h; returns its FLUSH_* code)."""
        return bpfsys.prog_test_run(self.flush_fd, key).retval

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
        for name in (*SESSION_TABLES, "frag_map", "agg_map"):
            m = self.maps[name]
            for keys, _values, count in list(m.lookup_batch_raw()):
                m.delete_batch(keys, count)
        for name in ("stats_map", "rule_stats_map", "event_stats_map", "session_stats_map",
                     "staged_stats_map", "staged_rule_stats_map"):
            m = self.maps[name]
            n = m.max_entries
            keys = b"".join(_U32.pack(i) for i in range(n))
            m.update_batch(keys, bytes(m.full_value_size * n), n)

    # -- testing -----------------------------------------------------------

    def test_run(self, packet: bytes, direction: abi.Direction = abi.Direction.INGRESS,
                 *, repeat: int = 1, ifindex: int = 0, gso_segs: int = 0
                 ) -> bpfsys.TestRunResult:
        """Run an entry point on a crafted frame (BPF_PROG_TEST_RUN), as if
        at the hook of link ifindex (0: loopback), as a GSO super-packet of
        gso_segs segments when given."""
        fd = self.ingress_fd if direction == abi.Direction.INGRESS else self.egress_fd
        ctx = bpfsys.skb_context(ifindex=ifindex, gso_segs=gso_segs) \
            if ifindex or gso_segs else None
        return bpfsys.prog_test_run(fd, packet, repeat=repeat, ctx=ctx)
