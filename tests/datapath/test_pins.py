"""The loader: pinned maps created with BTF, reused across loads (sessions
survive), checked before reuse, replaced with a warning when their layout
or ABI no longer matches, removed by unpin; pinned programs reused when
their source is the same and they use exactly the pinned maps; kernel
run-time stats."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from microseg.kernel import abi, bpfsys, loader
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.policy.compile import compile_policy

from .harness import tcp
from .policies import DB4, WEB4, shop

pytestmark = pytest.mark.root


def _config(pin_dir: str, capacity: int = 4096) -> DatapathConfig:
    return DatapathConfig(pin_dir=pin_dir, session_capacity=capacity, ringbuf_bytes=1 << 16)


def _loaded(cfg: DatapathConfig) -> tuple[Datapath, object]:
    dp = Datapath(cfg)
    return dp, dp.load()


def _open_session(dp: Datapath) -> None:
    """A handshake's SYN and SYN-ACK: a session in session_map."""
    if dp.active_generation() == 0:
        dp.apply_policy(compile_policy(shop()))
    assert dp.test_run(bytes(tcp(WEB4, DB4, 1234, 5432))).retval == 0
    assert dp.test_run(bytes(tcp(DB4, WEB4, 5432, 1234, "SA"))).retval == 0


def test_pins_are_created_checked_and_reused(pin_dir: str) -> None:
    cfg = _config(pin_dir)
    dp, report = _loaded(cfg)
    try:
        assert report.reused_pins == [] and report.warnings == []
        assert not report.reused_programs
        assert sorted(n for n in os.listdir(pin_dir) if not n.startswith("prog_")) \
            == sorted(cfg.map_specs())
        for name, spec in cfg.map_specs().items():
            info = bpfsys.map_info(dp.maps[name].fd)
            assert (info.type, info.key_size, info.value_size, info.max_entries,
                    info.map_flags) == tuple(spec), name
        _open_session(dp)
        gen = dp.active_generation()
    finally:
        dp.close()

    dp, report = _loaded(cfg)
    try:
        assert sorted(report.reused_pins) == sorted(cfg.map_specs())
        assert report.warnings == []
        (s,) = list(dp.sessions())
        assert (s.src_ip, s.dst_ip, s.dport) == (WEB4, DB4, 5432)
        assert dp.active_generation() == gen
        # The old policy still enforces under the new program.
        assert dp.test_run(bytes(tcp(WEB4, DB4, 1, 22))).retval == 2
    finally:
        dp.close()


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="needs bpftool")
def test_bpftool_reads_pins_with_btf(pin_dir: str) -> None:
    dp, _ = _loaded(_config(pin_dir))
    try:
        _open_session(dp)
        assert bpfsys.map_info(dp.maps["session_map"].fd).btf_id != 0
        out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                              f"{pin_dir}/session_map"], check=True, capture_output=True,
                             text=True).stdout
        (entry,) = json.loads(out)
        fmt = entry["formatted"]
        assert fmt["key"]["port_hi"] == 5432 or fmt["key"]["port_lo"] == 5432
        assert fmt["value"]["packets"] == [1, 1]
        progs = subprocess.run(["bpftool", "-j", "prog", "show"], check=True,
                               capture_output=True, text=True).stdout
        names = {p.get("name") for p in json.loads(progs)}
        assert {"mseg_ingress", "mseg_egress"} <= names
    finally:
        dp.close()


def test_pin_with_other_capacity_is_replaced_with_a_warning(pin_dir: str) -> None:
    dp, _ = _loaded(_config(pin_dir, capacity=4096))
    _open_session(dp)
    dp.close()
    dp, report = _loaded(_config(pin_dir, capacity=8192))
    try:
        # Both session tables: pending_map's capacity follows session_map's.
        assert len(report.warnings) == 2
        assert {w.split()[1] for w in report.warnings} == {"session_map", "pending_map"}
        assert "session_map" not in report.reused_pins
        assert "policy_map" in report.reused_pins
        assert list(dp.sessions()) == []
        assert bpfsys.map_info(dp.maps["session_map"].fd).max_entries == 8192
    finally:
        dp.close()


def test_pin_of_another_kind_is_never_reused(pin_dir: str) -> None:
    from bcc import BPF

    os.makedirs(pin_dir)
    other = BPF(text=b"BPF_ARRAY(impostor, u64, 4);")
    bpfsys.obj_pin(other[b"impostor"].map_fd, f"{pin_dir}/session_map")
    other.cleanup()
    dp, report = _loaded(_config(pin_dir))
    try:
        # The impostor has no meta_map beside it: every pin is distrusted.
        assert report.warnings and "replacing" in report.warnings[0]
        info = bpfsys.map_info(dp.maps["session_map"].fd)
        assert info.type == bpfsys.BPF_MAP_TYPE_LRU_HASH
    finally:
        dp.close()


def test_pins_of_another_abi_are_all_replaced(pin_dir: str) -> None:
    dp, _ = _loaded(_config(pin_dir))
    _open_session(dp)
    dp.maps["meta_map"].update(b"\0\0\0\0", (abi.ABI_VERSION + 1).to_bytes(4, "little"))
    dp.close()
    dp, report = _loaded(_config(pin_dir))
    try:
        assert any(f"ABI {abi.ABI_VERSION + 1}" in w for w in report.warnings)
        assert report.reused_pins == []
        assert list(dp.sessions()) == [] and dp.active_generation() == 0
    finally:
        dp.close()


def test_unpin_removes_everything(pin_dir: str) -> None:
    dp, _ = _loaded(_config(pin_dir))
    dp.close()
    dp.unpin()
    assert not os.path.exists(pin_dir)


def _prog_ids(dp: Datapath) -> dict[str, int]:
    return {name: bpfsys.prog_info(fd).id for name, fd in dp.program_fds().items()}


def _program_pins(pin_dir: str) -> set[str]:
    return {n for n in os.listdir(pin_dir) if n.startswith(loader.PROG_PIN_PREFIX)}


def test_restart_reuses_the_pinned_programs(pin_dir: str) -> None:
    cfg = _config(pin_dir)
    dp, first = _loaded(cfg)
    try:
        assert not first.reused_programs and first.compile_s > 0
        assert _program_pins(pin_dir) == {f"prog_{first.identity}_{n}" for n in loader.PROGRAMS}
        ids = _prog_ids(dp)
        _open_session(dp)
    finally:
        dp.close()

    dp, again = _loaded(cfg)
    try:
        assert again.reused_programs and again.compile_s == 0
        assert again.identity == first.identity
        assert dp.bpf is None  # no compile at all
        assert _prog_ids(dp) == ids  # the very programs, not new ones
        (s,) = list(dp.sessions())
        assert (s.src_ip, s.dst_ip, s.dport) == (WEB4, DB4, 5432)
        # They enforce through the maps this load opened: a policy applied
        # now decides.
        assert dp.test_run(bytes(tcp(WEB4, DB4, 77, 5432))).retval == 0
        assert dp.test_run(bytes(tcp(WEB4, DB4, 78, 9999))).retval == 2
        dp.apply_policy(compile_policy(shop(default="allow")))
        assert dp.test_run(bytes(tcp(WEB4, DB4, 79, 9999))).retval == 0
        # The egress copy is the egress hook's: the reply of that session
        # leaving the database is its own, not a new flow.
        assert dp.test_run(bytes(tcp(DB4, WEB4, 5432, 1234, "A")),
                           abi.Direction.EGRESS).retval == 0
    finally:
        dp.close()


def test_other_source_is_compiled_and_its_pins_replace_the_old(pin_dir: str) -> None:
    dp, first = _loaded(_config(pin_dir, capacity=4096))
    dp.close()
    dp, other = _loaded(_config(pin_dir, capacity=8192))  # other -D flags
    try:
        assert not other.reused_programs and other.identity != first.identity
        assert _program_pins(pin_dir) == {f"prog_{other.identity}_{n}" for n in loader.PROGRAMS}
    finally:
        dp.close()


def test_programs_are_not_reused_over_a_replaced_map(pin_dir: str) -> None:
    """A map pin replaced by one of the same layout (an operator, a tool):
    the pinned programs still write to the old map, so they are compiled
    anew rather than reused."""
    from bcc import BPF

    cfg = _config(pin_dir)
    dp, _ = _loaded(cfg)
    dp.close()
    size = abi.SETTINGS.size
    os.unlink(f"{pin_dir}/settings_map")
    other = BPF(text=f"struct v {{ char b[{size}]; }};\n"
                     f'BPF_TABLE_PINNED("array", u32, struct v, settings_map, 1, '
                     f'"{pin_dir}/settings_map");'.encode())
    other.cleanup()
    dp, report = _loaded(cfg)
    try:
        assert report.warnings == [] and "settings_map" in report.reused_pins
        assert not report.reused_programs
        fd = dp.program_fds()["mseg_ingress"]
        assert bpfsys.map_info(dp.maps["settings_map"].fd).id in bpfsys.prog_map_ids(fd)
    finally:
        dp.close()


def test_l3_programs_after_a_reuse_are_compiled_then_reused(pin_dir: str) -> None:
    cfg = _config(pin_dir)
    dp, _ = _loaded(cfg)
    dp.close()
    dp, report = _loaded(cfg)
    try:
        assert report.reused_programs
        ingress, egress = dp.l3_programs()  # not pinned yet: compiled now
        assert dp.bpf is not None
        l3_ids = (bpfsys.prog_info(ingress).id, bpfsys.prog_info(egress).id)
    finally:
        dp.close()
    dp, report = _loaded(cfg)
    try:
        ingress, egress = dp.l3_programs()
        assert dp.bpf is None  # pinned since: reused
        assert (bpfsys.prog_info(ingress).id, bpfsys.prog_info(egress).id) == l3_ids
    finally:
        dp.close()
    dp.unpin()
    assert not os.path.exists(pin_dir)


def test_each_hook_is_its_own_copy_of_the_entry_point() -> None:
    """One compiled entry function, loaded once per hook kind with the kind
    in its immediate: exactly one immediate is replaced."""
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=1 << 16))
    dp.load()
    try:
        raw = dp.bpf.dump_func(loader.ENTRY_FUNCTION.encode())
        copies = {name: loader.entry_program(raw, kind)
                  for name, kind in loader.ENTRY_KINDS.items()}
        assert len(set(copies.values())) == 4
        assert all(len(c) == len(raw) for c in copies.values())
        assert all(sum(a != b for a, b in zip(c, raw, strict=True)) <= 5
                   for c in copies.values())
        with pytest.raises(RuntimeError, match="entry-kind immediates"):
            loader.entry_program(copies["mseg_egress"], 0)  # already replaced
    finally:
        dp.close()


def test_kernel_run_time_stats() -> None:
    """With kernel bpf stats on, run count and run time of both programs add
    up (BPF_PROG_TEST_RUN counts like real traffic)."""
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=1 << 16))
    dp.load()
    stats_fd = bpfsys.enable_run_time_stats()
    try:
        dp.apply_policy(compile_policy(shop()))
        before_ns, before_cnt = dp.run_stats()
        dp.test_run(bytes(tcp(WEB4, DB4, 1, 5432)), repeat=1000)
        after_ns, after_cnt = dp.run_stats()
        assert after_cnt - before_cnt == 1000
        assert after_ns > before_ns
    finally:
        os.close(stats_fd)
        dp.close()


def test_port_classes_read_and_written_as_memory() -> None:
    """port_class_map is mappable: the daemon's view of it as memory is the
    map itself (what a batch lookup returns), and its stores are what the
    program reads."""
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=1 << 16))
    dp.load()
    try:
        dp.apply_policy(compile_policy(shop()))
        m = dp.maps["port_class_map"]
        whole = b"".join(v for _k, v, _n in m.lookup_batch_raw(chunk=65536))
        assert whole.strip(b"\0")  # the policy's classes are in there
        mem = m.array_u32()
        assert mem[::2].tobytes() == whole
        mem[2 * 7] = 0xABCD  # a store through memory is the map's value
        assert m.lookup((7).to_bytes(4, "little")) == (0xABCD).to_bytes(4, "little")
        mem[2 * 7] = 0
        del mem
    finally:
        dp.close()


def test_a_foreign_program_under_a_program_pin_is_not_reused(pin_dir: str) -> None:
    """A pin of our name holding another program (same kind, no maps of
    ours): the programs are compiled anew, never run as ours."""
    from bcc import BPF

    cfg = _config(pin_dir)
    dp, first = _loaded(cfg)
    dp.close()
    other = BPF(text=b"int impostor(struct __sk_buff *skb) { return 0; }")
    fd = other.load_func(b"impostor", BPF.SCHED_CLS).fd
    path = loader.program_pin(cfg, first.identity, "mseg_clock")
    os.unlink(path)
    bpfsys.obj_pin(fd, path)
    other.cleanup()
    dp, report = _loaded(cfg)
    try:
        assert not report.reused_programs
        assert bpfsys.prog_info(dp.clock_fd).name == "mseg_clock"
    finally:
        dp.close()


def test_l3_programs_after_a_reuse_are_made_of_the_loaded_source(
        pin_dir: str, tmp_path: Path) -> None:
    """A daemon that reused pinned programs compiles its L3 entry points
    when a link first needs them: from the source its programs were made
    of (the identity they are pinned under), not from what is on disk by
    then (a package upgrade while it runs)."""
    src = tmp_path / "bpf"
    shutil.copytree(loader.bpf_source_dir(), src)
    cfg = dataclasses.replace(DatapathConfig(pin_dir=pin_dir, session_capacity=4096,
                                             ringbuf_bytes=1 << 16),
                              source=src / loader.ENTRY)
    dp = Datapath(cfg)
    dp.load()
    dp.close()
    dp = Datapath(cfg)
    try:
        report = dp.load()
        assert report.reused_programs
        # The source changes on disk while the daemon runs.
        with open(src / loader.ENTRY, "a") as f:
            f.write('\n#error "the source changed after the load"\n')
        ingress, egress = dp.l3_programs()
        assert ingress >= 0 and egress >= 0
        # Pinned under the identity of the source they were made of.
        names = {os.path.basename(p) for p in loader.program_pins(pin_dir)}
        assert f"{loader.PROG_PIN_PREFIX}{report.identity}_{loader.PROG_INGRESS_L3}" in names
    finally:
        dp.close()
        dp.unpin()
