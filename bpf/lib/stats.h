/* SPDX-License-Identifier: GPL-2.0 */
/*
 * stats.h — per-CPU counters. Per-CPU maps need no atomics: each CPU owns
 * its slot and userspace sums them at read time.
 */
#ifndef MSEG_STATS_H
#define MSEG_STATS_H

#include "../microseg.h"
#include "maps.h"

static __always_inline void count_packet(__u32 dir, __u32 verdict, __u32 reason,
					 __u32 len)
{
	__u32 idx = STATS_INDEX(dir, verdict, reason);
	struct stats_value *v = stats_map.lookup(&idx);

	if (v) {
		v->packets++;
		v->bytes += len;
	}
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
