/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parse.h — Ethernet / 802.1Q / PPPoE / MPLS / IPv4 / IPv6 (+ extension
 * headers) / TCP / UDP / ICMP / ICMPv6 into a struct packet. On links with
 * no link-layer header (tun, WireGuard, ipip/gre: the loader attaches the
 * _l3 entry points there) the packet starts with its IP header and
 * skb->protocol names the family.
 *
 * Every header access is preceded by its boundary check against data_end
 * (the verifier insists, and it is what keeps malformed packets harmless).
 * Lengths the headers claim are checked against what the packet carries:
 * a header that lies is "invalid", never trusted — the kernel would drop it
 * too (PARSE_INVALID). A packet that is well formed but one a firewall must
 * not let pass unjudged (a forbidden TCP flag combination, an overlapping
 * fragment, ...) is PARSE_SUSPECT: dropped as "invalid", except that audit
 * mode lets it pass (docs/policy.md).
 */
#ifndef MSEG_PARSE_H
#define MSEG_PARSE_H

#include <uapi/linux/bpf.h>
#include "../microseg.h"
#include "proto.h"


#define MAX_VLAN_TAGS 2
#define MAX_MPLS_LABELS 4
/* Four extension headers cover what real traffic carries (hop-by-hop,
 * destination options, routing, fragment); a longer chain is how filters
 * are evaded (RFC 9098) and is dropped as suspect. Each one more would
 * also cost the verifier a third more of the entry point's paths. */
#define MAX_IPV6_EXT 4
/* Bounds the network+extension header length the parser accepts, so that
 * offsets stay small for the verifier and hostile chains cost little. */
#define MAX_L4_OFFSET 512
/* The TC hook a packet runs on, as sessions (owner) and aggregated
 * denials (agg_key.hook) record it: ifindex << 1 | direction. */
static __always_inline __u32 hook_id(struct __sk_buff *skb, __u32 dir)
{
	return (skb->ifindex << 1) | dir;
}

/* bpf_skb_pull_data() length when headers are not in the linear area. */
#define MAX_PULL_LEN 640

#define bswap16(x) __builtin_bswap16(x)
#define bswap32(x) __builtin_bswap32(x)

enum parse_result {
	PARSE_OK = 0,
	PARSE_NON_IP,     /* pass and count */
	PARSE_NEIGHBOR,   /* IPv6 ND / MLD: pass and count */
	PARSE_INVALID,    /* malformed: drop, reason invalid, also in audit mode */
	PARSE_TRUNCATED,  /* header beyond data_end: pull, or invalid */
	PARSE_SUSPECT,    /* well formed but not to be passed unjudged: drop,
			   * reason invalid; audit mode lets it pass */
};

enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST = 1,   /* offset 0, more fragments follow: has the L4 header */
	FRAG_LATER = 2,   /* offset > 0: no L4 header, follows the first */
};

enum icmp_kind {
	ICMP_KIND_NONE = 0,
	ICMP_KIND_ECHO_REQUEST,
	ICMP_KIND_ECHO_REPLY,
	ICMP_KIND_ERROR,  /* quotes a packet: judged by that packet's session */
	ICMP_KIND_OTHER,
};

/* The quoted packet inside an ICMP error, as its sender sent it. */
struct quoted {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
} __attribute__((aligned(8)));


/* Valid TCP flag combinations (FIN SYN RST PSH ACK URG bits; ECE/CWR are
 * ignored), as nf_conntrack's tcp_valid_flags: bit n set <=> n is valid.
 * NULL, XMAS, SYN|FIN, SYN|RST and friends are not. */
#define TCP_VALID_COMBOS                                                   \
	((1ULL << 0x02) | (1ULL << 0x22) | (1ULL << 0x12) | (1ULL << 0x04) | \
	 (1ULL << 0x14) | (1ULL << 0x1C) | (1ULL << 0x11) | (1ULL << 0x31) | \
	 (1ULL << 0x10) | (1ULL << 0x18) | (1ULL << 0x30) | (1ULL << 0x38) | \
	 (1ULL << 0x19) | (1ULL << 0x39))

static __always_inline int tcp_flags_valid(__u8 flags)
{
	return (TCP_VALID_COMBOS >> (flags & 0x3F)) & 1;
}

static __always_inline void copy_addr16(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

/* The first 8 bytes of a quoted packet's L4 header: ports, or the echo id
 * of a quoted ping (icmp_proto: this family's ICMP). */
static __always_inline int parse_quoted_l4(__u8 *l4, void *data_end,
					   __u8 icmp_proto, struct quoted *q)
{
	if ((void *)(l4 + 8) > data_end)
		return PARSE_TRUNCATED;
	if (q->proto == IPPROTO_TCP || q->proto == IPPROTO_UDP) {
		q->sport = bswap16(*(__be16 *)l4);
		q->dport = bswap16(*(__be16 *)(l4 + 2));
	} else if (q->proto == icmp_proto) {
		struct icmp_hdr *ic = (void *)l4;
		q->sport = q->dport = bswap16(ic->id);
	}
	return PARSE_OK;
}

/* ICMP error quoting an IPv4 packet: its header and first 8 L4 bytes. */
static __always_inline int parse_quoted4(void *data, void *data_end, __u32 off,
					 struct quoted *q)
{
	if (off > MAX_L4_OFFSET)
		return PARSE_INVALID;
	struct ipv4_hdr *ip = data + off;

	if ((void *)(ip + 1) > data_end)
		return PARSE_TRUNCATED;
	__u32 hlen = (ip->ver_ihl & 0x0F) * 4;
	if ((ip->ver_ihl >> 4) != 4 || hlen < sizeof(*ip))
		return PARSE_INVALID;
	__builtin_memcpy(q->saddr, &ip->saddr, 4);
	__builtin_memcpy(q->daddr, &ip->daddr, 4);
	q->proto = ip->protocol;
	off += hlen;
	if (off > MAX_L4_OFFSET)
		return PARSE_INVALID;
	return parse_quoted_l4(data + off, data_end, IPPROTO_ICMP, q);
}

/* ICMPv6 error quoting an IPv6 packet. Extension headers in the quote are
 * not walked: the quote then names an unknown protocol and the error is
 * judged by policy on its own. */
static __always_inline int parse_quoted6(void *data, void *data_end, __u32 off,
					 struct quoted *q)
{
	if (off > MAX_L4_OFFSET)
		return PARSE_INVALID;
	struct ipv6_hdr *ip6 = data + off;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_TRUNCATED;
	copy_addr16(q->saddr, ip6->saddr);
	copy_addr16(q->daddr, ip6->daddr);
	q->proto = ip6->nexthdr;
	return parse_quoted_l4((void *)(ip6 + 1), data_end, IPPROTO_ICMPV6, q);
}

/* L4 at offset off, l4_len bytes long according to the IP header. */
static __always_inline int parse_l4(void *data, void *data_end, __u32 off,
				    __u32 l4_len, struct packet *p)
{
	if (off > MAX_L4_OFFSET)
		return PARSE_INVALID;

	if (p->proto == IPPROTO_TCP) {
		struct tcp_hdr *th = data + off;
		if (l4_len < sizeof(*th))
			return PARSE_INVALID;
		if ((void *)(th + 1) > data_end)
			return PARSE_TRUNCATED;
		/* Ports and flags first: a drop event should show them. */
		p->sport = bswap16(th->source);
		p->dport = bswap16(th->dest);
		p->tcp_flags = th->flags;
		__u32 doff = (th->doff_res >> 4) * 4;
		if (doff < sizeof(*th) || doff > l4_len)
			return PARSE_INVALID;
		if (!tcp_flags_valid(th->flags))
			return PARSE_SUSPECT;
		return PARSE_OK;
	}
	if (p->proto == IPPROTO_UDP) {
		struct udp_hdr *uh = data + off;
		if (l4_len < sizeof(*uh))
			return PARSE_INVALID;
		if ((void *)(uh + 1) > data_end)
			return PARSE_TRUNCATED;
		p->sport = bswap16(uh->source);
		p->dport = bswap16(uh->dest);
		__u32 ulen = bswap16(uh->len);
		/* A first fragment carries only part of the datagram. */
		if (p->frag == FRAG_NONE && (ulen < sizeof(*uh) || ulen > l4_len))
			return PARSE_INVALID;
		return PARSE_OK;
	}
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		struct icmp_hdr *ic = data + off;
		if (l4_len < sizeof(*ic))
			return PARSE_INVALID;
		if ((void *)(ic + 1) > data_end)
			return PARSE_TRUNCATED;
		__u8 type = ic->type;
		int v6 = p->proto == IPPROTO_ICMPV6;

		if ((!v6 && type == ICMP_ECHO) || (v6 && type == ICMPV6_ECHO_REQUEST)) {
			p->icmp = ICMP_KIND_ECHO_REQUEST;
		} else if ((!v6 && type == ICMP_ECHOREPLY) ||
			   (v6 && type == ICMPV6_ECHO_REPLY)) {
			p->icmp = ICMP_KIND_ECHO_REPLY;
		} else if (v6 && ((type >= ICMPV6_MLD_QUERY &&
				   type <= ICMPV6_NEIGH_REDIRECT) ||
				  type == ICMPV6_MLD2_REPORT)) {
			return PARSE_NEIGHBOR;
		} else if ((!v6 && (type == ICMP_DEST_UNREACH ||
				    type == ICMP_SOURCE_QUENCH ||
				    type == ICMP_REDIRECT ||
				    type == ICMP_TIME_EXCEEDED ||
				    type == ICMP_PARAMETERPROB)) ||
			   (v6 && type >= ICMPV6_DEST_UNREACH &&
			    type <= ICMPV6_PARAMPROB)) {
			/* The quoted packet is parsed when needed
			 * (parse_quote); its header must be here. */
			__u32 qlen = v6 ? sizeof(struct ipv6_hdr) + 8
					: sizeof(struct ipv4_hdr) + 8;
			p->icmp = ICMP_KIND_ERROR;
			p->quote_off = off + sizeof(*ic);
			if (p->frag != FRAG_NONE || l4_len < sizeof(*ic) + qlen)
				return PARSE_INVALID;
			if ((void *)(ic + 1) + qlen > data_end)
				return PARSE_TRUNCATED;
			return PARSE_OK;
		} else {
			p->icmp = ICMP_KIND_OTHER;
			return PARSE_OK;
		}
		/* Echo: the identifier plays the role of both ports. */
		p->sport = p->dport = bswap16(ic->id);
		return PARSE_OK;
	}
	return PARSE_OK; /* other protocols: addresses only */
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, void *data,
				      void *data_end, __u32 off, struct packet *p)
{
	struct ipv4_hdr *ip = data + off;

	if ((void *)(ip + 1) > data_end)
		return PARSE_TRUNCATED;
	__u32 hlen = (ip->ver_ihl & 0x0F) * 4;
	if ((ip->ver_ihl >> 4) != 4 || hlen < sizeof(*ip))
		return PARSE_INVALID;
	__u32 tot = bswap16(ip->tot_len);
	/* tot_len 0 is legal only for BIG TCP GSO packets. */
	if (tot == 0 && skb->gso_size)
		tot = skb->len - off;
	if (tot < hlen || tot > skb->len - off)
		return PARSE_INVALID;
	if (data + off + hlen > data_end)
		return PARSE_TRUNCATED;

	p->family = 4;
	p->proto = ip->protocol;
	__builtin_memcpy(p->saddr, &ip->saddr, 4);
	__builtin_memcpy(p->daddr, &ip->daddr, 4);

	__u16 frag_off = bswap16(ip->frag_off);
	if (frag_off & (IP_MF | IP_OFFSET)) {
		p->frag_id = bswap16(ip->id);
		p->frag_offset = (frag_off & IP_OFFSET) * 8;
		p->frag_len = tot - hlen;
		p->frag_more = !!(frag_off & IP_MF);
		if (frag_off & IP_OFFSET) {
			p->frag = FRAG_LATER;
			/* RFC 1858: a later fragment that overlaps the TCP header
			 * could rewrite ports or flags the first one was judged by. */
			if (p->proto == IPPROTO_TCP && (frag_off & IP_OFFSET) < 3)
				return PARSE_SUSPECT;
			return PARSE_OK;
		}
		p->frag = FRAG_FIRST;
	}
	return parse_l4(data, data_end, off + hlen, tot - hlen, p);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, void *data,
				      void *data_end, __u32 off, struct packet *p)
{
	struct ipv6_hdr *ip6 = data + off;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_TRUNCATED;
	if ((ip6->ver_tc_flow & 0xF0) != 0x60) /* first byte, version nibble */
		return PARSE_INVALID;
	__u32 plen = bswap16(ip6->payload_len);
	if (plen == 0 && skb->gso_size)
		plen = skb->len - off - sizeof(*ip6);
	if (plen + sizeof(*ip6) > skb->len - off)
		return PARSE_INVALID;

	p->family = 6;
	copy_addr16(p->saddr, ip6->saddr);
	copy_addr16(p->daddr, ip6->daddr);

	__u8 nexthdr = ip6->nexthdr;
	__u32 l3_end = off + sizeof(*ip6) + plen;
	off += sizeof(*ip6);

	/* Extension headers: a bounded walk (a real loop, not unrolled: the
	 * verifier bounds it, and the program stays small); a longer chain is
	 * invalid. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		if (off > MAX_L4_OFFSET)
			return PARSE_INVALID;
		/* An extension header after a first fragment's fragment header
		 * (RFC 8200 lets the fragmentable part start with them) moves the
		 * L4 header away from offset 0 of that part: a later fragment
		 * could then rewrite its ports at an offset the overlap checks
		 * below let through. Later fragments of such a datagram name that
		 * extension header as next header, so they never find the first
		 * one's verdict anyway: the datagram cannot pass, say so now. */
		if (p->frag == FRAG_FIRST &&
		    (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		     nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH))
			return PARSE_SUSPECT;
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS) {
			struct ipv6_opt_hdr *oh = data + off;
			if ((void *)(oh + 1) > data_end)
				return PARSE_TRUNCATED;
			nexthdr = oh->nexthdr;
			off += (oh->hdrlen + 1) * 8;
		} else if (nexthdr == IPPROTO_AH) {
			struct ipv6_opt_hdr *oh = data + off;
			if ((void *)(oh + 1) > data_end)
				return PARSE_TRUNCATED;
			nexthdr = oh->nexthdr;
			off += (oh->hdrlen + 2) * 4;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag_hdr *fh = data + off;
			if ((void *)(fh + 1) > data_end)
				return PARSE_TRUNCATED;
			if (p->frag != FRAG_NONE) /* two fragment headers */
				return PARSE_INVALID;
			nexthdr = fh->nexthdr;
			off += sizeof(*fh);
			__u16 fo = bswap16(fh->frag_off);
			if (fo & 0xFFF9) { /* offset or M flag: a real fragment */
				p->frag_id = bswap32(fh->identification);
				p->proto = nexthdr;
				p->frag_offset = fo & 0xFFF8;
				p->frag_more = fo & 1;
				p->frag_len = off <= l3_end ? l3_end - off : 0;
				if (fo & 0xFFF8) {
					p->frag = FRAG_LATER;
					if (nexthdr == IPPROTO_TCP && (fo & 0xFFF8) < 24)
						return PARSE_SUSPECT;
					return PARSE_OK;
				}
				p->frag = FRAG_FIRST;
			}
		} else {
			break;
		}
		if (off > l3_end)
			return PARSE_INVALID;
	}
	if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	    nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH ||
	    nexthdr == IPPROTO_FRAGMENT)
		return PARSE_SUSPECT; /* chain longer than MAX_IPV6_EXT */
	p->proto = nexthdr;
	if (nexthdr == IPPROTO_NONE)
		return PARSE_OK;
	return parse_l4(data, data_end, off, l3_end - off, p);
}

/* The network header at off, whose kind the link layer named (an
 * EtherType, host order); PARSE_NON_IP for anything but IPv4 and IPv6. */
static __always_inline int parse_network(struct __sk_buff *skb, void *data,
					 void *data_end, __u32 off, __u16 proto,
					 struct packet *p)
{
	if (proto == ETH_P_IP)
		return parse_ipv4(skb, data, data_end, off, p);
	if (proto == ETH_P_IPV6)
		return parse_ipv6(skb, data, data_end, off, p);
	return PARSE_NON_IP;
}

/* The EtherType of what an MPLS label stack carries (from the version
 * nibble after its bottom label), and the stack's end in *off. Routers
 * pop labels and deliver the IP packet inside: it must not pass as non-IP. */
static __always_inline int parse_mpls(void *data, void *data_end, __u32 *off,
				      __u16 *proto)
{
#pragma unroll
	for (int i = 0; i < MAX_MPLS_LABELS; i++) {
		__u8 *lse = data + *off;
		if ((void *)(lse + 5) > data_end) /* the label, and what follows */
			return PARSE_TRUNCATED;
		*off += 4;
		if (!(lse[2] & 1)) /* bottom of stack bit */
			continue;
		__u8 version = lse[4] >> 4;
		if (version == 4)
			*proto = ETH_P_IP;
		else if (version == 6)
			*proto = ETH_P_IPV6;
		else
			*proto = 0; /* a pseudowire or the like: not IP */
		return PARSE_OK;
	}
	return PARSE_SUSPECT; /* deeper than MAX_MPLS_LABELS */
}

static __always_inline int parse_once(struct __sk_buff *skb, struct packet *p,
				      int l3)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (l3) /* no link-layer header: skb->protocol says the family */
		return parse_network(skb, data, data_end, 0,
				     bswap16((__u16)skb->protocol), p);

	struct eth_hdr *eth = data;
	__u32 off = sizeof(*eth);

	if ((void *)(eth + 1) > data_end)
		return PARSE_TRUNCATED;
	__be16 proto = eth->proto;

	/* 802.1Q / 802.1ad tags still in the frame (not offloaded to the skb). */
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (proto != bswap16(ETH_P_8021Q) && proto != bswap16(ETH_P_8021AD))
			break;
		struct vlan_hdr *vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return PARSE_TRUNCATED;
		proto = vh->proto;
		off += sizeof(*vh);
	}
	/* Still a tag after MAX_VLAN_TAGS: not "non-IP". Receivers strip VLAN 0
	 * (priority) tags one after another and deliver the IP packet inside,
	 * so passing it unjudged would let anything through: invalid. */
	if (proto == bswap16(ETH_P_8021Q) || proto == bswap16(ETH_P_8021AD))
		return PARSE_INVALID;

	__u16 type = bswap16(proto);
	if (type == ETH_P_PPP_SES) {
		/* PPPoE session: 6 bytes of PPPoE, then the PPP protocol. */
		__u8 *pp = data + off;
		if ((void *)(pp + 8) > data_end)
			return PARSE_TRUNCATED;
		__u16 ppp = (pp[6] << 8) | pp[7];
		off += 8;
		type = ppp == PPP_IP ? ETH_P_IP : ppp == PPP_IPV6 ? ETH_P_IPV6 : 0;
	} else if (type == ETH_P_MPLS_UC || type == ETH_P_MPLS_MC) {
		int rc = parse_mpls(data, data_end, &off, &type);
		if (rc != PARSE_OK)
			return rc;
	}
	return parse_network(skb, data, data_end, off, type, p);
}

/* The quoted packet of an ICMP error (its first header is within the
 * linear area: parse_packet() already made it so). */
static __always_inline int parse_quote(struct __sk_buff *skb,
				       const struct packet *p, struct quoted *q)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int rc;

	if (p->family == 4)
		rc = parse_quoted4(data, data_end, p->quote_off, q);
	else
		rc = parse_quoted6(data, data_end, p->quote_off, q);
	if (rc != PARSE_OK)
		return rc;
	/* An error goes back to the sender of the packet it quotes. One sent
	 * to anybody else is not about that packet (nf_conntrack: "outer
	 * daddr mismatch"), and would let a third party reach a workload as
	 * "related" to a session it is no part of: invalid. */
	if (*(const __u64 *)q->saddr != *(const __u64 *)p->daddr ||
	    *(const __u64 *)(q->saddr + 8) != *(const __u64 *)(p->daddr + 8))
		return PARSE_SUSPECT;
	return PARSE_OK;
}

/* Parse the packet; when its headers are not all in the linear area,
 * bpf_skb_pull_data() makes them so (it may copy, hence only on demand)
 * and the parse is retried once. */
static __always_inline int parse_packet(struct __sk_buff *skb, struct packet *p,
					int l3)
{
	int rc = PARSE_INVALID;

	/* At most two passes, as a loop so the parser is emitted once. */
#pragma clang loop unroll(disable)
	for (int pass = 0; pass < 2; pass++) {
		__builtin_memset(p, 0, sizeof(*p));
		rc = parse_once(skb, p, l3);
		if (rc != PARSE_TRUNCATED || pass)
			break;
		__u32 linear = skb->data_end - skb->data;
		if (skb->len <= linear)
			break;
		__u32 want = skb->len < MAX_PULL_LEN ? skb->len : MAX_PULL_LEN;
		/* bpf_skb_pull_data: make `want` bytes directly readable. */
		if (bpf_skb_pull_data(skb, want))
			break;
	}
	if (rc == PARSE_TRUNCATED)
		rc = PARSE_INVALID;
	p->len = skb->len;
	/* A GSO super-packet stands for gso_segs packets on the wire. */
	p->segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	return rc;
}

#endif /* MSEG_PARSE_H */
