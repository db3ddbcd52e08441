/* SPDX-License-Identifier: GPL-2.0 */
/*
 * microseg.bpf.c — the TC datapath, attached at clsact ingress and egress.
 *
 *   parse -> (later fragment: follow the first) -> session lookup ->
 *   (new flow, or policy changed) policy lookup -> verdict -> session
 *   update -> stats -> event -> TC_ACT_OK / TC_ACT_SHOT
 *
 * Compiled by BCC at load time (microseg/datapath.py); the include path
 * is this directory. The walk-through is docs/how-it-works.md.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "microseg.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/events.h"
#include "lib/verdict.h"
#include "lib/policy.h"
#include "lib/session.h"
#include "lib/frag.h"

/* ICMP errors and informational ICMP create no session: an error quoting
 * a tracked session passes as related; anything else is judged alone. */
static __always_inline int judge_stateless(struct __sk_buff *skb,
					   const struct packet *p, __u32 dir,
					   __u32 gen, __u64 now,
					   struct decision *d)
{
	if (p->icmp == ICMP_KIND_ERROR) {
		struct session_key k = {};
		make_session_key(p->family, p->inner.proto, p->inner.saddr,
				 p->inner.daddr, p->inner.sport, p->inner.dport,
				 &k);
		if (session_map.lookup(&k)) {
			d->verdict = VERDICT_ALLOWED;
			d->reason = REASON_RELATED;
			return pass_packet(dir, VERDICT_ALLOWED, REASON_RELATED,
					   p->len);
		}
	}
	match_policy(p->family, p->proto, p->saddr, p->daddr, p->dport, gen, d);
	return apply_verdict(skb, p, dir, d, now);
}

static __always_inline int handle_packet(struct __sk_buff *skb, __u32 dir)
{
	struct packet p = {};
	int rc = parse_packet(skb, &p);

	if (rc == PARSE_NON_IP)
		return pass_packet(dir, VERDICT_ALLOWED, REASON_NON_IP, skb->len);
	if (rc == PARSE_NEIGHBOR)
		return pass_packet(dir, VERDICT_ALLOWED, REASON_NEIGHBOR, p.len);

	/* bpf_ktime_get_ns: monotonic clock for events and session ages. */
	__u64 now = bpf_ktime_get_ns();

	if (rc != PARSE_OK)
		return drop_packet(skb, &p, dir, REASON_INVALID, now);
	if (p.frag == FRAG_LATER)
		return follow_fragment(skb, &p, dir, now);

	__u32 gen = active_generation();
	struct decision d = {};
	int act;

	if (p.icmp == ICMP_KIND_ERROR || p.icmp == ICMP_KIND_OTHER)
		act = judge_stateless(skb, &p, dir, gen, now, &d);
	else
		act = track_session(skb, &p, dir, gen, now, &d);
	if (p.frag == FRAG_FIRST)
		remember_first_fragment(&p, &d, now);
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
