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
#include "lib/verdict.h"
#include "lib/policy.h"
#include "lib/session.h"
#include "lib/frag.h"

/* Everything after parsing, for a packet that has its L4 header. The
 * policy is consulted at one place: for a new flow in its own direction,
 * for a session whose generation is stale in the session's original one. */
static __always_inline int process(struct __sk_buff *skb, const struct packet *p,
				   __u32 dir, struct decision *d)
{
	__u32 gen = active_generation();
	int tcp = p->proto == IPPROTO_TCP;
	__u8 tf = p->tcp_flags;
	struct session_key key = {};
	struct session_value *s = NULL;
	int is_lo = 0, reported = 0;
	__u32 side = 0;
	/* ICMP errors and informational ICMP open no session. */
	int stateless = p->icmp == ICMP_KIND_ERROR || p->icmp == ICMP_KIND_OTHER;

	if (p->icmp == ICMP_KIND_ERROR) {
		/* An ICMP error quoting a tracked session is related to it;
		 * other ICMP errors open no session and are judged alone. */
		struct quoted q = {};
		if (parse_quote(skb, p, &q) != PARSE_OK)
			return drop_packet(d, REASON_INVALID);
		make_session_key(p->family, q.proto, q.saddr, q.daddr, q.sport,
				 q.dport, &key);
		if (session_map.lookup(&key)) {
			d->verdict = VERDICT_ALLOWED;
			d->reason = REASON_RELATED;
			return pass_packet(dir, VERDICT_ALLOWED, REASON_RELATED,
					   p->len);
		}
	} else if (!stateless) {
		is_lo = make_session_key(p->family, p->proto, p->saddr, p->daddr,
					 p->sport, p->dport, &key);
		/* bpf_map_lookup_elem: the session, whichever direction. */
		s = session_map.lookup(&key);
		if (s && tcp && s->state == STATE_CLOSED &&
		    (tf & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
			s = NULL; /* a new connection on a closed tuple */
		if (s)
			side = is_lo == !!(s->flags & SESSION_ORIG_LO) ? 0 : 1;
	}

	if (s && (p->icmp == ICMP_KIND_ECHO_REQUEST || p->icmp == ICMP_KIND_ECHO_REPLY) &&
	    (p->icmp == ICMP_KIND_ECHO_REPLY) != side) {
		/* An echo request from the session's responder (or a reply
		 * from its originator) is no part of it: the identifier is all
		 * they share, and riding on it would let the responder ping a
		 * peer the policy keeps it from. Judged alone, in its own
		 * direction, like a ping with a fresh identifier. */
		match_policy(p->family, p->proto, p->saddr, p->daddr, p->dport, gen, d);
		return NEED_VERDICT;
	}

	if (!s || s->generation != gen) {
		if (!s && tcp && (tf & (TCP_FLAG_SYN | TCP_FLAG_ACK)) ==
					 (TCP_FLAG_SYN | TCP_FLAG_ACK))
			return drop_packet(d, REASON_STATE); /* SYN-ACK, no SYN seen */
		int reverse = s && side; /* a session: its original direction */
		match_policy(p->family, p->proto, reverse ? p->daddr : p->saddr,
			     reverse ? p->saddr : p->daddr,
			     reverse ? p->sport : p->dport, gen, d);
		if (!s) {
			/* Denied, stateless ICMP, or an allowed RST (nothing to
			 * track): the verdict is all. */
			if (d->verdict == VERDICT_DENIED || stateless ||
			    (tcp && (tf & TCP_FLAG_RST)))
				return NEED_VERDICT;
			return open_session(skb, p, dir, &key, is_lo, d);
		}
		int r = revalidate_session(skb, p, dir, &key, s, side, d);
		if (r == REVAL_REVOKED)
			return NEED_VERDICT;
		reported = r == REVAL_REPORTED;
	}
	return account_session(skb, p, dir, s, side, reported, d);
}

static __always_inline int handle_packet(struct __sk_buff *skb, __u32 dir)
{
	struct packet p = {};
	struct decision d = {};
	int rc = parse_packet(skb, &p);
	int act;

	if (rc == PARSE_NON_IP)
		return pass_packet(dir, VERDICT_ALLOWED, REASON_NON_IP, skb->len);
	if (rc == PARSE_NEIGHBOR)
		return pass_packet(dir, VERDICT_ALLOWED, REASON_NEIGHBOR, p.len);
	if (rc != PARSE_OK)
		act = drop_packet(&d, REASON_INVALID);
	else if (p.frag == FRAG_LATER)
		act = follow_fragment(&p, dir, &d);
	else
		act = process(skb, &p, dir, &d);
	if (act == NEED_VERDICT)
		act = apply_verdict(skb, &p, dir, &d, precise_now());
	if (p.frag == FRAG_FIRST)
		remember_first_fragment(&p, &d);
	return act;
}

int mseg_ingress(struct __sk_buff *skb)
{
	return handle_packet(skb, DIR_INGRESS);
}

int mseg_egress(struct __sk_buff *skb)
{
	return handle_packet(skb, DIR_EGRESS);
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
