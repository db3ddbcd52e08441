/* SPDX-License-Identifier: GPL-2.0 */
/*
 * primitives.bpf.c — what the kernel's own map operations cost on this
 * machine, apart from anything of microseg's (bench/datapath.py,
 * primitives()): the two that any stateful firewall pays for a new flow
 * when it keeps its sessions in a hash table — a lookup that misses in a
 * table sized for a million sessions, and an insert into an LRU hash —
 * with microseg's key and value sizes. Every repetition of
 * BPF_PROG_TEST_RUN takes a new key from a per-CPU counter.
 */
#include <uapi/linux/bpf.h>
#include "../../bpf/microseg.h"

#ifndef BIG_CAPACITY
#define BIG_CAPACITY 1048576
#endif
#ifndef ONE_WAY_CAPACITY
#define ONE_WAY_CAPACITY 262144
#endif

BPF_PERCPU_ARRAY(counter_map, __u32, 1);
BPF_TABLE("lru_hash", struct session_key, struct session_value, big_map, BIG_CAPACITY);
BPF_TABLE("lru_hash", struct session_key, struct session_value, one_way_map,
	  ONE_WAY_CAPACITY);
BPF_PERCPU_ARRAY(value_map, struct session_value, 1);

/* A key no table holds yet: the counter in the source address and port. */
static __always_inline int next_key(struct session_key *k)
{
	__u32 zero = 0;
	__u32 *n = counter_map.lookup(&zero);

	if (!n)
		return -1;
	__u32 i = (*n)++;
	__builtin_memset(k, 0, sizeof(*k));
	k->family = 4;
	k->proto = 6;
	*(__u32 *)k->addr_lo = 0x0100000a ^ (i << 8);
	*(__u32 *)k->addr_hi = 0x0200000a;
	k->port_lo = (__u16)i;
	k->port_hi = 80;
	return 0;
}

int prim_floor(struct __sk_buff *skb)
{
	struct session_key k;

	return next_key(&k) ? 2 : k.port_hi == 7;
}

int prim_miss(struct __sk_buff *skb)
{
	struct session_key k;

	if (next_key(&k))
		return 2;
	return big_map.lookup(&k) != NULL;
}

int prim_insert(struct __sk_buff *skb)
{
	struct session_key k;
	__u32 zero = 0;
	struct session_value *v = value_map.lookup(&zero);

	if (!v || next_key(&k))
		return 2;
	return one_way_map.update(&k, v) ? 1 : 0;
}
