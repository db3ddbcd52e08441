/* SPDX-License-Identifier: GPL-2.0 */
/*
 * events.h — fixed-size records into the ring buffer.
 *
 * bpf_ringbuf_reserve() fails silently when the ring is full, so every
 * reservation is counted per event type as submitted or lost: the daemon
 * turns the lost count into exact `lost` events.
 */
#ifndef MSEG_EVENTS_H
#define MSEG_EVENTS_H

#include <uapi/linux/bpf.h>
#include "../microseg.h"
#include "maps.h"
#include "parse.h"

/* ring: RING_EVENTS or RING_DENIALS (a constant at every call site). */
static __always_inline struct event *reserve_event(__u32 type, __u32 ring)
{
	struct event *e;
	__u32 slot = ring * EVENT_TYPE_MAX + type;

	/* bpf_ringbuf_reserve: space in the ring, no copy; NULL when full. */
	if (ring == RING_DENIALS)
		e = denials.ringbuf_reserve(sizeof(struct event));
	else
		e = events.ringbuf_reserve(sizeof(struct event));
	/* bpf_map_lookup_elem: this CPU's submitted/lost counters. */
	struct event_stats *st = event_stats_map.lookup(&slot);

	if (!e) {
		if (st)
			st->lost++;
		return NULL;
	}
	if (st)
		st->submitted++;
	/* Reserved ring memory is not zeroed: clear it so no stale bytes
	 * (or kernel memory the verifier would reject) reach userspace. */
	__builtin_memset(e, 0, sizeof(*e));
	e->type = type;
	return e;
}

static __always_inline void fill_endpoints(struct event *e, const __u8 *saddr,
					   const __u8 *daddr, __u16 sport,
					   __u16 dport)
{
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->sport = sport;
	e->dport = dport;
}

/* Fields every record of a packet carries; the caller adds its own. */
static __always_inline void fill_packet_fields(struct event *e,
					       struct __sk_buff *skb,
					       const struct packet *p, __u32 dir,
					       __u64 now)
{
	e->ts_ns = now;
	e->ifindex = skb->ifindex;
	e->pkt_len = p->len;
	e->packets[0] = p->segs; /* verdict and drop events: the count */
	e->bytes[0] = p->len;
	e->direction = dir;
	e->family = p->family;
	e->proto = p->proto;
	e->tcp_flags = p->tcp_flags;
}

static __always_inline void submit_event(struct event *e, __u32 ring)
{
	/* bpf_ringbuf_submit: publish the record; 0 = wake the reader only
	 * when it is waiting (adaptive notification). */
	if (ring == RING_DENIALS)
		denials.ringbuf_submit(e, 0);
	else
		events.ringbuf_submit(e, 0);
}

#endif /* MSEG_EVENTS_H */
