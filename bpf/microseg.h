/* SPDX-License-Identifier: GPL-2.0 */
/*
 * microseg.h — every struct and enum shared between the datapath and Python.
 *
 * Python mirrors this file in microseg/abi.py; tests/unit/test_abi.py parses
 * this header and fails when the two disagree. Change both together and bump
 * MSEG_ABI_VERSION when a map key/value or the event record changes: the
 * loader refuses to reuse pinned maps written under another ABI version.
 *
 * Only fixed-width types: the same header compiles in BCC and is read by
 * the Python side's struct formats.
 */
#ifndef MICROSEG_H
#define MICROSEG_H

#define MSEG_ABI_VERSION 1

/* Hook the program runs at. Also part of the per-direction owner id. */
enum mseg_direction {
	DIR_INGRESS = 0,
	DIR_EGRESS = 1,
	DIR_MAX = 2,
};

/* Outcome of one packet. DROPPED is a drop that is not a policy decision. */
enum mseg_verdict {
	VERDICT_ALLOWED = 0,
	VERDICT_DENIED = 1,
	VERDICT_AUDIT = 2,
	VERDICT_DROPPED = 3,
	VERDICT_MAX = 4,
};

/* Why a packet got its verdict. stats_map is indexed by direction ×
 * verdict × reason, so every (verdict, reason) pair has its own counter. */
enum mseg_reason {
	REASON_RULE = 0,     /* a policy rule decided (new session / denied pkt) */
	REASON_DEFAULT = 1,  /* no rule matched: the policy default decided */
	REASON_REVOKED = 2,  /* session denied by a newer policy generation */
	REASON_SESSION = 3,  /* packet of an existing session */
	REASON_RELATED = 4,  /* ICMP error quoting an existing session */
	REASON_FRAGMENT = 5, /* non-first fragment (follows its first, or lost) */
	REASON_NON_IP = 6,   /* not IPv4/IPv6: always passes */
	REASON_NEIGHBOR = 7, /* IPv6 neighbour discovery / MLD: always passes */
	REASON_INVALID = 8,  /* malformed or truncated header */
	REASON_STATE = 9,    /* TCP packet invalid for its session's state */
	REASON_MAX = 10,
};

/* Session states. SYN_RECV is internal; users see it as "new".
 * EXPIRED is only ever set by the userspace sweeper. */
enum mseg_state {
	STATE_NONE = 0,
	STATE_NEW = 1,
	STATE_SYN_RECV = 2,
	STATE_ESTABLISHED = 3,
	STATE_CLOSING = 4,
	STATE_CLOSED = 5,
	STATE_EXPIRED = 6,
};

/* Ring-buffer record types. POLICY and LOST events are made in userspace. */
enum mseg_event_type {
	EVENT_VERDICT = 1,
	EVENT_DROP = 2,
	EVENT_SESSION = 3,
	EVENT_TYPE_MAX = 4,
};

/* Policy actions in policy_value.action and policy_config.default_action. */
enum mseg_action {
	ACTION_NONE = 0,
	ACTION_ALLOW = 1,
	ACTION_DENY = 2,
};

/* identity_value.flags */
enum mseg_ident_flags {
	IDENT_AUDIT = 1,      /* traffic TO this identity: deny becomes audit */
	IDENT_SRC_PAIR = 2,   /* src_class appears in some (src, dst) group */
	IDENT_DST_PAIR = 4,   /* dst_class appears in some (src, dst) group */
	IDENT_SRC_ANY = 8,    /* a (src_class, any) group exists */
	IDENT_DST_ANY = 16,   /* an (any, dst_class) group exists */
};

/* policy_config.flags */
enum mseg_config_flags {
	CFG_AUDIT = 1,     /* global audit mode (applies to unknown dsts) */
	CFG_ANY_ANY = 2,   /* an (any, any) group exists */
};

/* session_value.flags */
enum mseg_session_flags {
	SESSION_ORIG_LO = 1,    /* original direction's source is key.addr_lo */
	SESSION_FIN_ORIG = 2,   /* FIN seen from the originator */
	SESSION_FIN_REPLY = 4,  /* FIN seen from the responder */
	SESSION_AUDIT = 8,      /* allowed only because of audit mode */
	SESSION_PICKUP = 16,    /* created mid-stream (no SYN seen) */
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10
#define TCP_FLAG_URG 0x20
#define TCP_FLAG_ECE 0x40
#define TCP_FLAG_CWR 0x80

/* Rule ids are stable per rule name across generations (so hit counters
 * survive reloads); 0 means "no rule" (default verdict). */
#define MAX_RULES 32768
/* Policy classes: 0 is the wildcard "any" in policy_key. */
#define CLASS_ANY 0
/* Identity of an address that no prefix of the policy covers. */
#define IDENTITY_WORLD 0

#define STATS_SLOTS (DIR_MAX * VERDICT_MAX * REASON_MAX)
#define STATS_INDEX(dir, verdict, reason) \
	(((dir) * VERDICT_MAX + (verdict)) * REASON_MAX + (reason))

/* ---- session_map: LRU hash, one entry per connection ------------------ */

/* Canonical 5-tuple: the lower (addr, port) endpoint first, so that both
 * directions of a connection find the same entry. IPv4 addresses occupy
 * the first 4 bytes, the rest is zero. Ports in host byte order; for ICMP
 * echo both ports hold the echo identifier. */
struct session_key {
	__u8 addr_lo[16];
	__u8 addr_hi[16];
	__u16 port_lo;
	__u16 port_hi;
	__u8 proto;
	__u8 family;  /* 4 or 6 */
	__u8 pad[2];
};

struct session_value {
	__u64 created_ns;    /* bpf_ktime_get_ns() of the first packet */
	__u64 last_seen_ns;
	__u64 packets[2];    /* [0] original direction, [1] reply */
	__u64 bytes[2];
	__u32 rule_id;       /* rule that allowed it (0: default) */
	__u32 generation;    /* policy generation it was judged under */
	__u32 owner[2];      /* hook that accounts each direction: ifindex<<1|dir */
	__u32 src_identity;  /* identities of the original src and dst */
	__u32 dst_identity;
	__u8 state;          /* enum mseg_state */
	__u8 flags;          /* enum mseg_session_flags */
	__u8 verdict;        /* VERDICT_ALLOWED or VERDICT_AUDIT */
	__u8 reason;         /* REASON_RULE or REASON_DEFAULT */
	__u32 pad;
};

/* ---- identity tries: address prefix -> identity, per policy slot ------ */

/* LPM keys: prefixlen counts the slot's 32 bits plus the address prefix,
 * so every generation slot is its own sub-trie (see docs/how-it-works.md). */
struct ident4_key {
	__u32 prefixlen;
	__u32 slot;
	__u8 addr[4];
};

struct ident6_key {
	__u32 prefixlen;
	__u32 slot;
	__u8 addr[16];
};

struct ident_value {
	__u32 identity;
	__u32 src_class;  /* equivalence class as a rule source (0: none) */
	__u32 dst_class;  /* equivalence class as a rule destination (0: none) */
	__u32 flags;      /* enum mseg_ident_flags */
};

/* ---- policy_map: LPM trie over (slot, src class, dst class, proto, port) */

/* prefixlen: 96 = any protocol; 104 = this protocol, any port;
 * 104 + n = the first n bits of the destination port (a range is a set of
 * such prefixes). Port bytes are big-endian so prefixes follow port order. */
struct policy_key {
	__u32 prefixlen;
	__u32 slot;
	__u32 src_class;
	__u32 dst_class;
	__u8 proto;       /* 0 = any */
	__u8 port[2];     /* big-endian destination port */
	__u8 pad;
};
#define POLICY_PREFIX_ANY_PROTO 96
#define POLICY_PREFIX_PROTO 104
#define POLICY_PREFIX_FULL 120

/* Within one (src, dst) group the compiler already resolved deny-over-allow
 * so the longest prefix carries the answer; across the up to four groups a
 * packet can match, the datapath prefers deny, then the lowest priority. */
struct policy_value {
	__u32 rule_id;
	__u16 priority;   /* rule index in the file: lower wins among equals */
	__u8 action;      /* enum mseg_action */
	__u8 pad;
};

/* ---- config_map[slot] and active_map[0] -------------------------------- */

/* One config per slot. A generation is switched in by writing its number
 * into active_map[0] (one aligned 4-byte store); slot = generation & 1. */
struct policy_config {
	__u32 generation;
	__u8 default_action;  /* enum mseg_action */
	__u8 flags;           /* enum mseg_config_flags */
	__u8 pad[2];
};

/* ---- counters ----------------------------------------------------------- */

struct stats_value {
	__u64 packets;
	__u64 bytes;
};

struct rule_stats {
	__u64 hits;         /* verdicts decided by this rule */
	__u64 last_hit_ns;  /* bpf_ktime_get_ns() of the last one */
};

struct event_stats {
	__u64 submitted;    /* records handed to the ring buffer */
	__u64 lost;         /* bpf_ringbuf_reserve() failed: ring full */
};

/* ---- fragments: first fragment's verdict for the rest ----------------- */

struct frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct frag_value {
	__u64 seen_ns;
	__u32 rule_id;
	__u32 generation;
	__u8 verdict;
	__u8 reason;
	__u8 pad[6];
};

/* ---- the ring-buffer record: one fixed size for every type ------------ */

struct event {
	__u64 ts_ns;          /* bpf_ktime_get_ns() */
	__u64 created_ns;     /* session events: session creation time */
	__u64 packets[2];     /* session events: original / reply */
	__u64 bytes[2];
	__u8 saddr[16];       /* packet source; session events: originator */
	__u8 daddr[16];
	__u32 ifindex;
	__u32 rule_id;
	__u32 generation;
	__u32 pkt_len;
	__u32 src_identity;
	__u32 dst_identity;
	__u16 sport;
	__u16 dport;
	__u8 type;            /* enum mseg_event_type */
	__u8 verdict;         /* enum mseg_verdict (verdict and drop events) */
	__u8 reason;          /* enum mseg_reason */
	__u8 direction;       /* enum mseg_direction */
	__u8 family;          /* 4 or 6 */
	__u8 proto;           /* IP protocol number */
	__u8 tcp_flags;
	__u8 state;           /* session events: enum mseg_state */
	__u8 prev_state;
	__u8 pad[11];         /* to 128 bytes */
};

#endif /* MICROSEG_H */
