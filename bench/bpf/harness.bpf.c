/* SPDX-License-Identifier: GPL-2.0 */
/*
 * harness.bpf.c — the production datapath plus a benchmark harness, compiled
 * only by bench/ (bench/datapath.py) and never attached.
 *
 * BPF_PROG_TEST_RUN repeats one packet; to measure new flows, every
 * repetition must be a new flow: mseg_bench_newflow rewrites the TCP source
 * port from a per-CPU counter, then runs the real ingress path.
 * mseg_bench_rewrite does only the rewrite: the floor for that comparison.
 */
#include "../../bpf/microseg.bpf.c"

/* Where and from what to rewrite the TCP source port (bench/datapath.py
 * mirrors it as BENCH_CTL). */
struct bench_ctl {
	__u32 sport_off;
	__u32 base;
	__u32 next;
	__u32 pad;
};

BPF_TABLE("percpu_array", u32, struct bench_ctl, bench_ctl_map, 1);

static __always_inline int bench_rewrite(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct bench_ctl *c = bench_ctl_map.lookup(&zero);

	if (!c)
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
