/* SPDX-License-Identifier: GPL-2.0 */
/*
 * harness.bpf.c — the production datapath plus a benchmark harness, compiled
 * only by bench/ (bench/datapath.py) and never attached.
 *
 * BPF_PROG_TEST_RUN repeats one packet; to measure new flows, every
 * repetition must be a new flow: mseg_bench_newflow rewrites the TCP source
 * port from a per-CPU counter, then runs the real ingress path.
 * mseg_bench_rewrite does only the rewrite: the floor for that comparison.
 * With `forget` set, both also forget the pair's decision in this CPU's
 * policy cache first (policy_cache_map): every repetition is then judged by
 * the lookups, as the first flow of a pair is.
 */
#include "../../bpf/microseg.bpf.c"

/* Where and from what to rewrite the TCP source port (bench/datapath.py
 * mirrors it as BENCH_CTL). */
struct bench_ctl {
	__u32 sport_off;
	__u32 base;
	__u32 next;
	__u32 forget;
};

BPF_TABLE("percpu_array", u32, struct bench_ctl, bench_ctl_map, 1);

/* The packet's entry in this CPU's policy decision cache, emptied. The
 * addresses are where the source port's offset says (IPv4 at 34, IPv6 at
 * 54 in an Ethernet frame); bpf_skb_load_bytes copies them. */
static __always_inline int bench_forget_decision(struct __sk_buff *skb,
						 const struct bench_ctl *c)
{
	__u64 addr[4] = {};
	__be16 dport;
	__u32 off = c->sport_off;
	if (bpf_skb_load_bytes(skb, off + 2, &dport, sizeof(dport)))
		return -1;
	if (off == 34) {
		if (bpf_skb_load_bytes(skb, 26, &addr[0], 4) ||
		    bpf_skb_load_bytes(skb, 30, &addr[2], 4))
			return -1;
	} else if (bpf_skb_load_bytes(skb, 22, addr, 32)) {
		return -1;
	}
	__u32 idx = policy_cache_index(IPPROTO_TCP, (__u8 *)&addr[0], (__u8 *)&addr[2],
				       bswap16(dport), active_generation());
	struct policy_cache_entry *e = policy_cache_map.lookup(&idx);
	if (e)
		e->stamp = 0;
	return 0;
}

static __always_inline int bench_rewrite(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct bench_ctl *c = bench_ctl_map.lookup(&zero);

	if (!c || (c->forget && bench_forget_decision(skb, c)))
		return -1;
	__be16 port = bswap16((__u16)(c->base + c->next++));
	/* bpf_skb_store_bytes: write the new source port into the packet. */
	return bpf_skb_store_bytes(skb, c->sport_off, &port, sizeof(port), 0);
}

int mseg_bench_newflow(struct __sk_buff *skb)
{
	if (bench_rewrite(skb))
		return TC_ACT_SHOT;
	return handle_packet(skb, DIR_INGRESS, 0);
}

int mseg_bench_rewrite(struct __sk_buff *skb)
{
	return bench_rewrite(skb) ? TC_ACT_SHOT : TC_ACT_OK;
}
