"""microseg/kernel/maps.py must list exactly the maps bpf/lib/maps.h declares,
each with the same kind, key and value struct, capacity symbol and flags."""

from __future__ import annotations

import re

from microseg.kernel import maps
from microseg.kernel.loader import DatapathConfig, bpf_source_dir

MAPS_H = bpf_source_dir() / "lib" / "maps.h"
# MSEG_MAP("lru_hash", struct session_key, struct session_value, session_map,
#          MSEG_SESSION_CAPACITY, 0);
_DECL = re.compile(r'MSEG_MAP\(\s*"(\w+)",\s*([\w ]+?),\s*([\w ]+?),\s*(\w+),\s*(\w+),\s*(\w+)\);')


def c_maps() -> list[tuple[str, str, str, str, str, str]]:
    text = re.sub(r"\s+", " ", re.sub(r"/\*.*?\*/", "", MAPS_H.read_text(), flags=re.S))
    return [m.groups() for m in _DECL.finditer(text)]


def _c_type(layout) -> str:
    return layout.c_name if layout in (maps.U32, maps.U64) else f"struct {layout.c_name}"


def test_the_table_is_maps_h() -> None:
    want = [(kind, key, value, name, cap, flags) for kind, key, value, name, cap, flags
            in c_maps()]
    got = [(m.kind, _c_type(m.key), _c_type(m.value), m.name, m.capacity, m.flags)
           for m in maps.MAPS]
    assert want, "no MSEG_MAP declaration parsed from maps.h"
    assert got == want


def test_the_ring_buffers_are_declared_and_listed() -> None:
    text = MAPS_H.read_text()
    specs = DatapathConfig(pin_dir=None).map_specs()
    for name in maps.RINGS.values():
        assert f"struct events_table_t {name} = " in text
        assert name in specs


def test_every_capacity_symbol_resolves() -> None:
    specs = DatapathConfig(pin_dir=None, session_capacity=4096).map_specs()
    assert specs["session_map"].max_entries == 4096
    assert {m.name for m in maps.MAPS} | set(maps.RINGS.values()) == set(specs)
    cflags = " ".join(DatapathConfig().cflags())
    for m in maps.MAPS:
        if m.capacity.startswith("MSEG_"):
            assert f"-D{m.capacity}=" in cflags, m.capacity
