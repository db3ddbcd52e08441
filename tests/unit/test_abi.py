"""microseg/abi.py must say exactly what bpf/microseg.h says: every enum
value, every constant, every struct's size and field offsets (the C side's
layout measured by compiling the header with the system C compiler)."""

from __future__ import annotations

import enum
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from microseg.kernel import abi
from microseg.kernel.loader import bpf_source_dir

HEADER = bpf_source_dir() / "microseg.h"

# C enum -> (Python enum, name prefix in C). *_MAX members are C-only bounds.
ENUMS = {
    "mseg_direction": (abi.Direction, "DIR_"),
    "mseg_verdict": (abi.Verdict, "VERDICT_"),
    "mseg_reason": (abi.Reason, "REASON_"),
    "mseg_state": (abi.State, "STATE_"),
    "mseg_event_type": (abi.EventType, "EVENT_"),
    "mseg_action": (abi.Action, "ACTION_"),
    "mseg_ident_flags": (abi.IdentFlag, "IDENT_"),
    "mseg_config_flags": (abi.ConfigFlag, "CFG_"),
    "mseg_space": (abi.Space, "SPACE_"),
    "mseg_policy_flags": (abi.PolicyFlag, "POLICY_"),
    "mseg_session_flags": (abi.SessionFlag, "SESSION_"),
    "mseg_event_flags": (abi.EventFlag, "EVENT_F_"),
    "mseg_ring": (abi.Ring, "RING_"),
    "mseg_stage": (abi.Stage, "STAGE_"),
    "mseg_active": (abi.Active, "ACTIVE_"),
    "mseg_judged_flags": (abi.JudgedFlag, "JUDGED_"),
}


def c_enums() -> dict[str, dict[str, int]]:
    text = HEADER.read_text()
    out = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\};", text, re.S):
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        members = {}
        for m in re.finditer(r"(\w+)\s*=\s*(\w+)", body):
            members[m.group(1)] = int(m.group(2), 0)
        out[name] = members
    return out


def c_defines() -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$",
                                 HEADER.read_text(), re.M)}


def test_every_c_enum_is_mirrored() -> None:
    assert set(c_enums()) == set(ENUMS)


@pytest.mark.parametrize("c_name", sorted(ENUMS))
def test_enum_values(c_name: str) -> None:
    py_enum, prefix = ENUMS[c_name]
    c_members = {k.removeprefix(prefix): v for k, v in c_enums()[c_name].items()
                 if not k.endswith("_MAX")}
    py_members = {m.name: m.value for m in py_enum}  # type: ignore[attr-defined]
    assert py_members == c_members


def test_bounds_and_constants() -> None:
    enums, defines = c_enums(), c_defines()
    assert defines["MSEG_ABI_VERSION"] == abi.ABI_VERSION
    assert defines["MAX_RULES"] == abi.MAX_RULES
    assert defines["CLASS_ANY"] == abi.CLASS_ANY
    assert defines["IDENTITY_WORLD"] == abi.IDENTITY_WORLD
    assert defines["POLICY_SLOTS"] == abi.POLICY_SLOTS
    assert defines["STAGED_GENERATION"] == abi.STAGED_GENERATION
    assert abi.PORT_CLASS_SLOTS == abi.POLICY_SLOTS * 2 * 65536  # PORT_CLASS_SLOTS
    assert defines["POLICY_CACHE_BITS"] == abi.POLICY_CACHE_BITS
    assert abi.port_class_index(1, True, 80) == ((1 * 2 + 1) << 16) | 80
    # POLICY_SLOT(): active generations alternate 0/1, staged ones 2/3.
    assert [abi.policy_slot(g) for g in (1, 2, 7)] == [1, 0, 1]
    assert [abi.policy_slot(abi.STAGED_GENERATION | g) for g in (1, 2)] == [3, 2]
    assert abi.STAGED_SLOTS == (2, 3)
    assert enums["mseg_active"]["ACTIVE_MAX"] == len(abi.Active)
    assert {k.removeprefix("TCP_FLAG_"): v for k, v in defines.items()
            if k.startswith("TCP_FLAG_")} == {f.name: f.value for f in abi.TcpFlag}
    assert enums["mseg_event_type"]["EVENT_TYPE_MAX"] == abi.EVENT_TYPE_SLOTS
    assert enums["mseg_ring"]["RING_MAX"] * abi.EVENT_TYPE_SLOTS == abi.EVENT_STATS_SLOTS
    dirs, verdicts, reasons = (enums[n][m] for n, m in (
        ("mseg_direction", "DIR_MAX"), ("mseg_verdict", "VERDICT_MAX"),
        ("mseg_reason", "REASON_MAX")))
    assert dirs * verdicts * reasons == abi.STATS_SLOTS
    assert verdicts * 2 == abi.STAGED_STATS_SLOTS
    assert abi.stats_index(1, 2, 3) == (1 * verdicts + 2) * reasons + 3


def _c_layouts(tmp_path: Path) -> dict[str, tuple[int, dict[str, int]]]:
    """Compile a probe printing sizeof/offsetof for every mirrored struct."""
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>',
             f'#include "{HEADER}"', "int main(void) {"]
    for layout in abi.LAYOUTS:
        s = f"struct {layout.c_name}"
        lines.append(f'printf("S {layout.c_name} %zu\\n", sizeof({s}));')
        for fname, _fmt in layout.fields:
            if not fname.startswith("_"):
                lines.append(f'printf("F {layout.c_name} {fname} %zu\\n", '
                             f"offsetof({s}, {fname}));")
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        parts = line.split()
        if parts[0] == "S":
            out[parts[1]] = (int(parts[2]), {})
        else:
            out[parts[1]][1][parts[2]] = int(parts[3])
    return out


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_struct_layouts_match_c(tmp_path: Path) -> None:
    c = _c_layouts(tmp_path)
    for layout in abi.LAYOUTS:
        size, offsets = c[layout.c_name]
        assert layout.size == size, layout.c_name
        py = {k: v for k, v in layout.offsets().items() if not k.startswith("_")}
        assert py == offsets, layout.c_name


def test_every_c_struct_with_a_map_or_event_is_mirrored() -> None:
    c_structs = set(re.findall(r"^struct\s+(\w+)\s*\{", HEADER.read_text(), re.M))
    assert c_structs == {layout.c_name for layout in abi.LAYOUTS}


def test_public_state_maps_syn_recv_to_new() -> None:
    assert abi.State.SYN_RECV.public is abi.State.NEW
    assert abi.State.ESTABLISHED.public is abi.State.ESTABLISHED
    assert isinstance(abi.State.NEW, enum.IntEnum)
    assert abi.tcp_flag_names(0x12) == ["SYN", "ACK"]
