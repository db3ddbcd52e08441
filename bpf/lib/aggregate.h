/* SPDX-License-Identifier: GPL-2.0 */
/*
 * aggregate.h — repeated denials and drops of one flow become one event.
 *
 * A flow is (source, destination, protocol, destination port, hook,
 * generation, verdict, reason). Its first packet is reported at once; the
 * packets that follow within the window (settings.event_window_ns) are
 * counted in agg_map, and reported as one event whose count (packets[0])
 * says how many packets it stands for — by the first packet after the
 * window, or by mseg_flush, which the daemon runs for flows that went
 * quiet. Counts move only by atomic add and atomic exchange, so every
 * packet is reported exactly once: the sum of the counts equals the
 * counters, whatever the CPUs interleave. With agg_map full, packets are
 * reported one by one (counted in session_stats.agg_full).
 *
 * Deleting an idle entry takes two flushes: the first marks it dead, the
 * second (a window later) deletes it if nothing touched it since. A packet
 * that finds a dead entry revives it and reports itself at once; one that
 * looked the entry up before it was marked has long finished (programs run
 * for microseconds) before the second flush. No packet can count into an
 * entry that is then deleted.
 */
#ifndef MSEG_AGGREGATE_H
#define MSEG_AGGREGATE_H

#include <uapi/linux/bpf.h>
#include "../microseg.h"
#include "maps.h"
#include "parse.h"
#include "events.h"
#include "stats.h"
#include "decision.h"

#define FLUSH_NONE 0
#define FLUSH_REPORTED 1
#define FLUSH_DELETED 2
#define FLUSH_MARKED 3

static __always_inline __u64 event_window(void)
{
	__u32 zero = 0;
	/* bpf_map_lookup_elem: the daemon's settings. */
	struct settings *st = settings_map.lookup(&zero);

	return st ? st->event_window_ns : 0;
}

/* One denial/drop event into RING_DENIALS for `count` packets. */
static __always_inline void emit_denial(const struct agg_key *k,
					const struct agg_value *v, __u64 count,
					__u64 bytes, __u32 pkt_len, __u64 now)
{
	struct event *e = reserve_record(RING_DENIALS);

	count_record(RING_DENIALS, k->type, e != NULL);
	if (!e)
		return;
	/* Every field written (see reserve_record). */
	e->ts_ns = now;
	e->created_ns = 0;
	e->packets[0] = count;
	e->packets[1] = 0;
	e->bytes[0] = bytes;
	e->bytes[1] = 0;
	__builtin_memcpy(e->saddr, k->saddr, 16);
	__builtin_memcpy(e->daddr, k->daddr, 16);
	e->ifindex = k->hook >> 1;
	e->direction = k->hook & 1;
	e->rule_id = v->rule_id;
	e->generation = k->generation;
	e->pkt_len = pkt_len;
	e->src_identity = v->src_identity;
	e->dst_identity = v->dst_identity;
	e->sport = v->sport;
	e->dport = k->dport;
	e->type = k->type;
	e->family = k->family;
	e->proto = k->proto;
	e->tcp_flags = v->tcp_flags;
	e->verdict = k->verdict;
	e->reason = k->reason;
	e->state = STATE_NONE;
	e->prev_state = STATE_NONE;
	e->flags = k->audit ? EVENT_F_AUDIT : 0;
	e->staged_verdict = v->staged_verdict;
	e->pad = 0;
	e->staged_rule = v->staged_rule;
	e->staged_generation = v->staged_generation;
	submit_event(e, RING_DENIALS);
}

/* verdict: what the packet is counted as (VERDICT_AUDIT for an audited
 * would-be drop). */
static __always_inline void report_denial(struct __sk_buff *skb,
					  const struct packet *p, __u32 dir,
					  const struct decision *d, __u8 verdict,
					  __u64 now)
{
	struct scratch *sc = scratch();

	if (!sc)
		return;
	/* Key and first value built in the per-CPU scratch (stack room). */
	struct agg_key *k = &sc->agg_key;
	struct agg_value *nv = &sc->agg;
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->hook = hook_id(skb, dir);
	k->generation = d->generation;
	k->dport = p->dport;
	k->proto = p->proto;
	k->family = p->family;
	k->verdict = verdict;
	k->reason = d->reason;
	k->audit = d->audit == AUDIT_YES;
	k->type = d->verdict == VERDICT_DROPPED ? EVENT_DROP : EVENT_VERDICT;
	__builtin_memset(nv, 0, sizeof(*nv));
	nv->window_start = now;
	nv->last_ns = now;
	nv->rule_id = d->rule_id;
	nv->src_identity = d->src_identity;
	nv->dst_identity = d->dst_identity;
	nv->sport = p->sport;
	nv->tcp_flags = p->tcp_flags;
	nv->staged_verdict = d->staged_verdict;
	nv->staged_rule = d->staged_rule;
	nv->staged_generation = d->staged_generation;

	__u64 window = event_window();
	if (!window) {
		emit_denial(k, nv, p->segs, p->len, p->len, now);
		return;
	}
	/* bpf_map_lookup_elem: the flow's window, if it has one. */
	struct agg_value *v = agg_map.lookup(k);
	if (!v) {
		/* bpf_map_update_elem(BPF_NOEXIST): open the window; full (or
		 * another CPU opened it first): report this packet alone. */
		if (agg_map.insert(k, nv)) {
			struct session_stats *ss = session_counters();
			if (ss)
				ss->agg_full++;
		}
		emit_denial(k, nv, p->segs, p->len, p->len, now);
		return;
	}
	v->last_ns = now;
	v->sport = p->sport;
	v->tcp_flags = p->tcp_flags;
	v->staged_verdict = d->staged_verdict;
	v->staged_rule = d->staged_rule;
	v->staged_generation = d->staged_generation;
	if (v->dead) { /* marked idle by mseg_flush: revive, report at once */
		v->dead = 0;
		v->window_start = now;
		emit_denial(k, v, p->segs, p->len, p->len, now);
		return;
	}
	if (now - v->window_start < window) {
		__sync_fetch_and_add(&v->pending, p->segs);
		__sync_fetch_and_add(&v->pending_bytes, p->len);
		return;
	}
	/* The window is over: this packet reports itself and what it held. */
	__u64 n = __sync_lock_test_and_set(&v->pending, 0);
	__u64 nb = __sync_lock_test_and_set(&v->pending_bytes, 0);
	v->window_start = now;
	emit_denial(k, v, n + p->segs, nb + p->len, p->len, now);
}

/* mseg_flush's work for one flow: report what a quiet flow still holds,
 * or retire an idle entry (mark, then delete). */
static __always_inline int flush_flow(struct agg_key *k, __u64 now)
{
	__u64 window = event_window();
	struct agg_value *v = agg_map.lookup(k);

	if (!v || !window)
		return FLUSH_NONE;
	if (v->pending) {
		if (now - v->window_start < window)
			return FLUSH_NONE;
		__u64 n = __sync_lock_test_and_set(&v->pending, 0);
		__u64 nb = __sync_lock_test_and_set(&v->pending_bytes, 0);
		v->window_start = now;
		v->dead = 0;
		if (n)
			emit_denial(k, v, n, nb, 0, now);
		return FLUSH_REPORTED;
	}
	if (now - v->last_ns < 2 * window)
		return FLUSH_NONE;
	if (v->dead) {
		/* bpf_map_delete_elem: dead for a window, untouched since. */
		agg_map.delete(k);
		return FLUSH_DELETED;
	}
	v->dead = 1;
	return FLUSH_MARKED;
}

#endif /* MSEG_AGGREGATE_H */
