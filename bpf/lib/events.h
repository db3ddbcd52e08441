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

/* Every field of a record is written before it is submitted: reserved
 * ring memory is not zeroed (no stale bytes may reach userspace). */
_Static_assert(sizeof(struct event) == 128,
	       "fill_verdict_record(), emit_session_event() and emit_denial() write every field");

/* A record's space in a ring (a constant at every call site); NULL when
 * the ring is full. Its contents are stale: the caller fills all of it. */
static __always_inline struct event *reserve_record(__u32 ring)
{
	/* bpf_ringbuf_reserve: space in the ring, no copy. */
	if (ring == RING_DENIALS)
		return denials.ringbuf_reserve(sizeof(struct event));
	return events.ringbuf_reserve(sizeof(struct event));
}

/* One event of a type counted as submitted or lost (ring full). */
static __always_inline void count_record(__u32 ring, __u32 type, int submitted)
{
	__u32 slot = ring * EVENT_TYPE_MAX + type;
	/* bpf_map_lookup_elem: this CPU's submitted/lost counters. */
	struct event_stats *st = event_stats_map.lookup(&slot);

	if (!st)
		return;
	if (submitted)
		st->submitted++;
	else
		st->lost++;
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
