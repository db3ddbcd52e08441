"""The structs BCC compiled into the running program have the layouts
microseg/kernel/abi.py describes: every map's key and value, size and field
offsets, read from the ctypes types BCC derives from the program's BTF-less
C declarations. (tests/unit/test_abi.py checks the header with the system C
compiler; this checks what the BPF compiler made of it.)"""

from __future__ import annotations

import ctypes

import pytest

from microseg.kernel import maps
from microseg.kernel.datapath import Datapath


def _bcc_layout(ctype) -> tuple[int, dict[str, int]]:
    if issubclass(ctype, ctypes.Array):  # a per-CPU map's value: one per CPU
        ctype = ctype._type_
    offsets = {name: getattr(ctype, name).offset for name, *_ in getattr(ctype, "_fields_", ())
               if not name.startswith("__pad")}
    return ctypes.sizeof(ctype), offsets


@pytest.mark.parametrize("m", maps.MAPS, ids=lambda m: m.name)
def test_map_structs_match_abi(loaded_datapath: Datapath, m: maps.MapDef) -> None:
    table = loaded_datapath.bpf.get_table(m.name.encode())
    for layout, ctype in ((m.key, table.Key), (m.value, table.Leaf)):
        size, offsets = _bcc_layout(ctype)
        assert size == layout.size, (m.name, layout.c_name)
        if layout in (maps.U32, maps.U64):  # a scalar: no fields to compare
            continue
        want = {k: v for k, v in layout.offsets().items() if not k.startswith("_")}
        assert {k: v for k, v in offsets.items() if k in want} == want, (m.name, layout.c_name)
        assert set(want) <= set(offsets), (m.name, set(want) - set(offsets))
