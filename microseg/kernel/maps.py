"""The datapath's maps, in one table: Python's mirror of bpf/lib/maps.h.

Each entry says what the C side declares — kind, key and value struct,
capacity symbol, flags — so the loader can check a pinned map's layout
before BCC reuses it, and tests/unit/test_maps.py fails when this table
and maps.h disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from microseg.kernel import abi, bpfsys

KINDS = {
    "hash": bpfsys.BPF_MAP_TYPE_HASH,
    "array": bpfsys.BPF_MAP_TYPE_ARRAY,
    "percpu_array": bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY,
    "lru_hash": bpfsys.BPF_MAP_TYPE_LRU_HASH,
    "lpm_trie": bpfsys.BPF_MAP_TYPE_LPM_TRIE,
    "ringbuf": bpfsys.BPF_MAP_TYPE_RINGBUF,
    "prog": bpfsys.BPF_MAP_TYPE_PROG_ARRAY,
}
FLAGS = {"0": 0, "BPF_F_NO_PREALLOC": bpfsys.BPF_F_NO_PREALLOC,
         "BPF_F_MMAPABLE": bpfsys.BPF_F_MMAPABLE}

U32 = abi.Layout("u32", (("value", "I"),))
U64 = abi.Layout("u64", (("value", "Q"),))


class MapSpec(NamedTuple):
    """A map as the kernel reports it (bpf_map_info)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class MapDef(NamedTuple):
    """One MSEG_MAP(...) line of maps.h."""

    name: str
    kind: str           # the BCC table type: "hash", "lru_hash", ...
    key: abi.Layout
    value: abi.Layout
    capacity: str       # the C symbol (or literal) giving max_entries
    flags: str = "0"

    def spec(self, capacities: Mapping[str, int]) -> MapSpec:
        return MapSpec(KINDS[self.kind], self.key.size, self.value.size,
                       capacities[self.capacity], FLAGS[self.flags])


MAPS: tuple[MapDef, ...] = (
    MapDef("session_map", "lru_hash", abi.SESSION_KEY, abi.SESSION_VALUE,
           "MSEG_SESSION_CAPACITY"),
    MapDef("pending_map", "lru_hash", abi.SESSION_KEY, abi.SESSION_VALUE,
           "MSEG_PENDING_CAPACITY"),
    MapDef("host4_map", "hash", abi.HOST4_KEY, abi.IDENT_VALUE, "MSEG_IDENT_CAPACITY",
           "BPF_F_NO_PREALLOC"),
    MapDef("host6_map", "hash", abi.HOST6_KEY, abi.IDENT_VALUE, "MSEG_IDENT_CAPACITY",
           "BPF_F_NO_PREALLOC"),
    MapDef("ident4_map", "lpm_trie", abi.IDENT4_KEY, abi.IDENT_VALUE, "MSEG_IDENT_CAPACITY",
           "BPF_F_NO_PREALLOC"),
    MapDef("ident6_map", "lpm_trie", abi.IDENT6_KEY, abi.IDENT_VALUE, "MSEG_IDENT_CAPACITY",
           "BPF_F_NO_PREALLOC"),
    MapDef("policy_map", "hash", abi.POLICY_KEY, abi.POLICY_VALUE, "MSEG_POLICY_CAPACITY",
           "BPF_F_NO_PREALLOC"),
    MapDef("policy_cache_map", "percpu_array", U32, abi.POLICY_CACHE_ENTRY,
           "POLICY_CACHE_SLOTS"),
    MapDef("port_class_map", "array", U32, U32, "PORT_CLASS_SLOTS", "BPF_F_MMAPABLE"),
    MapDef("config_map", "array", U32, abi.POLICY_CONFIG, "POLICY_SLOTS"),
    MapDef("active_map", "array", U32, U32, "ACTIVE_MAX"),
    MapDef("stats_map", "percpu_array", U32, abi.STATS_VALUE, "STATS_SLOTS"),
    MapDef("rule_stats_map", "percpu_array", U32, abi.RULE_STATS, "MAX_RULES"),
    MapDef("staged_stats_map", "percpu_array", U32, U64, "STAGED_STATS_SLOTS"),
    MapDef("staged_rule_stats_map", "percpu_array", U32, abi.RULE_STATS, "MAX_RULES"),
    MapDef("event_stats_map", "percpu_array", U32, abi.EVENT_STATS, "EVENT_STATS_SLOTS"),
    MapDef("session_stats_map", "percpu_array", U32, abi.SESSION_STATS, "1"),
    MapDef("clock_map", "array", U32, abi.CLOCK_SAMPLE, "1"),
    MapDef("meta_map", "array", U32, U32, "1"),
    MapDef("daemon_map", "array", U32, abi.DAEMON_STATE, "1"),
    MapDef("frag_map", "lru_hash", abi.FRAG_KEY, abi.FRAG_VALUE, "MSEG_FRAG_CAPACITY"),
    MapDef("agg_map", "hash", abi.AGG_KEY, abi.AGG_VALUE, "MSEG_AGG_CAPACITY",
           "BPF_F_NO_PREALLOC"),
    MapDef("settings_map", "array", U32, abi.SETTINGS, "1"),
    MapDef("scratch_map", "percpu_array", U32, abi.SCRATCH, "1"),
    MapDef("stage_map", "prog", U32, U32, "STAGE_MAX"),
)
"""Every hash/array map of the program, in maps.h's order."""

RINGS = {abi.Ring.EVENTS: "events", abi.Ring.DENIALS: "denials"}
"""The ring buffers (declared by hand in maps.h: BCC has no pinned ring macro)."""

CONSTANT_CAPACITIES: dict[str, int] = {
    "PORT_CLASS_SLOTS": abi.PORT_CLASS_SLOTS,
    "POLICY_CACHE_SLOTS": abi.POLICY_CACHE_SLOTS,
    "STATS_SLOTS": abi.STATS_SLOTS,
    "STAGED_STATS_SLOTS": abi.STAGED_STATS_SLOTS,
    "POLICY_SLOTS": abi.POLICY_SLOTS,
    "ACTIVE_MAX": len(abi.Active),
    "MAX_RULES": abi.MAX_RULES,
    "EVENT_STATS_SLOTS": abi.EVENT_STATS_SLOTS,
    "STAGE_MAX": len(abi.Stage),
    "1": 1,
}
"""Capacities fixed by the ABI; the loader adds the configurable ones."""


def map_specs(capacities: Mapping[str, int],
              ring_bytes: Mapping[abi.Ring, int]) -> dict[str, MapSpec]:
    """Every map as the kernel should report it, under these -D capacities
    and ring sizes."""
    caps = {**CONSTANT_CAPACITIES, **capacities}
    specs = {m.name: m.spec(caps) for m in MAPS}
    for ring, name in RINGS.items():
        specs[name] = MapSpec(bpfsys.BPF_MAP_TYPE_RINGBUF, 0, 0, ring_bytes[ring], 0)
    return specs
