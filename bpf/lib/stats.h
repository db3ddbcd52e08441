/* SPDX-License-Identifier: GPL-2.0 */
/*
 * stats.h — per-CPU counters. Per-CPU maps need no atomics: each CPU owns
 * its slot and userspace sums them at read time.
 */
#ifndef MSEG_STATS_H
#define MSEG_STATS_H

#include "../microseg.h"
#include "maps.h"
#include "decision.h"

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

/* A packet judged by a staged candidate too: staged_stats_map by the
 * candidate's verdict and whether it differs from the one counted (verdict),
 * for as many packets as its event stands for; the candidate rule's hit. */
static __always_inline void count_staged(const struct decision *d, __u8 verdict,
					 __u32 segs, __u64 now)
{
	__u32 staged = d->staged_verdict - 1;
	__u32 idx = staged * 2 + (staged != verdict);
	/* bpf_map_lookup_elem: this CPU's count of such staged verdicts. */
	__u64 *n = staged_stats_map.lookup(&idx);

	if (n)
		*n += segs;
	if (d->staged_rule) {
		__u32 rule = d->staged_rule;
		/* bpf_map_lookup_elem: the candidate rule's hits. */
		struct rule_stats *r = staged_rule_stats_map.lookup(&rule);
		if (r) {
			r->hits++;
			r->last_hit_ns = now;
		}
	}
}

#endif /* MSEG_STATS_H */
