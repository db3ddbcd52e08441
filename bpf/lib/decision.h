/* SPDX-License-Identifier: GPL-2.0 */
/*
 * decision.h — the outcome of a policy lookup or of a drop, as the stages
 * pass it along, and how it fills an event.
 */
#ifndef MSEG_DECISION_H
#define MSEG_DECISION_H

#include "../microseg.h"


/* decision.audit. A stage that drops a packet audit mode may let pass says
 * whose mode decides; handle_packet() looks it up once (resolve_audit). */
enum audit_check {
	AUDIT_NO = 0,
	AUDIT_YES = 1,
	AUDIT_BY_DST = 2,   /* the mode of the packet's destination */
	AUDIT_BY_SRC = 3,   /* the mode of its source (the session's destination) */
};

static __always_inline void fill_decision(struct event *e,
					  const struct decision *d, __u8 verdict)
{
	e->rule_id = d->rule_id;
	e->generation = d->generation;
	e->src_identity = d->src_identity;
	e->dst_identity = d->dst_identity;
	e->verdict = verdict;
	e->reason = d->reason;
	e->flags = d->audit == AUDIT_YES ? EVENT_F_AUDIT : 0;
	e->staged_verdict = d->staged_verdict;
	e->staged_rule = d->staged_rule;
	e->staged_generation = d->staged_generation;
}

#endif /* MSEG_DECISION_H */
