/* SPDX-License-Identifier: GPL-2.0 */
/*
 * maps.h — every map of the datapath, in one place.
 *
 * The loader passes -DMSEG_PIN_DIR="\"/sys/fs/bpf/microseg\"" to pin them
 * (BCC reuses an existing pin of the same path, so the session table and the
 * last policy survive a daemon restart; the loader checks a pin's layout
 * before letting BCC reuse it). Without MSEG_PIN_DIR the maps are private to
 * this load, which is what BPF_PROG_TEST_RUN tests want.
 */
#ifndef MSEG_MAPS_H
#define MSEG_MAPS_H

#include "../microseg.h"

#ifndef MSEG_SESSION_CAPACITY
#define MSEG_SESSION_CAPACITY 1048576
#endif
#ifndef MSEG_RINGBUF_PAGES
#define MSEG_RINGBUF_PAGES 4096 /* 16 MiB with 4 KiB pages */
#endif
/* The loader passes every capacity (microseg/datapath.py MapSpecs is the
 * one source); these defaults only serve a bare compile. */
#ifndef MSEG_IDENT_CAPACITY
#define MSEG_IDENT_CAPACITY 262144
#endif
#ifndef MSEG_POLICY_CAPACITY
#define MSEG_POLICY_CAPACITY 2097152
#endif
#ifndef MSEG_FRAG_CAPACITY
#define MSEG_FRAG_CAPACITY 65536
#endif
#ifndef MSEG_PENDING_CAPACITY
#define MSEG_PENDING_CAPACITY 262144
#endif
#ifndef MSEG_AGG_CAPACITY
#define MSEG_AGG_CAPACITY 65536
#endif
#ifndef MSEG_DENIALS_PAGES
#define MSEG_DENIALS_PAGES 1024 /* 4 MiB with 4 KiB pages */
#endif

#ifdef MSEG_PIN_DIR
#define MSEG_MAP(type, key, leaf, name, max, flags) \
	BPF_TABLE_PINNED(type, key, leaf, name, max, MSEG_PIN_DIR "/" #name, flags)
#define MSEG_RINGBUF_SECTION "maps/ringbuf:" MSEG_PIN_DIR "/events"
#define MSEG_DENIALS_SECTION "maps/ringbuf:" MSEG_PIN_DIR "/denials"
#else
#define MSEG_MAP(type, key, leaf, name, max, flags) \
	BPF_F_TABLE(type, key, leaf, name, max, flags)
#define MSEG_RINGBUF_SECTION "maps/ringbuf"
#define MSEG_DENIALS_SECTION "maps/ringbuf"
#endif

/* Connections that have seen both directions, one entry for both; LRU so
 * a full table evicts the least recently used session instead of refusing
 * new flows. */
MSEG_MAP("lru_hash", struct session_key, struct session_value, session_map,
	 MSEG_SESSION_CAPACITY, 0);
/* Connections that have seen one direction only (a SYN, a request, a
 * reply whose session was lost): a flood of them evicts only its own kind,
 * never a session in session_map. */
MSEG_MAP("lru_hash", struct session_key, struct session_value, pending_map,
	 MSEG_PENDING_CAPACITY, 0);

/* Address -> identity, per generation slot: host addresses by exact
 * hash, other prefixes by longest prefix match. */
MSEG_MAP("hash", struct host4_key, struct ident_value, host4_map,
	 MSEG_IDENT_CAPACITY, BPF_F_NO_PREALLOC);
MSEG_MAP("hash", struct host6_key, struct ident_value, host6_map,
	 MSEG_IDENT_CAPACITY, BPF_F_NO_PREALLOC);
MSEG_MAP("lpm_trie", struct ident4_key, struct ident_value, ident4_map,
	 MSEG_IDENT_CAPACITY, BPF_F_NO_PREALLOC);
MSEG_MAP("lpm_trie", struct ident6_key, struct ident_value, ident6_map,
	 MSEG_IDENT_CAPACITY, BPF_F_NO_PREALLOC);

/* (slot, src class, dst class, proto, port class) -> group decision. */
MSEG_MAP("hash", struct policy_key, struct policy_value, policy_map,
	 MSEG_POLICY_CAPACITY, BPF_F_NO_PREALLOC);
/* Recent decisions of match_policy(), per CPU (see struct
 * policy_cache_entry): a new flow between a pair already judged skips the
 * identity and policy lookups. */
MSEG_MAP("percpu_array", u32, struct policy_cache_entry, policy_cache_map,
	 POLICY_CACHE_SLOTS, 0);
/* (slot, tcp/udp, port) -> port class. Mappable: the daemon reads and
 * writes a slot's 131,072 classes as memory (microseg/kernel/datapath.py). */
MSEG_MAP("array", u32, u32, port_class_map, PORT_CLASS_SLOTS, BPF_F_MMAPABLE);

/* config_map[slot]: default action and flags of the generation in slot. */
MSEG_MAP("array", u32, struct policy_config, config_map, POLICY_SLOTS, 0);
/* active_map[ACTIVE_POLICY]: the active generation, the single word a
 * switch writes; active_map[ACTIVE_STAGED]: the staged one, or 0. */
MSEG_MAP("array", u32, u32, active_map, ACTIVE_MAX, 0);

/* Packets and bytes by direction x verdict x reason. */
MSEG_MAP("percpu_array", u32, struct stats_value, stats_map, STATS_SLOTS, 0);
/* Verdicts decided per rule id. */
MSEG_MAP("percpu_array", u32, struct rule_stats, rule_stats_map, MAX_RULES, 0);
/* Judgments of the staged policy: [verdict * 2 + differs from the active]. */
MSEG_MAP("percpu_array", u32, u64, staged_stats_map, STAGED_STATS_SLOTS, 0);
/* Verdicts the staged policy's rules would have decided, per rule id. */
MSEG_MAP("percpu_array", u32, struct rule_stats, staged_rule_stats_map, MAX_RULES, 0);
/* Ring-buffer records submitted and lost, per ring and event type. */
MSEG_MAP("percpu_array", u32, struct event_stats, event_stats_map,
	 EVENT_STATS_SLOTS, 0);

/* session_stats_map[0]: see struct session_stats. */
MSEG_MAP("percpu_array", u32, struct session_stats, session_stats_map, 1, 0);

/* clock_map[0]: see struct clock_sample. */
MSEG_MAP("array", u32, struct clock_sample, clock_map, 1, 0);

/* meta_map[0]: MSEG_ABI_VERSION of whoever created these pins. */
MSEG_MAP("array", u32, u32, meta_map, 1, 0);

/* daemon_map[0]: see struct daemon_state (the daemon's, not the datapath's). */
MSEG_MAP("array", u32, struct daemon_state, daemon_map, 1, 0);

/* First-fragment verdicts, keyed by the datagram's id. */
MSEG_MAP("lru_hash", struct frag_key, struct frag_value, frag_map,
	 MSEG_FRAG_CAPACITY, 0);

/* Denied and dropped flows being aggregated (bpf/lib/aggregate.h). Not an
 * LRU: an entry holding uncounted packets must never vanish silently. */
MSEG_MAP("hash", struct agg_key, struct agg_value, agg_map,
	 MSEG_AGG_CAPACITY, BPF_F_NO_PREALLOC);

/* settings_map[0]: see struct settings. */
MSEG_MAP("array", u32, struct settings, settings_map, 1, 0);

/* scratch_map[0], per CPU: see struct scratch. */
MSEG_MAP("percpu_array", u32, struct scratch, scratch_map, 1, 0);

/* The stages entry points tail-call (enum mseg_stage), set by the loader. */
MSEG_MAP("prog", u32, u32, stage_map, STAGE_MAX, 0);

static __always_inline struct scratch *scratch(void)
{
	__u32 zero = 0;

	return scratch_map.lookup(&zero);
}

/* Events to the daemon: BCC's BPF_RINGBUF_OUTPUT with a section name that
 * can carry a pin path (BCC has no pinned ring-buffer macro). */
struct events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section(MSEG_RINGBUF_SECTION)))
struct events_table_t events = { .max_entries = MSEG_RINGBUF_PAGES * PAGE_SIZE };
/* Denied verdicts and drops: a ring of their own (enum mseg_ring). */
__attribute__((section(MSEG_DENIALS_SECTION)))
struct events_table_t denials = { .max_entries = MSEG_DENIALS_PAGES * PAGE_SIZE };

#endif /* MSEG_MAPS_H */
