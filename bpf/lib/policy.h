/* SPDX-License-Identifier: GPL-2.0 */
/*
 * policy.h — identity and policy lookup for a session's first packet.
 *
 * Generation slots: every identity and policy key carries slot =
 * generation & 1. The daemon writes a new generation into the idle slot,
 * then stores its number in active_map[0]; a packet reads that word once
 * and does all its lookups in that slot: one generation, never a mix.
 *
 * Classes: each address maps to an identity that has a class in each
 * selector space (workload, labels, cidr). Keeping the spaces apart is what
 * keeps the compiled policy small: a label rule pairs label classes (one
 * per distinct label set), never the per-workload classes of workload rules.
 *
 * Cost per new flow, whatever the number of rules: one hash lookup per
 * endpoint identity (an LPM lookup only for addresses outside every host
 * entry), one array read for the port class, and per (src space, dst
 * space) combo that the two identities' masks allow, a group header hash
 * lookup plus an exception lookup when the header says the port class may
 * decide otherwise. At most 16 combos; typical policies touch two to four.
 * A question asked before under the same slot write (a new flow of a pair
 * already judged, to the same port) is answered by this CPU's cache of
 * recent decisions instead: one array read and a compare.
 */
#ifndef MSEG_POLICY_H
#define MSEG_POLICY_H

#include "../microseg.h"
#include "maps.h"
#include "proto.h"
#include "parse.h"
#include "decision.h"

/* Combo bits of the ANY row (src any) and ANY column (dst any). */
#define COMBOS_SRC_ANY 0xF000
#define COMBOS_DST_ANY 0x8888
#define COMBO_ANY_ANY 0x8000

static __always_inline __u32 active_generation(void)
{
	__u32 zero = ACTIVE_POLICY;
	__u32 *gen = active_map.lookup(&zero);

	return gen ? *gen : 0;
}

/* The staged candidate's generation, 0 when nothing is staged. */
static __always_inline __u32 staged_generation(void)
{
	__u32 one = ACTIVE_STAGED;
	/* bpf_map_lookup_elem: the one word `policy stage` switches. */
	__u32 *gen = active_map.lookup(&one);

	return gen ? *gen : 0;
}

static __always_inline struct ident_value *
lookup_identity(__u8 family, const __u8 *addr, __u32 slot, __u8 cfg_flags)
{
	struct ident_value *v;

	if (family == 4) {
		struct host4_key hk = { .slot = slot };
		__builtin_memcpy(hk.addr, addr, 4);
		/* bpf_map_lookup_elem: workload addresses are exact hits. */
		v = host4_map.lookup(&hk);
		if (v || !(cfg_flags & CFG_PREFIX4))
			return v;
		struct ident4_key k = { .prefixlen = 64, .slot = slot };
		__builtin_memcpy(k.addr, addr, 4);
		/* LPM lookup: the most specific CIDR of the policy. */
		return ident4_map.lookup(&k);
	}
	struct host6_key hk = { .slot = slot };
	__builtin_memcpy(hk.addr, addr, 16);
	v = host6_map.lookup(&hk);
	if (v || !(cfg_flags & CFG_PREFIX6))
		return v;
	struct ident6_key k = { .prefixlen = 160, .slot = slot };
	__builtin_memcpy(k.addr, addr, 16);
	return ident6_map.lookup(&k);
}

/* Whether audit mode covers traffic to addr under generation gen: the
 * mode of the workload that owns it, else the policy's. */
static __always_inline int audited(__u8 family, const __u8 *addr, __u32 gen)
{
	__u32 slot = POLICY_SLOT(gen);
	/* bpf_map_lookup_elem: the generation's config (its mode). */
	struct policy_config *cfg = config_map.lookup(&slot);

	if (!cfg || cfg->generation != gen || gen == 0)
		return 0;
	if (family == 4 || family == 6) {
		struct ident_value *di = lookup_identity(family, addr, slot, cfg->flags);
		if (di)
			return di->flags & IDENT_AUDIT;
	}
	return cfg->flags & CFG_AUDIT;
}

/* cls[space] without a variable stack offset (which the verifier only
 * accepts from newer kernels on). */
static __always_inline __u32 pick_class(const __u32 *cls, int space)
{
	if (space == 0)
		return cls[0];
	if (space == 1)
		return cls[1];
	if (space == 2)
		return cls[2];
	return CLASS_ANY;
}

/* The group's decision for this protocol and port class, if it has one. */
static __always_inline void consider_group(struct policy_key *k, __u32 pc,
					   struct policy_value *best)
{
	k->port_class = 0;
	struct policy_value *h = policy_map.lookup(k);
	if (!h)
		return;
	struct policy_value dec = *h;
	if (dec.flags & POLICY_EXCEPTIONS) {
		k->port_class = pc + 1;
		struct policy_value *e = policy_map.lookup(k);
		if (e)
			dec = *e;
	}
	/* Deny beats allow; among equals the rule written first decides. */
	if (dec.action > best->action ||
	    (dec.action == best->action && dec.action != ACTION_NONE &&
	     dec.priority < best->priority))
		*best = dec;
}

/* The identity and policy lookups of match_policy(), under the slot's
 * config cfg; d->generation is set. */
static __always_inline void lookup_policy(const struct policy_config *cfg, __u32 slot,
					  __u8 family, __u8 proto,
					  const __u8 *saddr, const __u8 *daddr,
					  __u16 dport, struct decision *d)
{
	d->rule_id = 0;
	d->src_identity = IDENTITY_WORLD;
	d->dst_identity = IDENTITY_WORLD;
	__u8 cflags = cfg->flags;
	struct ident_value *si = NULL, *di = NULL;
	/* Both endpoints through one copy of the lookup (stack and program
	 * size: every inlined copy has its own keys). */
#pragma clang loop unroll(disable)
	for (int i = 0; i < 2; i++) {
		struct ident_value *v = lookup_identity(family, i ? daddr : saddr,
							slot, cflags);
		if (i)
			di = v;
		else
			si = v;
	}
	__u32 scls[4] = {}, dcls[4] = {};
	__u32 src_bits = COMBOS_SRC_ANY, dst_bits = COMBOS_DST_ANY;
	int audit = cflags & CFG_AUDIT;

	if (si) {
		d->src_identity = si->identity;
		scls[0] = si->cls[0];
		scls[1] = si->cls[1];
		scls[2] = si->cls[2];
		src_bits |= si->src_combos;
	}
	if (di) {
		d->dst_identity = di->identity;
		dcls[0] = di->cls[0];
		dcls[1] = di->cls[1];
		dcls[2] = di->cls[2];
		dst_bits |= di->dst_combos;
		audit = di->flags & IDENT_AUDIT;
	}
	__u32 combos = src_bits & dst_bits;
	if (!(cflags & CFG_ANY_ANY))
		combos &= ~COMBO_ANY_ANY;

	/* Port class: direct index into an array, for tcp and udp. Other
	 * protocols than the four rules can name share proto 0 headers. */
	__u32 pc = 0;
	__u8 kproto = proto;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		__u32 idx = PORT_CLASS_INDEX(slot, proto == IPPROTO_UDP, dport);
		__u32 *c = port_class_map.lookup(&idx);
		if (c)
			pc = *c;
	} else if (proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6) {
		kproto = 0;
	}

	struct policy_key k = { .slot = slot, .proto = kproto };
	struct policy_value best = { .priority = 0xFFFF };
	/* One pass per combo the masks allow: a loop (not unrolled, to keep
	 * the program small) over the set bits, at most 16. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < 16; i++) {
		if (!(combos & (1 << i)))
			continue;
		k.src_class = pick_class(scls, i >> 2);
		k.dst_class = pick_class(dcls, i & 3);
		consider_group(&k, pc, &best);
	}

	__u8 action = best.action;
	if (action == ACTION_NONE) {
		action = cfg->default_action;
		d->reason = REASON_DEFAULT;
	} else {
		d->reason = REASON_RULE;
		d->rule_id = best.rule_id;
	}
	if (action == ACTION_ALLOW)
		d->verdict = VERDICT_ALLOWED;
	else
		d->verdict = audit ? VERDICT_AUDIT : VERDICT_DENIED;
}

#define CACHE_MIX 0x9E3779B97F4A7C15ULL
/* This build's tag (the loader passes the program's identity, a hash of
 * its text and flags): a decision is served only to the build that cached
 * it, so an upgrade that keeps the pinned maps never inherits the old
 * build's answers. */
#ifndef MSEG_BUILD_TAG
#define MSEG_BUILD_TAG 0ULL
#endif

/* policy_cache_map's slot for these inputs of match_policy(). */
static __always_inline __u32 policy_cache_index(__u8 proto, const __u8 *saddr,
						const __u8 *daddr, __u16 dport,
						__u32 gen)
{
	__u64 h = *(const __u64 *)saddr ^ (*(const __u64 *)(saddr + 8) >> 7);

	h = (h * CACHE_MIX) ^ *(const __u64 *)daddr ^ (*(const __u64 *)(daddr + 8) >> 5);
	h = (h * CACHE_MIX) ^ (((__u64)dport << 40) | ((__u64)proto << 32) | gen);
	return (__u32)((h * CACHE_MIX) >> (64 - POLICY_CACHE_BITS));
}

/* Whether entry e was made for exactly these inputs under this write
 * (stamp) of the generation's slot. */
static __always_inline int policy_cache_hit(const struct policy_cache_entry *e,
					    __u64 stamp, __u32 gen, __u8 family,
					    __u8 proto, const __u8 *saddr,
					    const __u8 *daddr, __u16 dport)
{
	return e->stamp == stamp && e->generation == gen && e->dport == dport &&
	       e->proto == proto && e->family == family &&
	       *(const __u64 *)e->saddr == *(const __u64 *)saddr &&
	       *(const __u64 *)(e->saddr + 8) == *(const __u64 *)(saddr + 8) &&
	       *(const __u64 *)e->daddr == *(const __u64 *)daddr &&
	       *(const __u64 *)(e->daddr + 8) == *(const __u64 *)(daddr + 8);
}

/* Judge the flow saddr -> daddr:dport under generation gen: from this
 * CPU's cache of recent decisions when it holds this very question (a new
 * flow of a pair already judged: the common case), else by the lookups,
 * whose answer the cache then keeps. */
static __always_inline void match_policy(__u8 family, __u8 proto,
					 const __u8 *saddr, const __u8 *daddr,
					 __u16 dport, __u32 gen,
					 struct decision *d)
{
	__u32 slot = POLICY_SLOT(gen);
	struct policy_config *cfg = config_map.lookup(&slot);

	d->generation = gen;
	if (!cfg || cfg->generation != gen || gen == 0) {
		/* No policy loaded: fail closed. */
		d->rule_id = 0;
		d->src_identity = IDENTITY_WORLD;
		d->dst_identity = IDENTITY_WORLD;
		d->verdict = VERDICT_DENIED;
		d->reason = REASON_DEFAULT;
		return;
	}
	/* Never 0, which marks an entry empty or being written. */
	__u64 stamp = (cfg->stamp ^ MSEG_BUILD_TAG) | 1;
	__u32 ci = policy_cache_index(proto, saddr, daddr, dport, gen);
	/* bpf_map_lookup_elem: this CPU's entry (no other CPU writes it). */
	struct policy_cache_entry *e = cfg->stamp ? policy_cache_map.lookup(&ci) : NULL;

	if (e && policy_cache_hit(e, stamp, gen, family, proto, saddr, daddr, dport)) {
		d->rule_id = e->rule_id;
		d->src_identity = e->src_identity;
		d->dst_identity = e->dst_identity;
		d->verdict = e->verdict;
		d->reason = e->reason;
		return;
	}
	lookup_policy(cfg, slot, family, proto, saddr, daddr, dport, d);
	if (!e)
		return;
	/* Valid only once complete: a run that read it half-written (none can
	 * on one CPU today) would find no match. */
	e->stamp = 0;
	asm volatile("" ::: "memory");
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->generation = gen;
	e->dport = dport;
	e->proto = proto;
	e->family = family;
	e->rule_id = d->rule_id;
	e->src_identity = d->src_identity;
	e->dst_identity = d->dst_identity;
	e->verdict = d->verdict;
	e->reason = d->reason;
	asm volatile("" ::: "memory");
	e->stamp = stamp;
}

/* The staged judgment beside the active one, for the event and the
 * staged counters (apply_verdict counts it with the packet's outcome, so
 * that counters and events agree). */
static __always_inline void note_staged(struct decision *d, const struct decision *sd,
					__u32 staged)
{
	d->staged_verdict = sd->verdict + 1;
	d->staged_rule = sd->rule_id;
	d->staged_generation = staged;
}

/* The packet's flow judged under generation gen: in its own direction, or
 * (reverse) as the flow it would be a reply to. One call site of
 * match_policy: the program carries one copy of it. */
static __always_inline void judge_flow(const struct packet *p, int reverse,
				       __u32 gen, struct decision *d)
{
	const __u8 *saddr = reverse ? p->daddr : p->saddr;
	const __u8 *daddr = reverse ? p->saddr : p->daddr;
	__u16 dport = reverse ? p->sport : p->dport;

	match_policy(p->family, p->proto, saddr, daddr, dport, gen, d);
}

/* A decision made the other way round (judge_flow with reverse) names
 * the session's original source and destination; the packet's verdict
 * event names the packet's own, so its identities are swapped back once
 * the session has taken them. */
static __always_inline void toward_packet(struct decision *d)
{
	__u32 src = d->src_identity;

	d->src_identity = d->dst_identity;
	d->dst_identity = src;
}

#endif /* MSEG_POLICY_H */
