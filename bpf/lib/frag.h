/* SPDX-License-Identifier: GPL-2.0 */
/*
 * frag.h — fragments. Only a datagram's first fragment carries the L4
 * header the policy needs; its outcome is remembered under the datagram's
 * (addresses, id, protocol) and later fragments follow it. A later
 * fragment whose first was never seen drops with reason `fragment`.
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
		.verdict = d->verdict,
		.reason = d->reason,
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
	struct frag_value *v = frag_map.lookup(&k);
	if (!v)
		return drop_packet(d, REASON_FRAGMENT);
	if (v->verdict == VERDICT_ALLOWED || v->verdict == VERDICT_AUDIT)
		return pass_packet(dir, v->verdict, REASON_FRAGMENT, p->len);
	d->rule_id = v->rule_id;
	d->generation = v->generation;
	d->verdict = v->verdict;
	d->reason = v->reason;
	return NEED_VERDICT;
}

#endif /* MSEG_FRAG_H */
