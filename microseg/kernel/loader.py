"""Compile and load the TC program with BCC, and guard its pins.

The program is one C text (our headers inlined, see program_source) that
BCC compiles at load time. Its maps are pinned under the pin directory so
that sessions and the last policy outlive the daemon; check_pins() removes
any pin whose layout this program must not reuse before BCC reuses it
blindly.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from microseg.kernel import abi, bpfsys
from microseg.kernel.maps import MapSpec, map_specs

DEFAULT_PIN_DIR = "/sys/fs/bpf/microseg"
# Four policy slots (two active, two staged) may each hold a whole policy;
# the maps allocate entries as they are written (BPF_F_NO_PREALLOC).
IDENT_CAPACITY = 262144
POLICY_CAPACITY = 1 << 21
FRAG_CAPACITY = 65536
AGG_CAPACITY = 65536
ENTRY = "microseg.bpf.c"
PROG_INGRESS = "mseg_ingress"
PROG_EGRESS = "mseg_egress"
PROG_INGRESS_L3 = "mseg_ingress_l3"
PROG_EGRESS_L3 = "mseg_egress_l3"
PROG_CLOCK = "mseg_clock"
PROG_FLUSH = "mseg_flush"
PROG_REPLY = "mseg_reply"
# Loaded at start; the L3 entry points only when a link needs them (each
# program costs its verifier run).
PROG_STAGED = "mseg_staged"
PROGRAMS = (PROG_INGRESS, PROG_EGRESS, PROG_CLOCK, PROG_FLUSH, PROG_REPLY, PROG_STAGED)
# stage_map's slots and the programs that fill them (enum mseg_stage).
STAGES = {abi.Stage.REPLY: PROG_REPLY, abi.Stage.STAGED: PROG_STAGED}

_U32 = struct.Struct("<I")
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


@dataclass(frozen=True)
class DatapathConfig:
    pin_dir: str | None = DEFAULT_PIN_DIR
    session_capacity: int = 1 << 20
    ringbuf_bytes: int = 16 << 20
    # The C entry file; None: bpf/microseg.bpf.c. bench/ compiles its own
    # entry, which includes the production program and adds its harness.
    source: Path | None = None

    def __post_init__(self) -> None:
        rb = self.ringbuf_bytes
        if rb < mmap.PAGESIZE or rb & (rb - 1):
            raise ValueError(f"ring buffer size must be a power of two >= {mmap.PAGESIZE}")
        if self.session_capacity < 1:
            raise ValueError("session capacity must be positive")

    @property
    def pending_capacity(self) -> int:
        """Sessions that have seen one direction only: a quarter of the
        table (they expire within a minute; bpf/lib/session.h)."""
        return max(1024, self.session_capacity // 4)

    @property
    def denials_bytes(self) -> int:
        """The ring of denied verdicts and drops: as large as the main one
        (--ringbuf-bytes is each ring's size), for --event-window 0, where
        every denied packet is an event."""
        return self.ringbuf_bytes

    def capacities(self) -> dict[str, int]:
        """The configurable capacities, by their C symbol (-D flags)."""
        return {
            "MSEG_SESSION_CAPACITY": self.session_capacity,
            "MSEG_PENDING_CAPACITY": self.pending_capacity,
            "MSEG_IDENT_CAPACITY": IDENT_CAPACITY,
            "MSEG_POLICY_CAPACITY": POLICY_CAPACITY,
            "MSEG_FRAG_CAPACITY": FRAG_CAPACITY,
            "MSEG_AGG_CAPACITY": AGG_CAPACITY,
        }

    def ring_bytes(self) -> dict[abi.Ring, int]:
        return {abi.Ring.EVENTS: self.ringbuf_bytes, abi.Ring.DENIALS: self.denials_bytes}

    def map_specs(self) -> dict[str, MapSpec]:
        """Every map the program defines, as the kernel should report it."""
        return map_specs(self.capacities(), self.ring_bytes())

    def cflags(self) -> list[str]:
        flags = [f"-D{name}={value}" for name, value in self.capacities().items()]
        flags += [f"-DMSEG_RINGBUF_PAGES={self.ringbuf_bytes // mmap.PAGESIZE}",
                  f"-DMSEG_DENIALS_PAGES={self.denials_bytes // mmap.PAGESIZE}",
                  "-Wno-unused-function"]
        if self.pin_dir:
            flags.append(f'-DMSEG_PIN_DIR="{self.pin_dir}"')
        return flags


def bpf_source_dir() -> Path:
    """bpf/ beside the package in a source tree (also when the package is
    imported from the checkout rather than through the editable install),
    else the copy installed as package data."""
    tree = Path(__file__).resolve().parents[2] / "bpf"
    if (tree / ENTRY).is_file():
        return tree
    return Path(str(resources.files("microseg.bpf")))


def program_source(entry: Path | None = None) -> str:
    """The program as one text, our own ``#include "..."`` files inlined
    (each once, like an include guard would).

    BCC rewrites map method calls (``session_map.lookup(&k)``) only in its
    main file, so the headers under bpf/lib must be part of that file.
    """
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

    return "\n".join(inline(entry or bpf_source_dir() / ENTRY)) + "\n"


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


@dataclass
class LoadedProgram:
    """What one load gives: BCC's module (it owns the fds), the programs'
    fds by name, and every map."""

    bpf: object
    prog_fds: dict[str, int]
    maps: dict[str, bpfsys.BpfMap]
    report: LoadReport


def load_program(config: DatapathConfig, programs: tuple[str, ...] = PROGRAMS) -> LoadedProgram:
    """Compile, load the programs, open every map (pinned where configured)."""
    from bcc import BPF  # BCC is imported only where the kernel is touched

    warnings = check_pins(config)
    reused = []
    if config.pin_dir:
        os.makedirs(config.pin_dir, mode=0o700, exist_ok=True)
        reused = [n for n in config.map_specs()
                  if os.path.exists(os.path.join(config.pin_dir, n))]
    t0 = time.perf_counter()
    bpf = BPF(text=program_source(config.source).encode(), cflags=config.cflags())
    t1 = time.perf_counter()
    fds = {name: bpf.load_func(name.encode(), BPF.SCHED_CLS).fd for name in programs}
    t2 = time.perf_counter()
    maps = {name: bpfsys.BpfMap(bpf.get_table(name.encode()).map_fd, name)
            for name in config.map_specs()}
    maps["meta_map"].update(_U32.pack(0), _U32.pack(abi.ABI_VERSION))
    # The stages the entry points tail-call: this load's programs (also for
    # entry points an earlier daemon left attached: same ABI, same maps).
    for stage, name in STAGES.items():
        if name in fds:
            maps["stage_map"].update(_U32.pack(stage), _U32.pack(fds[name]))
    return LoadedProgram(bpf, fds, maps, LoadReport(t1 - t0, t2 - t1, warnings, reused))

