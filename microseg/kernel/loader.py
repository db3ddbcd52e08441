"""Compile and load the TC program with BCC, and guard its pins.

The program is one C text (our headers inlined, see program_source) that
BCC compiles at load time. Its maps are pinned under the pin directory so
that sessions and the last policy outlive the daemon; check_pins() removes
any pin whose layout this program must not reuse before BCC reuses it
blindly.

The loaded programs are pinned too, under a name holding a hash of
everything that went into them (program_identity): a restart on the same
pins with the same source reuses them — no compile, no verifier run
(docs/how-it-works.md "Start and restart") — provided they use exactly the
pinned maps.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import struct
import threading
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
# The hooks' programs are copies of one function, mseg_entry, each with its
# kind written into an immediate (bpf/microseg.bpf.c entry_kind): BCC
# compiles the packet path once instead of once per hook.
ENTRY_FUNCTION = "mseg_entry"
ENTRY_KINDS = {PROG_INGRESS: 0, PROG_EGRESS: 1, PROG_INGRESS_L3: 2, PROG_EGRESS_L3: 3}
# The stages likewise: copies of mseg_stage (STAGE_KIND_* in the C).
STAGE_FUNCTION = "mseg_stage"
STAGE_KINDS = {PROG_REPLY: 0, PROG_STAGED: 1}
# Every program loaded as a copy of a function: (function, kind).
COPIES = {**{name: (ENTRY_FUNCTION, kind) for name, kind in ENTRY_KINDS.items()},
          **{name: (STAGE_FUNCTION, kind) for name, kind in STAGE_KINDS.items()}}
ENTRY_MAGIC = 0x6D736567  # the immediate's high word until replaced
PROGRAMS = (PROG_INGRESS, PROG_EGRESS, PROG_CLOCK, PROG_FLUSH, PROG_REPLY, PROG_STAGED)
# stage_map's slots and the programs that fill them (enum mseg_stage).
STAGES = {abi.Stage.REPLY: PROG_REPLY, abi.Stage.STAGED: PROG_STAGED}

PROG_PIN_PREFIX = "prog_"
"""Pinned programs: prog_<identity>_<name> in the pin directory (bpffs
names may not hold a dot)."""

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
                  "-Wno-unused-function",
                  # -O1, not BCC's -O2: a cold start's compile takes 0.15-0.25 s
                  # less and the verifier processes a quarter fewer instructions
                  # (339,673 against 453,914 for an entry point), while the
                  # per-packet costs stay within noise (docs/performance.md).
                  "-O1"]
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
    # The pinned programs of an earlier daemon, same source: no compile.
    reused_programs: bool = False
    identity: str = ""
    # The C text the identity hashes: what programs compiled later (the L3
    # entry points) are made of, whatever is on disk by then.
    text: str = field(default="", repr=False, compare=False)


@dataclass
class LoadedProgram:
    """What one load gives: BCC's module (it owns the fds), the programs'
    fds by name, and every map."""

    bpf: object
    prog_fds: dict[str, int]
    maps: dict[str, bpfsys.BpfMap]
    report: LoadReport

    @property
    def owned_fds(self) -> list[int]:
        """The program fds BCC's module does not own (it closes its own)."""
        return [fd for name, fd in self.prog_fds.items()
                if self.bpf is None or name in COPIES]


def program_identity(config: DatapathConfig, text: str | None = None) -> str:
    """A hash of everything a loaded program depends on: its C text, the
    -D flags (capacities, pin directory), the ABI, the kernel and BCC."""
    import bcc

    h = hashlib.sha256()
    for part in (text if text is not None else program_source(config.source),
                 "\0".join(config.cflags()), str(abi.ABI_VERSION), os.uname().release,
                 getattr(bcc, "__version__", "")):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def program_pin(config: DatapathConfig, identity: str, name: str) -> str:
    assert config.pin_dir
    return os.path.join(config.pin_dir, f"{PROG_PIN_PREFIX}{identity}_{name}")


def program_pins(pin_dir: str | None) -> list[str]:
    """Every pinned program in the pin directory, of any identity."""
    if not pin_dir or not os.path.isdir(pin_dir):
        return []
    return [os.path.join(pin_dir, n) for n in os.listdir(pin_dir)
            if n.startswith(PROG_PIN_PREFIX)]


def _open_pinned_maps(config: DatapathConfig) -> dict[str, bpfsys.BpfMap] | None:
    maps: dict[str, bpfsys.BpfMap] = {}
    try:
        for name in config.map_specs():
            maps[name] = bpfsys.BpfMap.from_pin(os.path.join(config.pin_dir, name), name)
    except OSError:
        for m in maps.values():
            m.close()
        return None
    return maps


def reuse_programs(config: DatapathConfig, identity: str,
                   programs: tuple[str, ...], text: str = "") -> LoadedProgram | None:
    """The pinned programs of this identity and the pinned maps, if every
    one is there and the programs use no map but these; else None.

    The map check matters: a map pin replaced since (check_pins, an
    operator) would leave the programs writing to a map nobody reads."""
    if not config.pin_dir:
        return None
    t0 = time.perf_counter()
    paths = {name: program_pin(config, identity, name) for name in programs}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    maps = _open_pinned_maps(config)
    if maps is None:
        return None
    fds: dict[str, int] = {}
    try:
        for name, path in paths.items():
            fds[name] = bpfsys.obj_get(path)
        ids = {bpfsys.map_info(m.fd).id for m in maps.values()}
        for name, fd in fds.items():
            info, used = bpfsys.prog_info(fd), bpfsys.prog_map_ids(fd)
            # Ours by kind and name, and using pinned maps only (every one
            # of ours uses some).
            if (info.type != bpfsys.BPF_PROG_TYPE_SCHED_CLS or info.name != name[:15]
                    or not used or not used <= ids):
                raise OSError(f"pinned program {name} is not this program on these maps")
    except OSError:
        for fd in fds.values():
            os.close(fd)
        for m in maps.values():
            m.close()
        return None
    _install_stages(maps, fds)
    return LoadedProgram(None, fds, maps, LoadReport(
        0.0, time.perf_counter() - t0, reused_pins=list(config.map_specs()),
        reused_programs=True, identity=identity, text=text))


def pin_programs(config: DatapathConfig, identity: str, fds: dict[str, int]) -> None:
    """Pin these programs under this identity; pins of other identities go
    (a program attached somewhere lives on as long as its filter does)."""
    if not config.pin_dir:
        return
    for path in program_pins(config.pin_dir):
        if not os.path.basename(path).startswith(f"{PROG_PIN_PREFIX}{identity}_"):
            os.unlink(path)
    for name, fd in fds.items():
        path = program_pin(config, identity, name)
        if os.path.exists(path):
            os.unlink(path)
        bpfsys.obj_pin(fd, path)


def _install_stages(maps: dict[str, bpfsys.BpfMap], fds: dict[str, int]) -> None:
    # The stages the entry points tail-call: this load's programs (also for
    # entry points an earlier daemon left attached: same ABI, same maps).
    for stage, name in STAGES.items():
        if name in fds:
            maps["stage_map"].update(_U32.pack(stage), _U32.pack(fds[name]))


def compile_program(config: DatapathConfig, text: str, identity: str):
    """BCC's module for this configuration and C text, whose program_identity
    is identity (creates or reuses the maps)."""
    from bcc import BPF  # BCC is imported only where the kernel is touched

    if config.pin_dir:
        os.makedirs(config.pin_dir, mode=0o700, exist_ok=True)
    # The build's tag (bpf/lib/policy.h MSEG_BUILD_TAG): decisions one build
    # cached in the pinned policy_cache_map are never served to another (an
    # upgrade that keeps the maps).
    return BPF(text=text.encode(),
               cflags=[*config.cflags(), f"-DMSEG_BUILD_TAG=0x{identity}ULL"])


_LD_IMM64 = 0x18


def entry_program(insns: bytes, kind: int) -> bytes:
    """A copied function's instructions (mseg_entry's, mseg_stage's: COPIES)
    with its kind in place of the marked immediate (a 16-byte ld_imm64: low
    word in the first half, high word in the second); exactly one such
    immediate must be there."""
    found = [i for i in range(0, len(insns) - 15, 8)
             if insns[i] == _LD_IMM64 and insns[i + 1] >> 4 == 0
             and insns[i + 4:i + 8] == b"\0\0\0\0"
             and insns[i + 12:i + 16] == _U32.pack(ENTRY_MAGIC)]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} entry-kind immediates, expected 1")
    out = bytearray(insns)
    out[found[0] + 4:found[0] + 8] = _U32.pack(kind)
    out[found[0] + 12:found[0] + 16] = bytes(4)
    return bytes(out)


def function_insns(bpf, name: str) -> bytes:
    """A program's instructions as loaded (an entry point's with its kind)."""
    if name in COPIES:
        function, kind = COPIES[name]
        return entry_program(bpf.dump_func(function.encode()), kind)
    return bpf.dump_func(name.encode())


def load_functions(bpf, names: tuple[str, ...]) -> dict[str, int]:
    """Load programs of a compiled module, the copies (entry points,
    stages) side by side: the verifier runs in the syscall, which releases
    the GIL, and an entry point takes it about a third of a second."""
    from bcc import BPF

    fds: dict[str, int] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            if name in COPIES:
                fds[name] = bpfsys.prog_load(function_insns(bpf, name), name)
            else:
                fds[name] = bpf.load_func(name.encode(), BPF.SCHED_CLS).fd
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in names if n in COPIES]
    for t in threads:
        t.start()
    for n in names:
        if n not in COPIES:
            one(n)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {n: fds[n] for n in names}


def load_program(config: DatapathConfig, programs: tuple[str, ...] = PROGRAMS) -> LoadedProgram:
    """Reuse the pinned programs of the same source, or compile and load
    them (and pin them); open every map (pinned where configured)."""
    warnings = check_pins(config)
    text = program_source(config.source)
    identity = program_identity(config, text)
    if not warnings:
        reused = reuse_programs(config, identity, programs, text)
        if reused is not None:
            return reused
    pinned = [n for n in config.map_specs()
              if config.pin_dir and os.path.exists(os.path.join(config.pin_dir, n))]
    t0 = time.perf_counter()
    bpf = compile_program(config, text, identity)
    t1 = time.perf_counter()
    fds = load_functions(bpf, programs)
    t2 = time.perf_counter()
    maps = {name: bpfsys.BpfMap(bpf.get_table(name.encode()).map_fd, name)
            for name in config.map_specs()}
    maps["meta_map"].update(_U32.pack(0), _U32.pack(abi.ABI_VERSION))
    _install_stages(maps, fds)
    pin_programs(config, identity, fds)
    return LoadedProgram(bpf, fds, maps, LoadReport(t1 - t0, t2 - t1, warnings, pinned,
                                                    identity=identity, text=text))


def remove_pins(config: DatapathConfig) -> list[str]:
    """Remove every pin this program owns (maps and programs), and the pin
    directory if it is then empty; the pins that could not be removed."""
    if not config.pin_dir:
        return []
    names = list(config.map_specs())
    names += [os.path.basename(p) for p in program_pins(config.pin_dir)]
    left: list[str] = []
    for _attempt in range(2):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(config.pin_dir, name))
        # What is still (or again) there: try once more.
        left = [n for n in names if os.path.exists(os.path.join(config.pin_dir, n))]
        if not left:
            break
    with contextlib.suppress(OSError):
        os.rmdir(config.pin_dir)
    return left


class Preload:
    """A cold start's compile and load, begun in a thread while the daemon
    imports its modules and checks its configuration (BCC's compile and
    the verifier run in C, without the GIL).

    Only when nothing is pinned yet: then everything the load creates is
    its own, and a start that fails before taking it (a usage error, an
    invalid policy) removes it all again — a refused start changes nothing.
    A restart on pins loads in its turn, as before: reusing the pinned
    programs takes milliseconds."""

    def __init__(self, config: DatapathConfig) -> None:
        self.config = config
        self._result: LoadedProgram | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name="microseg-load", daemon=True)
        self._thread.start()

    @classmethod
    def begin(cls, config: DatapathConfig) -> Preload | None:
        if config.pin_dir and os.path.isdir(config.pin_dir) and os.listdir(config.pin_dir):
            return None
        return cls(config)

    def _run(self) -> None:
        try:
            self._result = load_program(self.config)
        except BaseException as e:  # handed to whoever takes it
            self._error = e

    def take(self) -> LoadedProgram:
        self._thread.join()
        self._taken = True
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def discard(self) -> None:
        """Undo the load unless it was taken."""
        if self._taken:
            return
        self._taken = True
        self._thread.join()
        prog = self._result
        if prog is None:
            remove_pins(self.config)
            return
        for fd in prog.owned_fds:
            os.close(fd)
        for m in prog.maps.values():
            m.close()
        if prog.bpf is not None:
            prog.bpf.cleanup()
        remove_pins(self.config)
