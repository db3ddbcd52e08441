/* SPDX-License-Identifier: GPL-2.0 */
/*
 * verdict.h — the one place a packet's outcome is accounted.
 *
 * apply_verdict() is the only path to TC_ACT_SHOT and the only place a
 * verdict or drop event is made: it bumps the per-CPU counter and writes
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

/* Returned by the stages below when the packet's outcome is a decision in
 * *d that handle_packet() must account and report: the single call site
 * of apply_verdict() for every drop and every judged packet. */
#define NEED_VERDICT (-1)

/* The outcome of a policy decision (or of a drop). */
struct decision {
	__u32 rule_id;
	__u32 generation;
	__u32 src_identity;
	__u32 dst_identity;
	__u8 verdict;  /* enum mseg_verdict */
	__u8 reason;   /* enum mseg_reason */
	__u8 pad[2];
};

static __always_inline int pass_packet(__u32 dir, __u32 verdict, __u32 reason,
				       __u32 len)
{
	count_packet(dir, verdict, reason, len);
	return TC_ACT_OK;
}

static __always_inline int apply_verdict(struct __sk_buff *skb,
					 const struct packet *p, __u32 dir,
					 const struct decision *d, __u64 now)
{
	int drop = d->verdict == VERDICT_DENIED || d->verdict == VERDICT_DROPPED;

	count_packet(dir, d->verdict, d->reason, p->len);
	if (d->rule_id && d->verdict != VERDICT_DROPPED)
		count_rule_hit(d->rule_id, now);

	struct event *e = reserve_event(d->verdict == VERDICT_DROPPED ?
						EVENT_DROP : EVENT_VERDICT);
	if (e) {
		fill_packet_fields(e, skb, p, dir, now);
		fill_endpoints(e, p->saddr, p->daddr, p->sport, p->dport);
		e->rule_id = d->rule_id;
		e->generation = d->generation;
		e->src_identity = d->src_identity;
		e->dst_identity = d->dst_identity;
		e->verdict = d->verdict;
		e->reason = d->reason;
		submit_event(e);
	}
	return drop ? TC_ACT_SHOT : TC_ACT_OK;
}

/* A drop that is not a policy decision: invalid, fragment or state. */
static __always_inline int drop_packet(struct decision *d, __u8 reason)
{
	d->verdict = VERDICT_DROPPED;
	d->reason = reason;
	d->rule_id = 0;
	return NEED_VERDICT;
}

#endif /* MSEG_VERDICT_H */
