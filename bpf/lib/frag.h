/* SPDX-License-Identifier: GPL-2.0 */
/*
 * frag.h — fragments, IPv4 and IPv6 alike. Only a datagram's first
 * fragment carries the L4 header the policy needs; its outcome is
 * remembered under the datagram's (addresses, id, protocol) and later
 * fragments follow it. A later fragment whose first was never seen drops
 * with reason `fragment` (audit mode: passes, and says so).
 *
 * The entry counts the payload bytes that passed and learns the datagram's
 * length from its last fragment (the one without "more fragments"): once
 * every byte was seen, in whatever order the fragments came, it is freed.
 * Entries of datagrams that never complete age out of the LRU map.
 */
#ifndef MSEG_FRAG_H
#define MSEG_FRAG_H

#include "../microseg.h"
#include "maps.h"
#include "parse.h"
#include "clock.h"
#include "verdict.h"

static __always_inline void make_frag_key(const struct packet *p,
					  struct frag_key *k)
{
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->id = p->frag_id;
	k->proto = p->proto;
	k->family = p->family;
}

static __always_inline void remember_first_fragment(const struct packet *p,
						    const struct decision *d)
{
	struct frag_key k = {};
	struct frag_value v = {
		.seen = session_clock(),
		.rule_id = d->rule_id,
		.generation = d->generation,
		.src_identity = d->src_identity,
		.dst_identity = d->dst_identity,
		.received = p->frag_len,
		.verdict = d->verdict,
		.reason = d->reason,
		.audit = d->audit,
	};

	make_frag_key(p, &k);
	/* bpf_map_update_elem into an LRU map: old datagrams age out. */
	frag_map.update(&k, &v);
}

static __always_inline int follow_fragment(const struct packet *p, __u32 dir,
					   struct decision *d)
{
	struct frag_key k = {};

	make_frag_key(p, &k);
	/* bpf_map_lookup_elem: the first fragment's outcome. */
	struct frag_value *v = frag_map.lookup(&k);
	if (!v) {
		drop_packet(d, REASON_FRAGMENT);
		d->audit = AUDIT_BY_DST;
		return NEED_VERDICT;
	}
	__sync_fetch_and_add(&v->received, p->frag_len);
	__u32 got = v->received;
	if (!p->frag_more)
		v->total = p->frag_offset + p->frag_len;
	v->seen = session_clock();
	d->rule_id = v->rule_id;
	d->generation = v->generation;
	d->src_identity = v->src_identity;
	d->dst_identity = v->dst_identity;
	d->verdict = v->verdict;
	d->reason = v->reason;
	d->audit = v->audit;
	if (v->total && got >= v->total)
		frag_map.delete(&k); /* bpf_map_delete_elem: the datagram is whole */
	if (d->verdict == VERDICT_ALLOWED || d->verdict == VERDICT_AUDIT)
		return pass_packet(dir, d->verdict, REASON_FRAGMENT, p);
	return NEED_VERDICT;
}

#endif /* MSEG_FRAG_H */
