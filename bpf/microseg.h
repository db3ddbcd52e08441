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

#include <linux/types.h>

#define MSEG_ABI_VERSION 5

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

/* ident_value.flags */
enum mseg_ident_flags {
	IDENT_AUDIT = 1,      /* traffic TO this identity: deny becomes audit */
};

/* Selector kinds, each with its own class space (see policy.h). A group
 * (src class, dst class) pairs a class of one kind with one of another;
 * the pair of kinds is a "combo", bit X * 4 + Y of the combo masks. */
enum mseg_space {
	SPACE_WORKLOAD = 0,
	SPACE_LABELS = 1,
	SPACE_CIDR = 2,
	SPACE_ANY = 3,
	SPACE_MAX = 3,        /* spaces with classes (ANY has none) */
};

/* policy_config.flags */
enum mseg_config_flags {
	CFG_AUDIT = 1,        /* global audit mode (applies to unknown dsts) */
	CFG_ANY_ANY = 2,      /* an (any, any) group exists */
	CFG_PREFIX4 = 4,      /* ident4_map has entries: look up non-host IPv4 */
	CFG_PREFIX6 = 8,      /* ident6_map has entries: look up non-host IPv6 */
};

/* policy_value.flags */
enum mseg_policy_flags {
	POLICY_EXCEPTIONS = 1, /* some port classes decide otherwise: look up */
};

/* session_value.flags (FIN bits are set with an atomic OR: both directions
 * of a connection may be handled on two CPUs at once) */
enum mseg_session_flags {
	SESSION_ORIG_LO = 1,    /* original direction's source is key.addr_lo */
	SESSION_FIN_ORIG = 2,   /* FIN seen from the originator */
	SESSION_FIN_REPLY = 4,  /* FIN seen from the responder */
	SESSION_AUDIT = 8,      /* allowed only because of audit mode */
	SESSION_PICKUP = 16,    /* created mid-stream (no SYN seen) */
	SESSION_REPLY_PICKUP = 32, /* created by a reply whose session was lost */
	SESSION_SIMOPEN = 64,   /* TCP simultaneous open (both sides sent SYN) */
};

/* event.flags */
enum mseg_event_flags {
	EVENT_F_AUDIT = 1,      /* a would-be drop that audit mode let pass */
	/* An allowed (or audit) verdict whose packet opened a session: the
	 * one record stands for the verdict and then the session's "new"
	 * event, which the daemon makes of it (microseg/kernel/records.py
	 * opened_session): state holds the new session's state. */
	EVENT_F_OPENED = 2,
	EVENT_F_OPENED_REPLY = 4, /* ... its originator is the packet's destination */
};

/* Ring buffers. Denied verdicts and drops have a ring of their own, so a
 * flood of them can never push session events and allowed verdicts out. */
enum mseg_ring {
	RING_EVENTS = 0,        /* session events, allowed and audit verdicts */
	RING_DENIALS = 1,       /* denied verdicts, drops */
	RING_MAX = 2,
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
/* Class ids are unique across spaces; 0 is "any" in policy_key. */
#define CLASS_ANY 0
/* Identity of an address that no prefix of the policy covers. */
#define IDENTITY_WORLD 0

#define STATS_SLOTS (DIR_MAX * VERDICT_MAX * REASON_MAX)
#define STAGED_STATS_SLOTS (VERDICT_MAX * 2)
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

/* A session lives in pending_map until both of its directions have been
 * seen, then in session_map (see bpf/lib/session.h): a flood of first
 * packets that never get an answer can only evict other unanswered ones. */
struct session_value {
	__u64 created_ns;    /* bpf_ktime_get_ns() of the first packet */
	__u64 last_seen;     /* bpf_jiffies64() of the latest packet */
	__u64 seen[2];       /* bpf_jiffies64() of each direction's latest
			      * packet at its owner hook (handover, see
			      * account_session) */
	__u64 packets[2];    /* [0] original direction, [1] reply */
	__u64 bytes[2];
	__u64 flags;         /* enum mseg_session_flags; 64 bits for the atomic
			      * OR the FIN bits are set with */
	__u32 rule_id;       /* rule that allowed it (0: default) */
	__u32 generation;    /* policy generation it was judged under */
	__u32 owner[2];      /* hook that accounts each direction: ifindex<<1|dir */
	__u32 src_identity;  /* identities of the original src and dst */
	__u32 dst_identity;
	__u8 state;          /* enum mseg_state */
	__u8 verdict;        /* VERDICT_ALLOWED or VERDICT_AUDIT */
	__u8 reason;         /* REASON_RULE or REASON_DEFAULT */
	__u8 pad[5];
};

/* ---- identities: address -> identity and classes, per policy slot ---- */

/* Host addresses (/32, /128) by exact hash; only other prefixes need the
 * LPM tries (prefixlen counts the slot's 32 bits plus the address prefix,
 * so every generation slot is its own sub-trie). */
struct host4_key {
	__u32 slot;
	__u8 addr[4];
};

struct host6_key {
	__u32 slot;
	__u8 addr[16];
};

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
	__u32 cls[SPACE_MAX];  /* class in each selector space; 0: none */
	__u16 src_combos;      /* bit X*4+Y: a group pairs my X-class, as
				* source, with some Y-class (or any) */
	__u16 dst_combos;      /* bit X*4+Y: a group pairs my Y-class, as
				* destination, with some X-class (or any) */
	__u32 flags;           /* enum mseg_ident_flags */
};

/* ---- policy_map: hash over (slot, src class, dst class, proto, port class)
 *
 * Per group and protocol, one header entry (port_class 0) carries the
 * decision for most ports; when some port classes decide otherwise it is
 * flagged POLICY_EXCEPTIONS and those have entries under port_class =
 * class + 1. proto 0 holds the any-protocol decision for protocols other
 * than tcp, udp, icmp and icmpv6 (those four get their own headers). */
struct policy_key {
	__u32 slot;
	__u32 src_class;
	__u32 dst_class;
	__u8 proto;
	__u8 pad;
	__u16 port_class;
};

/* Within a group the compiler already resolved deny-over-allow; across the
 * groups a packet matches, the datapath prefers deny, then the lowest
 * priority (the rule written first). ACTION_NONE: no rule of the group
 * matches (a header that exists only to carry exceptions). */
struct policy_value {
	__u32 rule_id;
	__u16 priority;
	__u8 action;      /* enum mseg_action */
	__u8 flags;       /* enum mseg_policy_flags */
};

/* port_class_map[PORT_CLASS_INDEX(slot, udp, port)]: ports that rules
 * name, grouped into classes (0: named by no rule of that protocol). */
#define PORT_CLASS_SLOTS (POLICY_SLOTS * 2 * 65536)
#define PORT_CLASS_INDEX(slot, udp, port) \
	((((slot) * 2 + (udp)) << 16) | (port))

/* ---- config_map[slot] and active_map ---------------------------------- */

/* One config per slot. A generation is switched in by writing its number
 * into active_map[ACTIVE_POLICY] (one aligned 4-byte store). A staged
 * candidate (docs/policy.md "Staging") is a generation too, numbered with
 * STAGED_GENERATION set and switched in by active_map[ACTIVE_STAGED] (0:
 * nothing staged): active generations use slots 0 and 1, staged ones 2 and
 * 3, so staging never touches what the active policy reads. */
#define POLICY_SLOTS 4
#define STAGED_GENERATION 0x80000000
#define POLICY_SLOT(gen) ((((gen) >> 30) & 2) | ((gen) & 1))
enum mseg_active {
	ACTIVE_POLICY = 0,
	ACTIVE_STAGED = 1,
	ACTIVE_MAX = 2,
};
struct policy_config {
	__u32 generation;
	__u8 default_action;  /* enum mseg_action */
	__u8 flags;           /* enum mseg_config_flags */
	__u8 pad[2];
	__u64 stamp;          /* random, new at every write of the slot, never 0:
			       * what policy_cache_map entries are valid under */
};

/* ---- policy_cache_map: recent decisions, per CPU --------------------------
 *
 * Direct-mapped by a hash of the flow; an entry answers a lookup only when
 * every input of match_policy() is equal and it was made under the same
 * write of the same generation slot (stamp), so it can never outlive the
 * policy it came from. A collision only costs a full lookup.
 */
#define POLICY_CACHE_BITS 10
#define POLICY_CACHE_SLOTS (1 << POLICY_CACHE_BITS)

struct policy_cache_entry {
	__u8 saddr[16];
	__u8 daddr[16];
	__u64 stamp;        /* policy_config.stamp when made; 0: empty */
	__u32 generation;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u32 rule_id;      /* the decision (struct decision's fields) */
	__u32 src_identity;
	__u32 dst_identity;
	__u8 verdict;
	__u8 reason;
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

/* event_stats_map[ring * EVENT_TYPE_MAX + type] */
struct event_stats {
	__u64 submitted;    /* records handed to the ring buffer */
	__u64 lost;         /* bpf_ringbuf_reserve() failed: ring full */
};
#define EVENT_STATS_SLOTS (RING_MAX * EVENT_TYPE_MAX)

/* Entries the datapath added to and removed from the session tables
 * (pending_map and session_map together; a promotion moves an entry). With
 * the daemon's own deletions (struct daemon_state) they tell the LRUs'
 * silent evictions: created - revoked - reused - swept - entries. */
struct session_stats {
	__u64 created;      /* new entries, in pending_map */
	__u64 revoked;      /* deleted when a new policy denied the session */
	__u64 reused;       /* closed entries deleted for a new connection */
	__u64 promoted;     /* moved from pending_map to session_map */
	__u64 agg_full;     /* denials reported one by one: agg_map was full */
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

/* Bytes of the datagram seen so far, and its length once its last
 * fragment told it: the entry is freed when all of them passed. */
struct frag_value {
	__u64 seen;          /* bpf_jiffies64() */
	__u32 rule_id;
	__u32 generation;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 received;      /* fragment payload bytes seen */
	__u32 total;         /* the datagram's payload length; 0: not known yet */
	__u8 verdict;
	__u8 reason;
	__u8 audit;          /* a would-be fragment drop passes (audit mode) */
	__u8 pad[5];
};

/* ---- event aggregation: repeated denials and drops of one flow -------- */

/* One flow of denied or dropped packets (the source port is left out: a
 * flood that varies it is still one flow). */
struct agg_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 hook;          /* ifindex << 1 | direction */
	__u32 generation;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u8 verdict;        /* as counted: VERDICT_AUDIT for an audited drop */
	__u8 reason;
	__u8 audit;
	__u8 type;           /* EVENT_VERDICT or EVENT_DROP */
};

/* The first packet of a window is reported at once; the rest are counted
 * in `pending` (atomic adds) and reported together by the next packet
 * after the window, or by mseg_flush (the daemon runs it for flows that
 * went quiet). Only atomic exchanges take `pending`, so every packet is
 * reported exactly once. */
struct agg_value {
	__u64 window_start;  /* bpf_ktime_get_ns() */
	__u64 last_ns;       /* the latest packet */
	__u64 pending;       /* packets counted, not reported yet */
	__u64 pending_bytes;
	__u32 rule_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 dead;          /* mseg_flush marked it idle; deleted next time */
	__u16 sport;         /* the latest packet's */
	__u8 tcp_flags;      /* the latest packet's */
	__u8 staged_verdict; /* the latest packet's staged judgment (struct event) */
	__u32 staged_rule;
	__u32 staged_generation;
	__u32 pad;
};

/* settings_map[0]: written by the daemon at start. */
struct settings {
	__u64 event_window_ns;   /* aggregation window; 0: aggregation off */
	__u64 handover_jiffies;  /* a hook takes a direction over after its
				  * owner saw none of it for this long */
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
	__u8 state;           /* session events: enum mseg_state; verdict events
			       * with EVENT_F_OPENED: the new session's */
	__u8 prev_state;
	__u8 flags;           /* enum mseg_event_flags */
	__u8 staged_verdict;  /* verdict events: the staged policy's verdict + 1
			       * (0: no staged policy judged it) */
	__u8 pad;
	__u32 staged_rule;    /* ... and its deciding rule (0: default) */
	__u32 staged_generation;
};
/* Verdict and drop events: packets[0] is the number of packets the event
 * stands for (>= 1: aggregation), bytes[0] their bytes. */

/* ---- scratch_map[0]: what one packet's handling keeps beside the stack --

 * Per CPU. The packet, and records too big to build on the 512-byte stack
 * next to the rest. Pinned, like every map: the reply stage (mseg_reply, a
 * tail call) reads what the entry program wrote, and an entry program left
 * attached by an earlier daemon calls the stage the current one installed;
 * within an ABI version the layout is the same. A program run is never
 * interrupted by another one using it on the same CPU: TC programs run
 * with bottom halves off, and the programs userspace runs with
 * BPF_PROG_TEST_RUN (mseg_clock, mseg_flush) never touch it. */

/* A parsed packet (bpf/lib/parse.h). */
struct packet {
	__u8 saddr[16];      /* IPv4 in the first 4 bytes, rest zero */
	__u8 daddr[16];
	__u16 sport;         /* host order; ICMP echo: the identifier */
	__u16 dport;
	__u32 len;           /* skb->len: what counters and events report */
	__u32 segs;          /* packets this skb stands for (GSO), >= 1 */
	__u32 frag_id;
	__u32 frag_offset;   /* fragments: payload offset in bytes */
	__u32 frag_len;      /* fragments: payload bytes in this fragment */
	__u8 frag_more;      /* fragments: more follow (MF / M flag) */
	__u8 family;         /* 4 or 6 */
	__u8 proto;
	__u8 tcp_flags;
	__u8 frag;           /* enum frag_kind */
	__u8 icmp;           /* enum icmp_kind */
	__u16 quote_off;     /* ICMP_KIND_ERROR: offset of the quoted packet */
} __attribute__((aligned(8))); /* addresses are compared as u64 words */

/* The outcome of a policy lookup or of a drop, as the stages pass it on
 * (bpf/lib/decision.h). */
struct decision {
	__u32 rule_id;
	__u32 generation;
	__u32 src_identity;
	__u32 dst_identity;
	__u8 verdict;  /* enum mseg_verdict */
	__u8 reason;   /* enum mseg_reason */
	__u8 audit;    /* enum audit_check: does audit mode let a drop pass? */
	__u8 staged_verdict;      /* as in struct event */
	__u32 staged_rule;
	__u32 staged_generation;
};

struct scratch {
	struct packet packet;          /* the packet being handled */
	struct session_value session;  /* a new session (open_session) */
	struct agg_key agg_key;        /* a denied flow (report_denial) */
	struct agg_value agg;
	struct decision own;           /* the reply stage: the packet's own verdict */
	__u32 opened;                  /* session above just opened: side + 1 */
	__u32 direction;               /* the reply stage: the hook's direction */
	__u32 generation;              /* the reply stage: the generation judged */
	__u32 flags;                   /* the staged stage: enum mseg_judged_flags */
	__u32 carried;                 /* process(): its flags across the judgment */
};

/* scratch.flags: how process() found a new flow, for the staged stage. */
enum mseg_judged_flags {
	JUDGED_ALONE = 1,   /* judged alone: opens no session */
	JUDGED_REUSE = 2,   /* a new connection on a closed tuple */
};

/* stage_map: the programs entry points tail-call. */
enum mseg_stage {
	STAGE_REPLY = 0,        /* mseg_reply: judge a packet as a reply */
	STAGE_STAGED = 1,       /* mseg_staged: judge a new flow by the candidate too */
	STAGE_MAX = 2,
};

/* clock_map[0], written by the mseg_clock entry when userspace runs it:
 * one instant on both session clocks, to convert jiffies to time. */
struct clock_sample {
	__u64 jiffies;
	__u64 ktime_ns;
};

/* daemon_map[0]: the daemon's own bookkeeping, pinned with the maps so that
 * a restarted daemon (also after SIGKILL) numbers events on from the last
 * one published and reports the ring-buffer losses not reported yet. The
 * datapath never touches it. */
struct daemon_state {
	__u64 last_seq;
	__u64 ringbuf_lost_seen;
	__u64 sessions_swept;   /* entries the daemons' sweeps deleted */
};

#endif /* MICROSEG_H */
