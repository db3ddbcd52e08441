/* SPDX-License-Identifier: GPL-2.0 */
/*
 * session.h — stateful session tracking.
 *
 * One entry per connection under a canonical key (both directions find
 * it). A new connection's entry lives in pending_map until both of its
 * directions have been seen, then moves to session_map: an unanswered
 * flood (random source ports, spoofed first packets) evicts only other
 * unanswered entries, never a session that works (docs/how-it-works.md).
 * The daemon's sweeper gives pending entries short idle timeouts.
 *
 * The policy is consulted for a session's first packet and again when the
 * active generation moved on since the session was judged (revocation);
 * every other packet costs one hash lookup.
 *
 * A packet can cross two attached hooks (a workload's veth ingress, then
 * another's egress). Each direction of a session is accounted — state
 * machine, counters, stats — at one hook, its owner; other hooks let it
 * pass untouched, so nothing is counted twice. When the owner has seen
 * nothing of its direction for a while (the link is gone, the route moved)
 * the next hook that does takes the direction over.
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
#include "policy.h"

#define TRANSITION_INVALID 0xFF
/* Handover when settings_map has none yet: a second at HZ 250. */
#define DEFAULT_HANDOVER_JIFFIES 250

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

/* The session of a key and where it lives: *pending is 1 for pending_map. */
static __always_inline struct session_value *find_session(struct session_key *k,
							  int *pending)
{
	/* bpf_map_lookup_elem: established sessions first (the fast path). */
	struct session_value *s = session_map.lookup(k);

	*pending = 0;
	if (s)
		return s;
	s = pending_map.lookup(k);
	*pending = s != NULL;
	return s;
}

static __always_inline int forget_session(struct session_key *k, int pending)
{
	/* bpf_map_delete_elem: from whichever table holds it. */
	return pending ? pending_map.delete(k) : session_map.delete(k);
}

/* TCP state machine. d is 0 for the originator's packets, 1 for the
 * responder's. Returns the next state or TRANSITION_INVALID; *fin gets the
 * FIN bit to set. */
static __always_inline __u8 tcp_next_state(__u8 state, __u64 flags, __u32 d,
					   __u8 tf, __u64 *fin)
{
	int syn = tf & TCP_FLAG_SYN, ack = tf & TCP_FLAG_ACK;

	if (tf & TCP_FLAG_RST)
		return STATE_CLOSED;
	if (tf & TCP_FLAG_FIN)
		*fin = d ? SESSION_FIN_REPLY : SESSION_FIN_ORIG;

	switch (state) {
	case STATE_NEW: /* SYN sent */
		if (d == 0)
			return (syn && !ack) ? STATE_NEW : TRANSITION_INVALID;
		if (syn && !ack) /* simultaneous open: the peer's own SYN */
			return STATE_SYN_RECV;
		return (syn && ack) ? STATE_SYN_RECV : TRANSITION_INVALID;
	case STATE_SYN_RECV:
		if (syn) {
			/* Retransmitted SYNs and SYN-ACKs; both sides send a
			 * SYN-ACK in a simultaneous open. */
			if (flags & SESSION_SIMOPEN)
				return STATE_SYN_RECV;
			if (d == 0)
				return ack ? TRANSITION_INVALID : STATE_SYN_RECV;
			return ack ? STATE_SYN_RECV : TRANSITION_INVALID;
		}
		if (tf & TCP_FLAG_FIN)
			return STATE_CLOSING;
		/* The handshake's final ACK (from either side in a
		 * simultaneous open). */
		return (d == 0 || (flags & SESSION_SIMOPEN)) ? STATE_ESTABLISHED
							      : STATE_SYN_RECV;
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
		if (tf & TCP_FLAG_FIN)
			return STATE_CLOSING;
		/* The ACK after both FINs closes the connection. */
		if ((flags & (SESSION_FIN_ORIG | SESSION_FIN_REPLY)) ==
			    (SESSION_FIN_ORIG | SESSION_FIN_REPLY) && ack)
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
	struct event *e = reserve_record(RING_EVENTS);

	count_record(RING_EVENTS, EVENT_SESSION, e != NULL);
	if (!e)
		return;
	/* Every field written (see reserve_record). */
	fill_packet_fields(e, skb, p, dir, now);
	e->type = EVENT_SESSION;
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
	e->flags = 0;
	e->staged_verdict = 0;
	e->pad = 0;
	e->staged_rule = 0;
	e->staged_generation = 0;
	submit_event(e, RING_EVENTS);
}

/* Both directions seen: the entry moves from pending_map to session_map
 * (a copy, then the delete; a concurrent copy on another CPU loses the
 * insert race and only deletes). */
static __always_inline void promote_session(struct session_key *key,
					    struct session_value *s)
{
	/* bpf_map_update_elem(BPF_NOEXIST) from the pending entry itself. */
	if (session_map.insert(key, s) == 0) {
		struct session_stats *ss = session_counters();
		if (ss)
			ss->promoted++;
	}
	pending_map.delete(key);
}

static __always_inline __u64 handover_jiffies(void)
{
	__u32 zero = 0;
	struct settings *st = settings_map.lookup(&zero);

	return st && st->handover_jiffies ? st->handover_jiffies
					  : DEFAULT_HANDOVER_JIFFIES;
}

/* A packet of a known session: the fast path. side is 0 for the
 * originator's packets, 1 for the responder's. With `reported`, *out holds
 * a decision (an audited revalidation) the caller still has to report. */
static __always_inline int account_session(struct __sk_buff *skb,
					   const struct packet *p, __u32 dir,
					   struct session_key *key,
					   struct session_value *s, __u32 side,
					   int pending, int reported,
					   struct decision *out)
{
	if (!reported) {
		out->verdict = s->verdict;
		out->reason = REASON_SESSION;
		out->rule_id = s->rule_id;
		out->generation = s->generation;
	}

	__u32 me = hook_id(skb, dir);
	__u64 now_j = session_clock();
	if (s->owner[side] != me) {
		/* Another hook accounts this direction, unless it has seen none
		 * of it for a while: then this one takes it over. */
		if (s->owner[side] && !reported &&
		    now_j - s->seen[side] < handover_jiffies())
			return TC_ACT_OK;
		s->owner[side] = me;
	}

	__u8 state = s->state, next = state;
	__u64 fin = 0;
	if (p->proto == IPPROTO_TCP) {
		next = tcp_next_state(state, s->flags, side, p->tcp_flags, &fin);
		if (next == TRANSITION_INVALID) {
			/* Audit mode (the session's destination's, or a session
			 * that passes only because of it) lets it pass. */
			drop_packet(out, REASON_STATE);
			out->audit = (s->flags & SESSION_AUDIT) ? AUDIT_YES :
				     side ? AUDIT_BY_SRC : AUDIT_BY_DST;
			return NEED_VERDICT;
		}
		if (state == STATE_NEW && next == STATE_SYN_RECV && side == 1 &&
		    !(p->tcp_flags & TCP_FLAG_ACK))
			__sync_fetch_and_or(&s->flags, SESSION_SIMOPEN);
		if (fin)
			/* Atomic: the other direction may set its FIN bit on
			 * another CPU at this very moment. */
			__sync_fetch_and_or(&s->flags, fin);
	} else if (side == 1 && state == STATE_NEW) {
		next = STATE_ESTABLISHED; /* UDP / ICMP echo: first reply */
	}

	/* Both directions may be handled on different CPUs at once. */
	__sync_fetch_and_add(&s->packets[side], p->segs);
	__sync_fetch_and_add(&s->bytes[side], p->len);
	s->last_seen = now_j;
	s->seen[side] = now_j;

	if (next != state) {
		s->state = next;
		if (public_state(next) != public_state(state))
			emit_session_event(skb, p, dir, side, s, next,
					   public_state(state), precise_now());
	}
	/* Both directions seen: a session that works. (A RST is no answer: an
	 * entry it closed stays with the one-way ones and expires there.) */
	if (pending && s->packets[side ^ 1] && next != STATE_CLOSED)
		promote_session(key, s);
	if (reported)
		return NEED_VERDICT;
	return pass_packet(dir, s->verdict, REASON_SESSION, p);
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
					      __u32 side, int pending,
					      struct decision *out)
{
	if (out->verdict == VERDICT_DENIED) {
		out->reason = REASON_REVOKED;
		emit_session_event(skb, p, dir, side, s, STATE_CLOSED,
				   public_state(s->state), precise_now());
		/* Later packets are judged afresh. */
		if (forget_session(key, pending) == 0) {
			struct session_stats *ss = session_counters();
			if (ss)
				ss->revoked++;
		}
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
		__sync_fetch_and_or(&s->flags, SESSION_AUDIT);
		out->reason = REASON_REVOKED;
		return REVAL_REPORTED;
	}
	s->verdict = VERDICT_ALLOWED;
	__sync_fetch_and_and(&s->flags, ~SESSION_AUDIT);
	return REVAL_KEEP;
}

/* First packet of an allowed (or audited) session: *out is the policy's
 * decision for it. as_reply: the packet is a reply whose session was lost
 * (the policy allowed the other direction), so its destination is the
 * originator. reuse: a closed entry of the same tuple is in session_map.
 * The new entry stays in the per-CPU scratch for the caller: its "new"
 * event rides on the packet's verdict record (apply_verdict). */
static __always_inline int open_session(struct __sk_buff *skb,
					const struct packet *p, __u32 dir,
					struct session_key *key, int is_lo,
					int as_reply, int reuse,
					struct decision *out)
{
	__u8 tf = p->tcp_flags;
	__u32 side = as_reply ? 1 : 0;
	__u64 now = precise_now(); /* stamps the session and its "new" event */
	__u64 now_j = session_clock();
	struct scratch *sc = scratch();

	if (!sc)
		return NEED_VERDICT;
	/* The new entry is built in the per-CPU scratch (stack room). */
	struct session_value *nv = &sc->session;
	__builtin_memset(nv, 0, sizeof(*nv));
	nv->created_ns = now;
	nv->last_seen = now_j;
	nv->rule_id = out->rule_id;
	nv->generation = out->generation;
	nv->src_identity = out->src_identity;
	nv->dst_identity = out->dst_identity;
	nv->state = STATE_NEW;
	nv->verdict = out->verdict;
	nv->reason = out->reason;
	nv->seen[side] = now_j;
	nv->packets[side] = p->segs;
	nv->bytes[side] = p->len;
	nv->owner[side] = hook_id(skb, dir);
	/* The originator is the lo endpoint when the packet's source is (and
	 * is not, for a reply). */
	__u64 flags = (is_lo != as_reply) ? SESSION_ORIG_LO : 0;
	if (out->verdict == VERDICT_AUDIT)
		flags |= SESSION_AUDIT;
	if (as_reply)
		flags |= SESSION_REPLY_PICKUP;
	if (p->proto == IPPROTO_TCP) {
		if ((tf & (TCP_FLAG_SYN | TCP_FLAG_ACK)) ==
		    (TCP_FLAG_SYN | TCP_FLAG_ACK)) {
			nv->state = STATE_SYN_RECV; /* a SYN-ACK: the handshake's reply */
		} else if (!(tf & TCP_FLAG_SYN)) {
			/* Mid-stream pickup (e.g. after a restart without pinned
			 * state): allowed, so it continues as established. */
			flags |= SESSION_PICKUP;
			nv->state = STATE_ESTABLISHED;
			if (tf & TCP_FLAG_FIN) {
				nv->state = STATE_CLOSING;
				flags |= as_reply ? SESSION_FIN_REPLY : SESSION_FIN_ORIG;
			}
		}
	} else if (as_reply) {
		nv->state = STATE_ESTABLISHED; /* a reply: its request was */
	}
	nv->flags = flags;
	if (reuse && session_map.delete(key) == 0) {
		/* bpf_map_delete_elem: the closed session of this tuple. */
		struct session_stats *ss = session_counters();
		if (ss)
			ss->reused++;
	}
	/* bpf_map_update_elem(BPF_NOEXIST): a new entry — the LRU map evicts
	 * the least recently used one when full, silently, so new entries are
	 * counted. If another CPU created it first, that one stands. */
	if (pending_map.insert(key, nv) == 0) {
		struct session_stats *ss = session_counters();
		if (ss)
			ss->created++;
	}

	sc->opened = side + 1;
	return NEED_VERDICT;
}

#endif /* MSEG_SESSION_H */
