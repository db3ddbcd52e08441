"""Thin ctypes bindings to libbpf's low-level syscall wrappers.

BCC compiles and loads the program; everything done on maps and programs
afterwards goes through these calls on plain file descriptors: they are
several times faster than BCC's table classes for bulk work (batch ops into
flat buffers), and they work on pinned objects BCC never opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_F_NO_PREALLOC = 1
BPF_F_MMAPABLE = 1 << 10

BPF_STATS_RUN_TIME = 0

_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_ARRAY, 5, 10}  # percpu array/hash/lru_hash
# Errors meaning "this map type has no batch op" (524 is the kernel's ENOTSUPP).
_BATCH_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, 524}


class BpfError(OSError):
    """A failed bpf() call, with the operation named."""


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    return ctypes.CDLL(name, use_errno=True)


LIB = _lib()


def _check(rc: int, what: str) -> int:
    # libbpf >= 1.0: the low-level calls return -errno.
    if rc < 0:
        raise BpfError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


# struct bpf_prog_info: only the fields we read, at their fixed offsets.
_PROG_INFO_LEN = 232
_PROG_INFO_ID = 4
_PROG_INFO_NR_MAP_IDS = 52
_PROG_INFO_MAP_IDS = 56
_PROG_INFO_NAME = 64
_PROG_INFO_RUN_TIME_NS = 192
_PROG_INFO_RUN_CNT = 200
_PROG_INFO_VERIFIED_INSNS = 216

LIB.bpf_obj_get.argtypes = [ctypes.c_char_p]
LIB.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
LIB.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                       ctypes.POINTER(ctypes.c_uint32)]
LIB.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
LIB.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_uint64]
LIB.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
LIB.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
LIB.bpf_map_lookup_batch.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_BatchOpts)]
LIB.bpf_map_update_batch.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
    ctypes.POINTER(_BatchOpts)]
LIB.bpf_map_delete_batch.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
    ctypes.POINTER(_BatchOpts)]
LIB.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
LIB.bpf_enable_stats.argtypes = [ctypes.c_int]
LIB.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
LIB.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        last = 0
        for part in f.read().strip().split(","):
            last = max(last, int(part.split("-")[-1]))
    return last + 1


def obj_get(path: str) -> int:
    return _check(LIB.bpf_obj_get(path.encode()), f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    _check(LIB.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(LIB.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "bpf_obj_get_info_by_fd(map)")
    return info


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    type: int
    run_time_ns: int
    run_cnt: int
    verified_insns: int  # instructions the verifier processed (kernel >= 5.16; else 0)


def prog_info(fd: int) -> ProgInfo:
    buf = ctypes.create_string_buffer(_PROG_INFO_LEN)
    size = ctypes.c_uint32(_PROG_INFO_LEN)
    _check(LIB.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)),
           "bpf_obj_get_info_by_fd(prog)")
    raw = buf.raw
    return ProgInfo(
        id=int.from_bytes(raw[_PROG_INFO_ID:_PROG_INFO_ID + 4], "little"),
        name=raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0")[0].decode(),
        type=int.from_bytes(raw[0:4], "little"),
        run_time_ns=int.from_bytes(raw[_PROG_INFO_RUN_TIME_NS:_PROG_INFO_RUN_TIME_NS + 8],
                                   "little"),
        run_cnt=int.from_bytes(raw[_PROG_INFO_RUN_CNT:_PROG_INFO_RUN_CNT + 8], "little"),
        verified_insns=int.from_bytes(
            raw[_PROG_INFO_VERIFIED_INSNS:_PROG_INFO_VERIFIED_INSNS + 4], "little")
        if size.value >= _PROG_INFO_VERIFIED_INSNS + 4 else 0,
    )


def prog_map_ids(fd: int) -> set[int]:
    """The ids of the maps a loaded program uses (bpf_prog_info.map_ids)."""
    raw = ctypes.create_string_buffer(_PROG_INFO_LEN)
    size = ctypes.c_uint32(_PROG_INFO_LEN)
    _check(LIB.bpf_obj_get_info_by_fd(fd, raw, ctypes.byref(size)),
           "bpf_obj_get_info_by_fd(prog)")
    n = int.from_bytes(raw.raw[_PROG_INFO_NR_MAP_IDS:_PROG_INFO_NR_MAP_IDS + 4], "little")
    ids = (ctypes.c_uint32 * max(n, 1))()
    query = ctypes.create_string_buffer(_PROG_INFO_LEN)
    query[_PROG_INFO_NR_MAP_IDS:_PROG_INFO_NR_MAP_IDS + 4] = n.to_bytes(4, "little")
    query[_PROG_INFO_MAP_IDS:_PROG_INFO_MAP_IDS + 8] = \
        ctypes.addressof(ids).to_bytes(8, "little")
    size = ctypes.c_uint32(_PROG_INFO_LEN)
    _check(LIB.bpf_obj_get_info_by_fd(fd, query, ctypes.byref(size)),
           "bpf_obj_get_info_by_fd(prog map ids)")
    return set(ids[:n])


def prog_fd_by_id(prog_id: int) -> int:
    """An fd for a loaded program (e.g. the one a tc filter runs)."""
    return _check(LIB.bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


def enable_run_time_stats() -> int:
    """Turn on kernel run-time accounting for BPF programs while the
    returned fd stays open (cheaper than the global sysctl: it ends with us)."""
    return _check(LIB.bpf_enable_stats(BPF_STATS_RUN_TIME), "bpf_enable_stats")


class BpfMap:
    """A map by file descriptor, keys and values as bytes.

    Per-CPU maps take and return values for every possible CPU, each slot
    padded to 8 bytes, as the kernel lays them out.
    """

    def __init__(self, fd: int, name: str = "", *, owned: bool = False) -> None:
        self.fd = fd
        info = map_info(fd)
        self.name = name or info.name.decode()
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.flags = info.map_flags
        self.percpu = info.type in _PERCPU_TYPES
        self.value_stride = (info.value_size + 7) & ~7 if self.percpu else info.value_size
        self.full_value_size = (self.value_stride * possible_cpus() if self.percpu
                                else info.value_size)
        self._owned = owned
        self._mmap: mmap.mmap | None = None

    @classmethod
    def from_pin(cls, path: str, name: str = "") -> BpfMap:
        return cls(obj_get(path), name, owned=True)

    def close(self) -> None:
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
                self._mmap.close()
            self._mmap = None
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def array_u32(self) -> memoryview:
        """A BPF_F_MMAPABLE array of u32 as memory: element i at [2 * i]
        (the kernel lays elements out 8 bytes apart). Reads and writes
        touch the map itself, without a syscall per batch."""
        assert self.type == BPF_MAP_TYPE_ARRAY and self.flags & BPF_F_MMAPABLE
        assert self.value_size == 4
        if self._mmap is None:
            size = -(-self.max_entries * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        return memoryview(self._mmap).cast("I")[:2 * self.max_entries]

    # -- single elements -------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.full_value_size)
        rc = LIB.bpf_map_lookup_elem(self.fd, key, value)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"lookup in {self.name}")
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _check(LIB.bpf_map_update_elem(self.fd, key, value, flags), f"update {self.name}")

    def delete(self, key: bytes) -> bool:
        rc = LIB.bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        _check(rc, f"delete from {self.name}")
        return True

    def iter_keys(self) -> Iterator[bytes]:
        """Every key by get_next_key: for maps without batch lookup (LPM)."""
        key = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        rc = LIB.bpf_map_get_next_key(self.fd, None, nxt)
        while rc == 0:
            yield nxt.raw
            ctypes.memmove(key, nxt, self.key_size)
            rc = LIB.bpf_map_get_next_key(self.fd, key, nxt)

    def percpu_values(self, raw: bytes) -> list[bytes]:
        """Split a per-CPU value into one bytes object per CPU."""
        s, n = self.value_stride, self.value_size
        return [raw[i:i + n] for i in range(0, len(raw), s)]

    # -- batches -----------------------------------------------------------

    def lookup_batch(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs in chunks: one syscall per chunk, one copy
        each into flat buffers that are then sliced."""
        for keys, values, count in self.lookup_batch_raw(chunk):
            ks, vs = self.key_size, self.full_value_size
            for i in range(count):
                yield keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]

    def lookup_batch_raw(self, chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
        """Like lookup_batch but yields (keys, values, count) flat buffers,
        for callers that decode with struct.iter_unpack."""
        keys = ctypes.create_string_buffer(self.key_size * chunk)
        values = ctypes.create_string_buffer(self.full_value_size * chunk)
        in_batch = ctypes.create_string_buffer(max(self.key_size, 8))
        out_batch = ctypes.create_string_buffer(max(self.key_size, 8))
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            rc = LIB.bpf_map_lookup_batch(
                self.fd, None if first else in_batch, out_batch, keys, values,
                ctypes.byref(count), ctypes.byref(opts))
            done = rc == -errno.ENOENT  # the last chunk
            if not done:
                _check(rc, f"lookup_batch {self.name}")
            n = count.value
            if n:  # one copy of what was filled (.raw would copy the whole buffer first)
                yield (ctypes.string_at(keys, n * self.key_size),
                       ctypes.string_at(values, n * self.full_value_size), n)
            if done:
                return
            ctypes.memmove(in_batch, out_batch, len(out_batch))
            first = False

    def update_batch(self, keys: bytes, values: bytes, count: int,
                     flags: int = BPF_ANY) -> None:
        """Write count (key, value) pairs from flat buffers in one syscall;
        maps without batch support (LPM tries) fall back to single updates."""
        if count == 0:
            return
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), flags, 0)
        n = ctypes.c_uint32(count)
        rc = LIB.bpf_map_update_batch(self.fd, keys, values, ctypes.byref(n),
                                      ctypes.byref(opts))
        if rc == 0:
            return
        if -rc not in _BATCH_UNSUPPORTED:
            _check(rc, f"update_batch {self.name}")
        ks, vs = self.key_size, self.full_value_size
        for i in range(n.value, count):
            self.update(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs], flags)

    def delete_batch(self, keys: bytes, count: int) -> int:
        """Delete count keys from a flat buffer; missing keys are ignored.
        Returns how many were deleted."""
        if count == 0:
            return 0
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        n = ctypes.c_uint32(count)
        rc = LIB.bpf_map_delete_batch(self.fd, keys, ctypes.byref(n), ctypes.byref(opts))
        if rc == 0:
            return count
        # The batch stops at the first missing key (gone meanwhile: the LRU
        # evicted it, or the datapath replaced it): the rest one by one.
        ks = self.key_size
        done = n.value
        for i in range(n.value, count):
            done += self.delete(keys[i * ks:(i + 1) * ks])
        return done


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


# struct __sk_buff: the fields BPF_PROG_TEST_RUN lets a caller set for a
# sched_cls program, at their offsets (uapi/linux/bpf.h).
_SKB_CTX_SIZE = 192
_SKB_IFINDEX = 40
_SKB_GSO_SEGS = 164


def skb_context(*, ifindex: int = 0, gso_segs: int = 0) -> bytes:
    """A struct __sk_buff for prog_test_run's ctx: the packet arrives at
    link ifindex (its hooks' identity), as gso_segs segments."""
    ctx = bytearray(_SKB_CTX_SIZE)
    ctx[_SKB_IFINDEX:_SKB_IFINDEX + 4] = ifindex.to_bytes(4, "little")
    ctx[_SKB_GSO_SEGS:_SKB_GSO_SEGS + 4] = gso_segs.to_bytes(4, "little")
    return bytes(ctx)


def _test_run_opts(data: bytes, ctx: bytes | None, repeat: int
                   ) -> tuple[_TestRunOpts, list[ctypes.Array]]:
    """BPF_PROG_TEST_RUN's options for this packet and context; the buffers
    they point into, which must outlive the call."""
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    inbuf = ctypes.create_string_buffer(data, len(data))
    opts.data_in = ctypes.cast(inbuf, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.repeat = repeat
    keep = [inbuf]
    if ctx is not None:
        ctxbuf = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctxbuf, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        keep.append(ctxbuf)
    return opts, keep


def prog_test_run(prog_fd: int, data: bytes, *, repeat: int = 1,
                  ctx: bytes | None = None) -> TestRunResult:
    """Run the program on one packet in the kernel (BPF_PROG_TEST_RUN).

    With repeat > 1 the kernel runs it that many times and reports the mean
    duration per run in nanoseconds.
    """
    opts, _keep = _test_run_opts(data, ctx, repeat)
    out = ctypes.create_string_buffer(len(data) + 256)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    opts.data_size_out = len(out)
    _check(LIB.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run")
    return TestRunResult(opts.retval, opts.duration, out.raw[:opts.data_size_out])


# BPF_PROG_TEST_RUN of an XDP program in live-frames mode (uapi/linux/bpf.h):
# what the program returns happens to each frame for real.
_BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
_XDP_MD_SIZE = 24  # struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
_XDP_MD_DATA_END, _XDP_MD_INGRESS_IFINDEX = 4, 12


def xdp_live_frames(prog_fd: int, frame: bytes, ifindex: int, *, repeat: int,
                    batch_size: int = 64) -> None:
    """Run an XDP program over `repeat` fresh copies of `frame`, each as if
    received on link `ifindex` of the caller's network namespace, for real:
    a frame it returns XDP_TX for is transmitted on that link. A packet
    generator inside the kernel, with no socket and no copy from userspace
    per frame (the benchmark's stress generator, bench/stress.py)."""
    ctx = bytearray(_XDP_MD_SIZE)
    ctx[_XDP_MD_DATA_END:_XDP_MD_DATA_END + 4] = len(frame).to_bytes(4, "little")
    ctx[_XDP_MD_INGRESS_IFINDEX:_XDP_MD_INGRESS_IFINDEX + 4] = ifindex.to_bytes(4, "little")
    opts, _keep = _test_run_opts(frame, bytes(ctx), repeat)
    opts.flags = _BPF_F_TEST_XDP_LIVE_FRAMES
    opts.batch_size = batch_size
    _check(LIB.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)),
           "bpf_prog_test_run (XDP live frames)")


# membarrier(2): MEMBARRIER_CMD_GLOBAL returns after synchronize_rcu(), i.e.
# once every RCU read-side section that was running has ended — and every
# BPF program run is one. The syscall's number by machine.
_MEMBARRIER_CMD_GLOBAL = 1
_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "ppc64le": 365, "s390x": 356,
                  "riscv64": 283}


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def wait_for_running_programs() -> None:
    """Return once every BPF program run in progress when called has ended
    (an RCU grace period). Raises OSError where membarrier cannot give it
    (a nohz_full kernel, an unknown machine)."""
    nr = _NR_MEMBARRIER.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"membarrier: unknown syscall number on "
                                    f"{os.uname().machine}")
    if _libc().syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"membarrier(MEMBARRIER_CMD_GLOBAL): {os.strerror(e)}")


# -- the verifier's own figures for a program ------------------------------------

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
_BPF_LOG_STATS = 4


class _ProgLoadAttr(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD (uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


def _prog_load(insns: bytes, name: str, prog_type: int, log_level: int,
               log_size: int) -> tuple[int, str]:
    """One BPF_PROG_LOAD: (fd, or -errno; the verifier's log)."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf: unknown syscall number on {os.uname().machine}")
    license_ = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(log_size or 1)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8,
                         insns=ctypes.addressof(code), license=ctypes.addressof(license_),
                         log_level=log_level, log_size=log_size,
                         log_buf=ctypes.addressof(log) if log_size else 0,
                         prog_name=name.encode()[:15])
    fd = _libc().syscall(nr, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    return (fd if fd >= 0 else -ctypes.get_errno()), log.value.decode(errors="replace")


def prog_load(insns: bytes, name: str, prog_type: int = BPF_PROG_TYPE_SCHED_CLS) -> int:
    """Load a program from its instructions (map references already fds);
    its fd. On refusal, the error carries the end of the verifier's log
    (the load is repeated with the log on: a log costs time when it works)."""
    fd, _ = _prog_load(insns, name, prog_type, 0, 0)
    if fd in (-errno.EACCES, -errno.EINVAL):
        fd, log = _prog_load(insns, name, prog_type, 1, 1 << 24)
        if fd < 0:
            raise OSError(-fd, f"BPF_PROG_LOAD {name}: {os.strerror(-fd)}: {log[-2000:]}")
    if fd < 0:
        raise OSError(-fd, f"BPF_PROG_LOAD {name}: {os.strerror(-fd)}")
    return fd


@dataclass(frozen=True)
class VerifierStats:
    instructions: int           # instructions the verifier processed (all paths)
    stack_depth: tuple[int, ...]  # bytes, per subprogram
    verification_us: int | None


def verifier_stats(insns: bytes, name: str = "",
                   prog_type: int = BPF_PROG_TYPE_SCHED_CLS) -> VerifierStats:
    """Load a program's instructions once more, asking the verifier for its
    statistics (BPF_LOG_STATS), and close it again. BCC's loader does not
    hand the verifier's log out; this is the same program, verified alike."""
    import re

    fd, text = _prog_load(insns, name, prog_type, _BPF_LOG_STATS, 1 << 16)
    if fd < 0:
        raise OSError(-fd, f"BPF_PROG_LOAD {name}: {os.strerror(-fd)}: {text[-300:]}")
    os.close(fd)
    processed = re.search(r"processed (\d+) insns", text)
    depth = re.search(r"stack depth ([\d+]+)", text)
    took = re.search(r"verification time (\d+) usec", text)
    if not processed:
        raise OSError(errno.EINVAL, f"no verifier statistics for {name}: {text[-300:]}")
    return VerifierStats(int(processed.group(1)),
                         tuple(int(x) for x in depth.group(1).split("+")) if depth else (),
                         int(took.group(1)) if took else None)
