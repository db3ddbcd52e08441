/* SPDX-License-Identifier: GPL-2.0 */
/*
 * decision.h — the outcome of a policy lookup or of a drop, as the stages
 * pass it along.
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

#endif /* MSEG_DECISION_H */
