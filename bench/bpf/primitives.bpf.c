/* SPDX-License-Identifier: GPL-2.0 */
/*
 * primitives.bpf.c — what the kernel's own map operations cost on this
 * machine, apart from anything of microseg's (bench/datapath.py,
 * primitives()): the two that any stateful firewall pays for a new flow
 * when it keeps its sessions in a hash table — a lookup that misses in a
 * table sized for a million sessions, and an insert into an LRU hash —
 * with microseg's key and value sizes. Every repetition of
 * BPF_PROG_TEST_RUN takes a new key from a per-CPU counter.
 *
 * And the one an established packet pays: a lookup that finds its session
 * (the same one every repetition, so in cache), with microseg's 40-byte key
 * and with the 16-byte key a table of IPv4 sessions alone could use.
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

/* An IPv4 session's key with nothing but IPv4's fields (bench/datapath.py
 * mirrors it: SESSION4_KEY). */
struct session4_key {
	__u8 addr_lo[4];
	__u8 addr_hi[4];
	__u16 port_lo;
	__u16 port_hi;
	__u8 proto;
	__u8 pad[3];
};
BPF_TABLE("lru_hash", struct session4_key, struct session_value, big4_map, BIG_CAPACITY);
/* The key the hit rows look up (bench/datapath.py writes one of big_map's
 * and its twin into big4_map). */
BPF_ARRAY(hit_key_map, struct session_key, 1);
BPF_ARRAY(hit4_key_map, struct session4_key, 1);

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

/* The hit rows' key, copied to the stack as a packet's would be built. */
static __always_inline int hit_key(struct session_key *k)
{
	__u32 zero = 0;
	struct session_key *src = hit_key_map.lookup(&zero);

	if (!src)
		return -1;
	__builtin_memcpy(k, src, sizeof(*k));
	return 0;
}

/* The hit rows' floor: the key copied, as they do. */
int prim_hit_floor(struct __sk_buff *skb)
{
	struct session_key k;

	return hit_key(&k) ? 2 : k.port_hi == 7;
}

int prim_hit(struct __sk_buff *skb)
{
	struct session_key k;

	if (hit_key(&k))
		return 2;
	return big_map.lookup(&k) ? 0 : 1;
}

int prim_hit4(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct session4_key *src = hit4_key_map.lookup(&zero);
	struct session4_key k;

	if (!src)
		return 2;
	__builtin_memcpy(&k, src, sizeof(k));
	return big4_map.lookup(&k) ? 0 : 1;
}
