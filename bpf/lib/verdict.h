/* SPDX-License-Identifier: GPL-2.0 */
/*
 * verdict.h — the one place a packet's outcome is accounted.
 *
 * apply_verdict() is the only path to TC_ACT_SHOT and the only place a
 * verdict or drop event is made: it bumps the per-CPU counter and reports
 * the event together, so counters and events can never disagree. Stages
 * return NEED_VERDICT and handle_packet() calls it; only open_session()
 * calls it in place, to report a new session's verdict before its "new"
 * session event.
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

static __always_inline int apply_verdict(struct __sk_buff *skb,
					 const struct packet *p, __u32 dir,
					 const struct decision *d, __u64 now)
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
	struct event *e = reserve_event(EVENT_VERDICT, RING_EVENTS);
	if (e) {
		fill_packet_fields(e, skb, p, dir, now);
		fill_endpoints(e, p->saddr, p->daddr, p->sport, p->dport);
		fill_decision(e, d, verdict);
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
