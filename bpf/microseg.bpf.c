/* SPDX-License-Identifier: GPL-2.0 */
/*
 * microseg.bpf.c — the TC datapath, attached at clsact ingress and egress.
 *
 *   parse -> (later fragment: follow the first) -> session lookup ->
 *   (new flow, or policy changed) policy lookup -> verdict -> session
 *   update -> stats -> event -> TC_ACT_OK / TC_ACT_SHOT
 *
 * Compiled by BCC at load time (microseg/kernel/loader.py); the include path
 * is this directory. The walk-through is docs/how-it-works.md.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "microseg.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/clock.h"
#include "lib/stats.h"
#include "lib/events.h"
#include "lib/decision.h"
#include "lib/aggregate.h"
#include "lib/verdict.h"
#include "lib/policy.h"
#include "lib/session.h"
#include "lib/frag.h"

/* Not a connection start: a reply whose session may have been lost. */
static __always_inline int maybe_reply(const struct packet *p)
{
	if (p->proto == IPPROTO_TCP)
		return !(p->tcp_flags & TCP_FLAG_SYN) ||
		       (p->tcp_flags & TCP_FLAG_ACK); /* SYN-ACK */
	if (p->proto == IPPROTO_UDP)
		return 1; /* either: the policy decides which way is allowed */
	return p->icmp == ICMP_KIND_ECHO_REPLY;
}

/* The packet may be a reply whose session was lost: the reply stage
 * judges it the other way round (a tail call: its own program, so the
 * verifier checks the second policy lookup apart from the first). *d is
 * the packet's own outcome, which stands if the stage is not installed. */
static __always_inline int judge_as_reply(struct __sk_buff *skb,
					  const struct packet *p, __u32 dir,
					  __u32 gen, struct decision *d)
{
	struct scratch *sc = scratch();

	if (!sc)
		return NEED_VERDICT;
	sc->own = *d;
	sc->direction = dir;
	sc->generation = gen;
	/* bpf_tail_call: continue in mseg_reply; returns only if not installed. */
	stage_map.call(skb, STAGE_REPLY);
	return NEED_VERDICT;
}

/* After a new flow's judgment (or a packet judged alone): a denial may be
 * a reply whose session was lost; an allowed flow opens its session. */
static __always_inline int after_judgment(struct __sk_buff *skb, const struct packet *p,
					  __u32 dir, __u32 gen, struct session_key *key,
					  int is_lo, __u32 flags, struct decision *d)
{
	int tcp = p->proto == IPPROTO_TCP;
	int stateless = p->icmp == ICMP_KIND_ERROR || p->icmp == ICMP_KIND_OTHER;

	if (flags & JUDGED_ALONE)
		return NEED_VERDICT;
	if (d->verdict == VERDICT_DENIED) {
		/* Maybe a reply whose session was lost: judged the other way. */
		if (!stateless && maybe_reply(p))
			return judge_as_reply(skb, p, dir, gen, d);
		return NEED_VERDICT;
	}
	/* Stateless ICMP, or an allowed RST (nothing to track): the verdict
	 * is all. */
	if (stateless || (tcp && (p->tcp_flags & TCP_FLAG_RST)))
		return NEED_VERDICT;
	return open_session(skb, p, dir, key, is_lo, 0, flags & JUDGED_REUSE, d);
}

/* A candidate is staged: the new flow goes on in the staged stage
 * (mseg_staged, a tail call: its own program, so the verifier checks the
 * second policy lookup apart, and a packet pays for it only while a
 * candidate is staged). Returns only if the stage is not installed. */
static __always_inline void judge_in_staged_stage(struct __sk_buff *skb, __u32 dir,
						  __u32 gen, __u32 flags,
						  const struct decision *d)
{
	struct scratch *sc = scratch();

	if (!sc)
		return;
	sc->own = *d;
	sc->direction = dir;
	sc->generation = gen;
	sc->flags = flags;
	/* bpf_tail_call: continue in mseg_staged. */
	stage_map.call(skb, STAGE_STAGED);
}

/* process()'s flags while the policy is consulted (scratch.carried). */
#define CARRY_REVAL 1  /* a stale session: judged in its original direction */
#define CARRY_SIDE 2   /* the packet is the session's reply direction */
#define CARRY_ALONE 4  /* judged alone (an echo against its session) */
#define CARRY_REUSE 8  /* a new connection on a closed tuple of session_map */
#define CARRY_LO 16    /* the packet's source is the key's lo endpoint */

/* Everything after parsing, for a packet that has its L4 header. The
 * policy is consulted once (judge_flow): for a new flow in its own
 * direction, for a session whose generation is stale in the session's
 * original one; a packet that may be a reply whose session was lost is
 * judged the other way in the reply stage. */
static __always_inline int process(struct __sk_buff *skb, struct scratch *sc,
				   __u32 dir, struct decision *d)
{
	const struct packet *p = &sc->packet;
	__u32 gen = active_generation();
	int tcp = p->proto == IPPROTO_TCP;
	__u8 tf = p->tcp_flags;
	struct session_key key = {};
	struct session_value *s = NULL;
	int is_lo = 0, reported = 0, pending = 0, reuse = 0;
	__u32 side = 0;
	/* ICMP errors and informational ICMP open no session. */
	int stateless = p->icmp == ICMP_KIND_ERROR || p->icmp == ICMP_KIND_OTHER;

	if (p->icmp == ICMP_KIND_ERROR) {
		/* An ICMP error quoting a tracked session is related to it;
		 * other ICMP errors open no session and are judged alone. */
		struct quoted q = {};
		int rc = parse_quote(skb, p, &q);
		if (rc != PARSE_OK) {
			drop_packet(d, REASON_INVALID);
			if (rc == PARSE_SUSPECT)
				d->audit = AUDIT_BY_DST;
			return NEED_VERDICT;
		}
		make_session_key(p->family, q.proto, q.saddr, q.daddr, q.sport,
				 q.dport, &key);
		if (find_session(&key, &pending)) {
			d->verdict = VERDICT_ALLOWED;
			d->reason = REASON_RELATED;
			return pass_packet(dir, VERDICT_ALLOWED, REASON_RELATED, p);
		}
	} else if (!stateless) {
		is_lo = make_session_key(p->family, p->proto, p->saddr, p->daddr,
					 p->sport, p->dport, &key);
		s = find_session(&key, &pending);
		if (s && tcp && s->state == STATE_CLOSED &&
		    (tf & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
			s = NULL; /* a new connection on a closed tuple */
			reuse = !pending;
		}
		if (s)
			side = is_lo == !!(s->flags & SESSION_ORIG_LO) ? 0 : 1;
	}

	/* An echo request from the session's responder (or a reply from its
	 * originator) is no part of it: the identifier is all they share, and
	 * riding on it would let the responder ping a peer the policy keeps it
	 * from. Judged alone, in its own direction, like a fresh identifier. */
	int alone = s && (p->icmp == ICMP_KIND_ECHO_REQUEST ||
			  p->icmp == ICMP_KIND_ECHO_REPLY) &&
		    (p->icmp == ICMP_KIND_ECHO_REPLY) != side;

	if (s && !alone && s->generation == gen)
		return account_session(skb, p, dir, &key, s, side, pending, 0, d);

	/* Judge: a stale session in its original direction; a new flow (or a
	 * packet judged alone) in its own. A SYN-ACK is only ever a reply. */
	int reval = s && !alone;
	int synack = tcp && (tf & (TCP_FLAG_SYN | TCP_FLAG_ACK)) ==
				    (TCP_FLAG_SYN | TCP_FLAG_ACK);
	if (!reval && !alone && synack) {
		drop_packet(d, REASON_STATE); /* if nobody allowed its SYN */
		d->generation = gen;
		d->audit = AUDIT_BY_SRC;
		return judge_as_reply(skb, p, dir, gen, d);
	}
	/* The flags cross the judgment in the per-CPU scratch, not in registers
	 * or on the stack: the verifier checks the policy lookup once for each
	 * distinct state that reaches it, and every combination of them would
	 * be one (a third of the entry point's verification, and of a cold
	 * start's wait for it). A stale session is looked up again after. */
	sc->carried = (reval ? CARRY_REVAL : 0) | (side ? CARRY_SIDE : 0) |
		      (alone ? CARRY_ALONE : 0) | (reuse ? CARRY_REUSE : 0) |
		      (is_lo ? CARRY_LO : 0);
	judge_flow(p, reval ? side : 0, gen, d);
	__u32 carried = *(volatile __u32 *)&sc->carried;

	reval = carried & CARRY_REVAL;
	side = !!(carried & CARRY_SIDE);
	alone = carried & CARRY_ALONE;
	reuse = carried & CARRY_REUSE;
	is_lo = !!(carried & CARRY_LO);
	if (reval) {
		s = find_session(&key, &pending);
		/* Gone meanwhile, or another session of the tuple (its direction
		 * may differ): the judgment made stands for this packet. */
		if (!s || side != (is_lo == !!(s->flags & SESSION_ORIG_LO) ? 0 : 1)) {
			if (side)
				toward_packet(d);
			return NEED_VERDICT;
		}
		int r = revalidate_session(skb, p, dir, &key, s, side, pending, d);
		if (side) /* judged in the session's direction: report the packet's */
			toward_packet(d);
		if (r == REVAL_REVOKED)
			return NEED_VERDICT;
		reported = r == REVAL_REPORTED;
		return account_session(skb, p, dir, &key, s, side, pending, reported, d);
	}
	__u32 flags = (alone ? JUDGED_ALONE : 0) | (reuse ? JUDGED_REUSE : 0);
	/* A new flow is judged by the staged candidate too, if there is one. */
	if (staged_generation())
		judge_in_staged_stage(skb, dir, gen, flags, d);
	return after_judgment(skb, p, dir, gen, &key, is_lo, flags, d);
}

/* After the verdict: counters and events (a session the packet opened has
 * its "new" event in the verdict's record), a first fragment remembered
 * for the rest. */
static __always_inline int finish_packet(struct __sk_buff *skb, struct scratch *sc,
					 __u32 dir, struct decision *d, int act)
{
	struct packet *p = &sc->packet;

	if (act == NEED_VERDICT) {
		if (d->audit >= AUDIT_BY_DST) /* one lookup, whichever stage asked */
			d->audit = audited(p->family, d->audit == AUDIT_BY_SRC ? p->saddr
									      : p->daddr,
					   active_generation()) ? AUDIT_YES : AUDIT_NO;
		/* A new session's verdict and "new" event share its clock read. */
		__u32 opened = sc->opened;
		__u64 now = opened ? sc->session.created_ns : precise_now();
		act = apply_verdict(skb, p, dir, d, now, opened, sc->session.state);
		sc->opened = 0;
	}
	if (p->frag == FRAG_FIRST)
		remember_first_fragment(p, d);
	return act;
}

static __always_inline int handle_packet(struct __sk_buff *skb, __u32 dir, int l3)
{
	struct scratch *sc = scratch();
	struct decision d = {};
	int act;

	if (!sc) /* cannot happen (index 0 of an array); never fail open */
		return TC_ACT_SHOT;
	/* The packet lives in the per-CPU scratch: the stack has no room. */
	struct packet *p = &sc->packet;
	sc->opened = 0;
	int rc = parse_packet(skb, p, l3);

	if (rc == PARSE_NON_IP)
		return pass_packet(dir, VERDICT_ALLOWED, REASON_NON_IP, p);
	if (rc == PARSE_NEIGHBOR)
		return pass_packet(dir, VERDICT_ALLOWED, REASON_NEIGHBOR, p);
	if (rc == PARSE_SUSPECT) {
		/* Well formed, not to be passed unjudged: audit mode lets it. */
		act = drop_packet(&d, REASON_INVALID);
		d.audit = AUDIT_BY_DST;
	} else if (rc != PARSE_OK) {
		act = drop_packet(&d, REASON_INVALID);
	} else if (p->frag == FRAG_LATER) {
		act = follow_fragment(p, dir, &d);
	} else {
		act = process(skb, sc, dir, &d);
	}
	return finish_packet(skb, sc, dir, &d, act);
}

/* Which hook a copy of mseg_entry serves: bit 0 the direction (enum
 * mseg_direction), bit 1 a link without a link-layer header (tun,
 * WireGuard, ipip, gre, sit: the packet starts with its IP header). */
#define ENTRY_L3 2
/* The immediate the loader replaces in each copy it loads (ENTRY_MAGIC in
 * microseg/kernel/loader.py): the high word marks it, the low word is the
 * kind once replaced. */
#define ENTRY_MAGIC 0x6d73656700000000ULL

static __always_inline __u32 entry_kind(void)
{
	__u64 k;

	/* An immediate the compiler cannot see through: the body is
	 * compiled once, not once per hook; the verifier sees each loaded
	 * copy's constant and checks only that copy's paths. */
	asm volatile("%0 = %1 ll" : "=r"(k) : "i"(ENTRY_MAGIC));
	return (__u32)k;
}

/* Every hook's entry point: loaded once per kind (mseg_ingress,
 * mseg_egress, and their _l3 twins), docs/how-it-works.md "Start and
 * restart". */
int mseg_entry(struct __sk_buff *skb)
{
	__u32 kind = entry_kind();

	return handle_packet(skb, kind & 1, !!(kind & ENTRY_L3));
}

/* Never attached: userspace runs it (BPF_PROG_TEST_RUN) to sample the
 * session clock and CLOCK_MONOTONIC at one instant. */
int mseg_clock(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct clock_sample *c = clock_map.lookup(&zero);

	if (c) {
		c->jiffies = bpf_jiffies64();
		c->ktime_ns = bpf_ktime_get_ns();
	}
	return TC_ACT_OK;
}

/* Never attached: the daemon runs it (BPF_PROG_TEST_RUN) with a struct
 * agg_key as the packet, for a denied flow that went quiet: its held
 * count is reported, or its idle entry retired (bpf/lib/aggregate.h). */
int mseg_flush(struct __sk_buff *skb)
{
	struct agg_key k = {};

	/* bpf_skb_load_bytes: the key, from the test run's data. */
	if (bpf_skb_load_bytes(skb, 0, &k, sizeof(k)))
		return FLUSH_NONE;
	return flush_flow(&k, precise_now());
}

/* Which stage a copy of mseg_stage is (its kind, as the loader writes it:
 * STAGE_KINDS in microseg/kernel/loader.py). */
#define STAGE_KIND_REPLY 0
#define STAGE_KIND_STAGED 1

/* The stages entry points tail-call (stage_map), both copies of this one
 * function, each with its kind in an immediate (entry_kind): BCC compiles
 * the judgment, the session opening and the verdict once for both.
 *
 * The reply stage (stage_map[STAGE_REPLY]), for a packet that has no
 * session, is not a connection start and is denied in its own direction:
 * allowed the other way round, it is a reply whose session was lost
 * (evicted, swept, a daemon started without pins) and opens the session
 * with its destination as originator; otherwise its own outcome stands.
 *
 * The staged stage (stage_map[STAGE_STAGED]), for a new flow while a
 * candidate policy is staged (docs/policy.md "Staging"): the flow judged by
 * the candidate too — the active policy's outcome stands, the candidate's
 * goes into its event and counters — then on as process() would have gone
 * on (after_judgment's steps, sharing this function's one open_session). */
int mseg_stage(struct __sk_buff *skb)
{
	int reply = entry_kind() == STAGE_KIND_REPLY;
	struct scratch *sc = scratch();

	if (!sc)
		return TC_ACT_SHOT;
	struct packet *p = &sc->packet;
	/* The reply stage's fallback, the staged stage's active outcome. */
	struct decision d = sc->own;
	struct decision judged = {};
	__u32 dir = sc->direction & 1;
	/* The staged generation may have been cleared since process() looked:
	 * then there is nothing to add. */
	__u32 gen = reply ? sc->generation : staged_generation();
	int open = 0, reuse = 0, back = 0, act = NEED_VERDICT;
	int tcp = p->proto == IPPROTO_TCP;

	if (gen)
		judge_flow(p, reply, gen, &judged);
	if (reply) {
		/* Allowed the other way round: a reply (an RST opens nothing). */
		back = gen && judged.verdict != VERDICT_DENIED;
		if (back) {
			d = judged;
			open = !(tcp && (p->tcp_flags & TCP_FLAG_RST));
		}
	} else {
		if (gen)
			note_staged(&d, &judged, gen);
		__u32 flags = sc->flags;
		int stateless = p->icmp == ICMP_KIND_ERROR || p->icmp == ICMP_KIND_OTHER;

		if (flags & JUDGED_ALONE) {
			/* the verdict is all */
		} else if (d.verdict == VERDICT_DENIED) {
			/* Maybe a reply whose session was lost: judged the other
			 * way (a tail call into the reply stage). */
			if (!stateless && maybe_reply(p))
				judge_as_reply(skb, p, dir, sc->generation, &d);
		} else if (!stateless && !(tcp && (p->tcp_flags & TCP_FLAG_RST))) {
			open = 1;
			reuse = flags & JUDGED_REUSE;
		}
	}
	if (open) {
		struct session_key key = {};
		int is_lo = make_session_key(p->family, p->proto, p->saddr, p->daddr,
					     p->sport, p->dport, &key);
		act = open_session(skb, p, dir, &key, is_lo, reply, reuse, &d);
	}
	if (back)
		toward_packet(&d); /* the session took them the other way round */
	return finish_packet(skb, sc, dir, &d, act);
}
