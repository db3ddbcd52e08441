/* SPDX-License-Identifier: GPL-2.0 */
/*
 * policy.h — identity and policy lookup for a session's first packet.
 *
 * Generation slots: every policy map key carries slot = generation & 1.
 * The daemon writes a new generation into the idle slot, then stores its
 * number in active_map[0]; a packet reads that word once and does all its
 * lookups in that slot, so it is judged by one generation, never a mix.
 *
 * Cost: two LPM lookups (source and destination identity) and at most four
 * policy LPM lookups — (src, dst), (src, any), (any, dst), (any, any)
 * groups — whatever the number of rules. Flags on the identities skip the
 * groups that cannot exist.
 */
#ifndef MSEG_POLICY_H
#define MSEG_POLICY_H

static __always_inline __u32 active_generation(void)
{
	__u32 zero = 0;
	__u32 *gen = active_map.lookup(&zero);

	return gen ? *gen : 0;
}

static __always_inline struct ident_value *
lookup_identity(__u8 family, const __u8 *addr, __u32 slot)
{
	if (family == 4) {
		struct ident4_key k = { .prefixlen = 64, .slot = slot };
		__builtin_memcpy(k.addr, addr, 4);
		/* LPM lookup: the most specific prefix of the policy. */
		return ident4_map.lookup(&k);
	}
	struct ident6_key k = { .prefixlen = 160, .slot = slot };
	__builtin_memcpy(k.addr, addr, 16);
	return ident6_map.lookup(&k);
}

/* Keep the better of the current best and v: deny beats allow; among
 * equal actions the rule written first (lowest priority) decides. */
static __always_inline void consider(struct policy_value *best,
				     const struct policy_value *v)
{
	if (!v)
		return;
	if (v->action > best->action ||
	    (v->action == best->action && v->priority < best->priority))
		*best = *v;
}

/* Judge the flow saddr -> daddr:dport under generation gen. */
static __always_inline void match_policy(__u8 family, __u8 proto,
					 const __u8 *saddr, const __u8 *daddr,
					 __u16 dport, __u32 gen,
					 struct decision *d)
{
	__u32 slot = gen & 1;
	struct policy_config *cfg = config_map.lookup(&slot);

	d->generation = gen;
	d->rule_id = 0;
	d->src_identity = IDENTITY_WORLD;
	d->dst_identity = IDENTITY_WORLD;
	if (!cfg || cfg->generation != gen || gen == 0) {
		/* No policy loaded: fail closed. */
		d->verdict = VERDICT_DENIED;
		d->reason = REASON_DEFAULT;
		return;
	}

	struct ident_value *si = lookup_identity(family, saddr, slot);
	struct ident_value *di = lookup_identity(family, daddr, slot);
	__u32 sclass = CLASS_ANY, dclass = CLASS_ANY, sflags = 0, dflags = 0;
	int audit = cfg->flags & CFG_AUDIT;

	if (si) {
		d->src_identity = si->identity;
		sclass = si->src_class;
		sflags = si->flags;
	}
	if (di) {
		d->dst_identity = di->identity;
		dclass = di->dst_class;
		dflags = di->flags;
		audit = dflags & IDENT_AUDIT;
	}

	struct policy_key k = {
		.prefixlen = POLICY_PREFIX_FULL,
		.slot = slot,
		.proto = proto,
		.port = { dport >> 8, dport & 0xFF },
	};
	struct policy_value best = { .priority = 0xFFFF };

	if (sclass && dclass && (sflags & IDENT_SRC_PAIR) &&
	    (dflags & IDENT_DST_PAIR)) {
		k.src_class = sclass;
		k.dst_class = dclass;
		consider(&best, policy_map.lookup(&k));
	}
	if (sclass && (sflags & IDENT_SRC_ANY)) {
		k.src_class = sclass;
		k.dst_class = CLASS_ANY;
		consider(&best, policy_map.lookup(&k));
	}
	if (dclass && (dflags & IDENT_DST_ANY)) {
		k.src_class = CLASS_ANY;
		k.dst_class = dclass;
		consider(&best, policy_map.lookup(&k));
	}
	if (cfg->flags & CFG_ANY_ANY) {
		k.src_class = CLASS_ANY;
		k.dst_class = CLASS_ANY;
		consider(&best, policy_map.lookup(&k));
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

#endif /* MSEG_POLICY_H */
