/* SPDX-License-Identifier: GPL-2.0 */
/*
 * session.h — stateful session tracking in session_map.
 *
 * One entry per connection under a canonical key (both directions find
 * it). The policy is consulted for a session's first packet and again
 * when the active generation moved on since the session was judged
 * (revocation); every other packet costs one hash lookup.
 *
 * A packet can cross two attached hooks (a workload's veth ingress, then
 * another's egress). Each direction of a session is accounted — state
 * machine, counters, stats — at the first hook that saw it (`owner`);
 * other hooks let it pass untouched, so nothing is counted twice.
 */
#ifndef MSEG_SESSION_H
#define MSEG_SESSION_H

#include <uapi/linux/bpf.h>
#include "../microseg.h"
#include "maps.h"
#include "parse.h"
#include "clock.h"
#include "stats.h"
#include "events.h"
#include "verdict.h"

#define TRANSITION_INVALID 0xFF

static __always_inline __u32 hook_id(struct __sk_buff *skb, __u32 dir)
{
	return (skb->ifindex << 1) | dir;
}

/* What users see: SYN_RECV is still "new". */
static __always_inline __u8 public_state(__u8 state)
{
	return state == STATE_SYN_RECV ? STATE_NEW : state;
}

/* Any consistent total order of (addr, port) works for a canonical key;
 * comparing 64-bit words is cheaper than a byte-wise compare. */
static __always_inline int endpoint_is_lower(const __u8 *a, __u16 aport,
					     const __u8 *b, __u16 bport)
{
	__u64 a0 = *(const __u64 *)a, b0 = *(const __u64 *)b;
	__u64 a1 = *(const __u64 *)(a + 8), b1 = *(const __u64 *)(b + 8);

	if (a0 != b0)
		return a0 < b0;
	if (a1 != b1)
		return a1 < b1;
	return aport <= bport;
}

/* Fill the canonical key; returns 1 when saddr:sport is its lo endpoint. */
static __always_inline int make_session_key(__u8 family, __u8 proto,
					    const __u8 *saddr, const __u8 *daddr,
					    __u16 sport, __u16 dport,
					    struct session_key *k)
{
	int lo = endpoint_is_lower(saddr, sport, daddr, dport);

	k->proto = proto;
	k->family = family;
	if (lo) {
		__builtin_memcpy(k->addr_lo, saddr, 16);
		__builtin_memcpy(k->addr_hi, daddr, 16);
		k->port_lo = sport;
		k->port_hi = dport;
	} else {
		__builtin_memcpy(k->addr_lo, daddr, 16);
		__builtin_memcpy(k->addr_hi, saddr, 16);
		k->port_lo = dport;
		k->port_hi = sport;
	}
	return lo;
}

/* TCP state machine. d is 0 for the originator's packets, 1 for the
 * responder's. Returns the next state or TRANSITION_INVALID; FIN
 * bookkeeping goes into *flags. */
static __always_inline __u8 tcp_next_state(__u8 state, __u8 *flags, __u32 d,
					   __u8 tf)
{
	int syn = tf & TCP_FLAG_SYN, ack = tf & TCP_FLAG_ACK;
	int fin = tf & TCP_FLAG_FIN;

	if (tf & TCP_FLAG_RST)
		return STATE_CLOSED;

	switch (state) {
	case STATE_NEW: /* SYN sent */
		if (d == 0)
			return (syn && !ack) ? STATE_NEW : TRANSITION_INVALID;
		return (syn && ack) ? STATE_SYN_RECV : TRANSITION_INVALID;
	case STATE_SYN_RECV:
		if (d == 0) {
			if (syn) /* retransmitted SYN; a SYN-ACK from here is not */
				return ack ? TRANSITION_INVALID : STATE_SYN_RECV;
			if (fin) {
				*flags |= SESSION_FIN_ORIG;
				return STATE_CLOSING;
			}
			return STATE_ESTABLISHED; /* the handshake's final ACK */
		}
		return (syn && !ack) ? TRANSITION_INVALID : STATE_SYN_RECV;
	case STATE_ESTABLISHED:
	case STATE_CLOSING: {
		if (syn) {
			/* SYN-ACK: a retransmit from the responder, invalid from
			 * the originator. A bare SYN from the originator reuses
			 * the tuple — same tuple, same verdict — so it passes;
			 * from the responder it is invalid. */
			if (ack)
				return d == 0 ? TRANSITION_INVALID : state;
			return d == 0 ? state : TRANSITION_INVALID;
		}
		__u8 fins = *flags & (SESSION_FIN_ORIG | SESSION_FIN_REPLY);
		if (fin) {
			*flags |= d ? SESSION_FIN_REPLY : SESSION_FIN_ORIG;
			return STATE_CLOSING;
		}
		/* The ACK after both FINs closes the connection. */
		if (fins == (SESSION_FIN_ORIG | SESSION_FIN_REPLY) && ack)
			return STATE_CLOSED;
		return state;
	}
	case STATE_CLOSED:
		return STATE_CLOSED; /* late ACKs and retransmissions */
	}
	return TRANSITION_INVALID;
}

/* A session event, endpoints in the session's original direction. */
static __always_inline void emit_session_event(struct __sk_buff *skb,
					       const struct packet *p,
					       __u32 dir, __u32 side,
					       const struct session_value *s,
					       __u8 state, __u8 prev_state,
					       __u64 now)
{
	struct event *e = reserve_event(EVENT_SESSION);

	if (!e)
		return;
	fill_packet_fields(e, skb, p, dir, now);
	e->created_ns = s->created_ns;
	e->packets[0] = s->packets[0];
	e->packets[1] = s->packets[1];
	e->bytes[0] = s->bytes[0];
	e->bytes[1] = s->bytes[1];
	if (side == 0)
		fill_endpoints(e, p->saddr, p->daddr, p->sport, p->dport);
	else
		fill_endpoints(e, p->daddr, p->saddr, p->dport, p->sport);
	e->rule_id = s->rule_id;
	e->generation = s->generation;
	e->src_identity = s->src_identity;
	e->dst_identity = s->dst_identity;
	e->verdict = s->verdict;
	e->reason = s->reason;
	e->state = state;
	e->prev_state = prev_state;
	submit_event(e);
}

/* A packet of a known session: the fast path. side is 0 for the
 * originator's packets, 1 for the responder's. With `reported`, *out holds
 * a decision (an audited revalidation) the caller still has to report. */
static __always_inline int account_session(struct __sk_buff *skb,
					   const struct packet *p, __u32 dir,
					   struct session_value *s, __u32 side,
					   int reported, struct decision *out)
{
	if (!reported) {
		out->verdict = s->verdict;
		out->reason = REASON_SESSION;
		out->rule_id = s->rule_id;
		out->generation = s->generation;
	}

	__u32 me = hook_id(skb, dir);
	if (s->owner[side] != me) {
		if (s->owner[side] && !reported)
			return TC_ACT_OK; /* accounted at the hook that owns it */
		if (!s->owner[side])
			s->owner[side] = me;
	}

	__u8 state = s->state, flags = s->flags, next = state;
	if (p->proto == IPPROTO_TCP) {
		next = tcp_next_state(state, &flags, side, p->tcp_flags);
		if (next == TRANSITION_INVALID)
			return drop_packet(out, REASON_STATE);
	} else if (side == 1 && state == STATE_NEW) {
		next = STATE_ESTABLISHED; /* UDP / ICMP echo: first reply */
	}

	/* Both directions may be handled on different CPUs at once. */
	__sync_fetch_and_add(&s->packets[side], 1);
	__sync_fetch_and_add(&s->bytes[side], p->len);
	s->last_seen = session_clock();

	if (next != state || flags != s->flags) {
		s->state = next;
		s->flags = flags;
		if (public_state(next) != public_state(state))
			emit_session_event(skb, p, dir, side, s, next,
					   public_state(state), precise_now());
	}
	if (reported)
		return NEED_VERDICT;
	return pass_packet(dir, s->verdict, REASON_SESSION, p->len);
}

/* session_stats_map: created (1) or revoked (0), per CPU. */
static __always_inline void count_session(int created)
{
	__u32 zero = 0;
	/* bpf_map_lookup_elem: this CPU's counters. */
	struct session_stats *ss = session_stats_map.lookup(&zero);

	if (!ss)
		return;
	if (created)
		ss->created++;
	else
		ss->revoked++;
}

enum revalidation {
	REVAL_KEEP = 0,     /* still allowed: carry on */
	REVAL_REPORTED = 1, /* audit: carry on, and report *out */
	REVAL_REVOKED = 2,  /* denied: report *out, the session is closed */
};

/* The policy changed since the session was judged; *out is the active
 * generation's decision for the session's original direction. */
static __always_inline int revalidate_session(struct __sk_buff *skb,
					      const struct packet *p, __u32 dir,
					      struct session_key *key,
					      struct session_value *s,
					      __u32 side, struct decision *out)
{
	if (out->verdict == VERDICT_DENIED) {
		out->reason = REASON_REVOKED;
		emit_session_event(skb, p, dir, side, s, STATE_CLOSED,
				   public_state(s->state), precise_now());
		/* bpf_map_delete_elem: later packets are judged afresh. */
		if (session_map.delete(key) == 0)
			count_session(0);
		return REVAL_REVOKED;
	}
	s->generation = out->generation;
	s->rule_id = out->rule_id;
	s->reason = out->reason;
	s->src_identity = out->src_identity;
	s->dst_identity = out->dst_identity;
	if (out->verdict == VERDICT_AUDIT) {
		/* Would be revoked: say so, let it pass. */
		s->verdict = VERDICT_AUDIT;
		s->flags |= SESSION_AUDIT;
		out->reason = REASON_REVOKED;
		return REVAL_REPORTED;
	}
	s->verdict = VERDICT_ALLOWED;
	s->flags &= ~SESSION_AUDIT;
	return REVAL_KEEP;
}

/* First packet of an allowed (or audited) session: *out is the policy's
 * decision for it. The verdict event comes first, then "new". */
static __always_inline int open_session(struct __sk_buff *skb,
					const struct packet *p, __u32 dir,
					struct session_key *key, int is_lo,
					struct decision *out)
{
	__u8 tf = p->tcp_flags;
	__u64 now = precise_now(); /* one clock read for the session and both events */
	struct session_value nv = {
		.created_ns = now,
		.last_seen = session_clock(),
		.packets = { 1, 0 },
		.bytes = { p->len, 0 },
		.rule_id = out->rule_id,
		.generation = out->generation,
		.owner = { hook_id(skb, dir), 0 },
		.src_identity = out->src_identity,
		.dst_identity = out->dst_identity,
		.state = STATE_NEW,
		.flags = is_lo ? SESSION_ORIG_LO : 0,
		.verdict = out->verdict,
		.reason = out->reason,
	};
	if (out->verdict == VERDICT_AUDIT)
		nv.flags |= SESSION_AUDIT;
	if (p->proto == IPPROTO_TCP && !(tf & TCP_FLAG_SYN)) {
		/* Mid-stream pickup (e.g. after a restart without pinned
		 * state): allowed, so it continues as established. */
		nv.flags |= SESSION_PICKUP;
		nv.state = STATE_ESTABLISHED;
		if (tf & TCP_FLAG_FIN) {
			nv.state = STATE_CLOSING;
			nv.flags |= SESSION_FIN_ORIG;
		}
	}
	/* bpf_map_update_elem(BPF_NOEXIST): a new entry — the LRU map evicts
	 * the least recently used one when full, silently, so new entries are
	 * counted; else (BPF_ANY) replace a closed session in place. */
	if (session_map.insert(key, &nv) == 0)
		count_session(1);
	else
		session_map.update(key, &nv);

	int act = apply_verdict(skb, p, dir, out, now);
	emit_session_event(skb, p, dir, 0, &nv, nv.state, STATE_NONE, now);
	return act;
}

#endif /* MSEG_SESSION_H */
