/* SPDX-License-Identifier: GPL-2.0 */
/*
 * stats.h — per-CPU counters. Per-CPU maps need no atomics: each CPU owns
 * its slot and userspace sums them at read time.
 */
#ifndef MSEG_STATS_H
#define MSEG_STATS_H

#include "../microseg.h"
#include "maps.h"

/* segs: the packets an skb stands for (a GSO super-packet is many). */
static __always_inline void count_packet(__u32 dir, __u32 verdict, __u32 reason,
					 __u32 segs, __u32 len)
{
	__u32 idx = STATS_INDEX(dir, verdict, reason);
	/* bpf_map_lookup_elem: this CPU's counter of the outcome. */
	struct stats_value *v = stats_map.lookup(&idx);

	if (v) {
		v->packets += segs;
		v->bytes += len;
	}
}

/* session_stats_map[0], per CPU: see struct session_stats. */
static __always_inline struct session_stats *session_counters(void)
{
	__u32 zero = 0;

	return session_stats_map.lookup(&zero);
}

static __always_inline void count_rule_hit(__u32 rule_id, __u64 now)
{
	struct rule_stats *r = rule_stats_map.lookup(&rule_id);

	if (r) {
		r->hits++;
		r->last_hit_ns = now;
	}
}

#endif /* MSEG_STATS_H */
