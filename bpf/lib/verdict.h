/* SPDX-License-Identifier: GPL-2.0 */
/*
 * verdict.h — the one place a packet's outcome is accounted.
 *
 * apply_verdict() is the only path to TC_ACT_SHOT and the only place a
 * verdict or drop event is made: it bumps the per-CPU counter and reports
 * the event together, so counters and events can never disagree. Stages
 * return NEED_VERDICT and finish_packet() calls it. A session that the
 * packet opened (open_session) rides on the verdict's record: one ring
 * record the daemon expands into the verdict and the session's "new" event
 * (docs/how-it-works.md), instead of a second reservation.
 * pass_packet() accounts packets that need no event (established
 * sessions, non-IP, neighbour discovery, related ICMP).
 */
#ifndef MSEG_VERDICT_H
#define MSEG_VERDICT_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "../microseg.h"
#include "parse.h"
#include "stats.h"
#include "events.h"
#include "decision.h"
#include "aggregate.h"

/* Returned by the stages below when the packet's outcome is a decision in
 * *d that handle_packet() must account and report: the single call site
 * of apply_verdict() for every drop and every judged packet. */
#define NEED_VERDICT (-1)

static __always_inline int pass_packet(__u32 dir, __u32 verdict, __u32 reason,
				       const struct packet *p)
{
	count_packet(dir, verdict, reason, p->segs, p->len);
	return TC_ACT_OK;
}

/* An allowed or audit verdict's record, every field written (no memset:
 * see reserve_record). opened: the session the packet opened, side + 1
 * (0: none), in state `state`. The record's session fields are those of
 * the new session: open_session() copied them from this very decision
 * (its identities, for a session opened by a reply, turned toward the
 * packet since: the daemon turns them back for the session's event). */
static __always_inline void fill_verdict_record(struct event *e, struct __sk_buff *skb,
						const struct packet *p, __u32 dir,
						const struct decision *d, __u8 verdict,
						__u64 now, __u32 opened, __u8 state)
{
	__u8 flags = d->audit == AUDIT_YES ? EVENT_F_AUDIT : 0;

	if (opened)
		flags |= opened == 2 ? EVENT_F_OPENED | EVENT_F_OPENED_REPLY : EVENT_F_OPENED;
	e->ts_ns = now;
	e->created_ns = 0;
	e->packets[0] = p->segs; /* the count */
	e->packets[1] = 0;
	e->bytes[0] = p->len;
	e->bytes[1] = 0;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->ifindex = skb->ifindex;
	e->rule_id = d->rule_id;
	e->generation = d->generation;
	e->pkt_len = p->len;
	e->src_identity = d->src_identity;
	e->dst_identity = d->dst_identity;
	e->sport = p->sport;
	e->dport = p->dport;
	e->type = EVENT_VERDICT;
	e->verdict = verdict;
	e->reason = d->reason;
	e->direction = dir;
	e->family = p->family;
	e->proto = p->proto;
	e->tcp_flags = p->tcp_flags;
	e->state = opened ? state : STATE_NONE;
	e->prev_state = STATE_NONE;
	e->flags = flags;
	e->staged_verdict = d->staged_verdict;
	e->pad = 0;
	e->staged_rule = d->staged_rule;
	e->staged_generation = d->staged_generation;
}

/* opened, state: the session the packet opened, as fill_verdict_record()
 * takes them. An opened session's verdict is never a denial (only allowed
 * and audit verdicts open one), so its "new" event always has a record. */
static __always_inline int apply_verdict(struct __sk_buff *skb,
					 const struct packet *p, __u32 dir,
					 const struct decision *d, __u64 now,
					 __u32 opened, __u8 state)
{
	int denial = d->verdict == VERDICT_DENIED || d->verdict == VERDICT_DROPPED;
	/* A would-be drop that audit mode lets pass is counted, and reported,
	 * as what happened to it: verdict audit (its event says audit: true). */
	__u8 verdict = d->audit == AUDIT_YES ? VERDICT_AUDIT : d->verdict;

	count_packet(dir, verdict, d->reason, p->segs, p->len);
	if (d->rule_id && d->verdict != VERDICT_DROPPED)
		count_rule_hit(d->rule_id, now);
	if (d->staged_verdict)
		count_staged(d, verdict, p->segs, now);

	if (denial) {
		/* Denied verdicts and drops: aggregated per flow, in their own
		 * ring (aggregate.h). */
		report_denial(skb, p, dir, d, verdict, now);
		return d->audit == AUDIT_YES ? TC_ACT_OK : TC_ACT_SHOT;
	}
	struct event *e = reserve_record(RING_EVENTS);
	/* Counted as the events it stands for, as two records would be. */
	count_record(RING_EVENTS, EVENT_VERDICT, e != NULL);
	if (opened)
		count_record(RING_EVENTS, EVENT_SESSION, e != NULL);
	if (e) {
		fill_verdict_record(e, skb, p, dir, d, verdict, now, opened, state);
		submit_event(e, RING_EVENTS);
	}
	return TC_ACT_OK;
}

/* A drop that is not a policy decision: invalid, fragment or state. */
static __always_inline int drop_packet(struct decision *d, __u8 reason)
{
	d->verdict = VERDICT_DROPPED;
	d->reason = reason;
	d->rule_id = 0;
	d->audit = AUDIT_NO;
	d->staged_verdict = 0; /* not a policy decision: nothing to compare */
	return NEED_VERDICT;
}

#endif /* MSEG_VERDICT_H */
