/* SPDX-License-Identifier: GPL-2.0 */
/*
 * clock.h — the two clocks. bpf_ktime_get_ns() (CLOCK_MONOTONIC) costs
 * ~30 ns on a VM's clock source: it stamps events and session creation
 * only. The per-packet last-seen time is bpf_jiffies64(), which the
 * verifier inlines into a load (a few ns): a tick's precision is plenty for
 * idle timeouts. Userspace converts jiffies with a sample of both clocks
 * taken at one instant (the mseg_clock entry, clock_map).
 */
#ifndef MSEG_CLOCK_H
#define MSEG_CLOCK_H

static __always_inline __u64 precise_now(void)
{
	return bpf_ktime_get_ns();
}

static __always_inline __u64 session_clock(void)
{
	return bpf_jiffies64();
}

#endif /* MSEG_CLOCK_H */
