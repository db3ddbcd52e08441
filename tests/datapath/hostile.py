"""Hostile frames, built byte by byte.

scapy is too slow for a hundred thousand packets and too polite to lie in
every field, so these builders pack headers with ``struct``: every length,
offset and flag is whatever the caller says, and checksums are right unless
the caller corrupts them afterwards (the lab's receivers check them).

Used by tests/datapath/test_hostile.py (BPF_PROG_TEST_RUN) and
tests/e2e/test_hostile_lab.py (real veths). Every generator takes a
``random.Random`` so that a failure reproduces from its seed.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterator, Sequence

ETH_IP, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TPID_8021Q, TPID_8021AD = 0x8100, 0x88A8
ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
HOPOPTS, ROUTING, FRAGMENT, ESP, AH, NO_NEXT, DSTOPTS = 0, 43, 44, 50, 51, 59, 60
EXT_KINDS = (HOPOPTS, ROUTING, DSTOPTS, AH)

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
IP_MF = 0x2000

MAC_A = bytes.fromhex("02000000000a")  # the sender in BPF_PROG_TEST_RUN frames
MAC_B = bytes.fromhex("02000000000b")

_HDR_V4 = struct.Struct("!BBHHHBBH4s4s")
_HDR_V6 = struct.Struct("!IHBB16s16s")
_HDR_TCP = struct.Struct("!HHIIBBHHH")
_HDR_UDP = struct.Struct("!HHHH")


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def is_v6(ip: str) -> bool:
    return ":" in ip


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# -- layer 2 -------------------------------------------------------------------

def eth(ethertype: int, payload: bytes, tags: Sequence[tuple[int, int]] = (),
        mac_dst: bytes = MAC_B, mac_src: bytes = MAC_A) -> bytes:
    """An Ethernet frame; tags are (TPID, TCI) pairs, outermost first."""
    out = bytearray(mac_dst + mac_src)
    for tpid, tci in tags:
        out += struct.pack("!HH", tpid, tci)
    out += struct.pack("!H", ethertype)
    return bytes(out) + payload


def l3_offset(frame: bytes) -> tuple[int, int]:
    """(offset of the L3 header, ethertype) after any VLAN tags."""
    off, etype = 12, 0
    while off + 2 <= len(frame):
        etype = struct.unpack_from("!H", frame, off)[0]
        off += 2
        if etype not in (TPID_8021Q, TPID_8021AD):
            break
        off += 2
    return off, etype


def pop_vlan(frame: bytes) -> bytes:
    """The frame as the receiving kernel hands it to TC: the outermost VLAN
    tag (if any) moved into skb metadata, out of the frame."""
    if len(frame) >= 18 and struct.unpack_from("!H", frame, 12)[0] in (TPID_8021Q,
                                                                        TPID_8021AD):
        return frame[:12] + frame[16:]
    return frame


# -- layer 3 -------------------------------------------------------------------

def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ihl: int | None = None,
         tot_len: int | None = None, ident: int = 1, frag: int = 0, ttl: int = 64,
         options: bytes = b"", version: int = 4) -> bytes:
    """An IPv4 packet; frag is the whole flags+offset field (IP_MF | units)."""
    opts = options + b"\0" * (-len(options) % 4)
    hlen = 20 + len(opts)
    ihl = hlen // 4 if ihl is None else ihl
    tot = hlen + len(payload) if tot_len is None else tot_len
    hdr = _HDR_V4.pack((version << 4) | (ihl & 0xF), 0, tot & 0xFFFF, ident & 0xFFFF,
                       frag & 0xFFFF, ttl, proto, 0, packed(src), packed(dst)) + opts
    csum = inet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes, *, plen: int | None = None,
         version: int = 6, hlim: int = 64) -> bytes:
    p = len(payload) if plen is None else plen
    return _HDR_V6.pack(version << 28, p & 0xFFFF, nh, hlim, packed(src),
                        packed(dst)) + payload


def ext(kind: int, nh: int, hdrlen: int = 0) -> bytes:
    """A hop-by-hop, routing, destination options or AH header (hdrlen as on
    the wire); options are Pad1, the routing header type 4 (SRH-like) with
    no segments left."""
    size = (hdrlen + 2) * 4 if kind == AH else (hdrlen + 1) * 8
    body = bytearray(size)
    body[0], body[1] = nh, hdrlen & 0xFF
    if kind == ROUTING:
        body[2] = 4
    return bytes(body)


def frag6(nh: int, offset: int, more: bool, ident: int) -> bytes:
    """An IPv6 fragment header; offset in bytes (a multiple of 8)."""
    return struct.pack("!BBHI", nh, 0, (offset & 0xFFF8) | int(more), ident & 0xFFFFFFFF)


# -- layer 4 -------------------------------------------------------------------

def tcp(sport: int, dport: int, flags: int, *, seq: int = 1000, ack: int = 0,
        doff: int | None = None, options: bytes = b"", payload: bytes = b"",
        window: int = 8192) -> bytes:
    opts = options + b"\x01" * (-len(options) % 4)
    d = (20 + len(opts)) // 4 if doff is None else doff
    return _HDR_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (d & 0xF) << 4,
                         flags & 0xFF, window, 0, 0) + opts + payload


def udp(sport: int, dport: int, payload: bytes = b"x", *, ulen: int | None = None) -> bytes:
    n = 8 + len(payload) if ulen is None else ulen
    return _HDR_UDP.pack(sport, dport, n & 0xFFFF, 0) + payload


def icmp(type_: int, code: int = 0, rest: bytes = b"\0\0\0\0", payload: bytes = b"") -> bytes:
    return struct.pack("!BBH", type_, code, 0) + rest[:4].ljust(4, b"\0") + payload


def echo(ident: int, seq: int = 1, *, v6: bool = False, reply: bool = False,
         payload: bytes = b"ping") -> bytes:
    t = (129 if reply else 128) if v6 else (0 if reply else 8)
    return icmp(t, 0, struct.pack("!HH", ident, seq), payload)


_CSUM_AT = {TCP: 16, UDP: 6, ICMP: 2, ICMPV6: 2}


def with_checksum(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    """l4 with its checksum field filled (pseudo-header for all but ICMP)."""
    at = _CSUM_AT.get(proto)
    if at is None or len(l4) < at + 2:
        return l4
    body = l4[:at] + b"\0\0" + l4[at + 2:]
    if proto == ICMP:
        pseudo = b""
    elif is_v6(src):
        pseudo = packed(src) + packed(dst) + struct.pack("!IxxxB", len(l4), proto)
    else:
        pseudo = packed(src) + packed(dst) + struct.pack("!xBH", proto, len(l4))
    csum = inet_checksum(pseudo + body)
    if proto == UDP and csum == 0:
        csum = 0xFFFF
    return body[:at] + struct.pack("!H", csum) + body[at + 2:]


def datagram(src: str, dst: str, proto: int, l4: bytes, **ip: object) -> bytes:
    """An IPv4 or IPv6 packet (by the address family) carrying l4, checksummed."""
    l4 = with_checksum(src, dst, proto, l4)
    if is_v6(src):
        return ipv6(src, dst, proto, l4, **ip)  # type: ignore[arg-type]
    return ipv4(src, dst, proto, l4, **ip)  # type: ignore[arg-type]


def frame(src: str, dst: str, proto: int, l4: bytes, *,
          tags: Sequence[tuple[int, int]] = (), mac_dst: bytes = MAC_B,
          mac_src: bytes = MAC_A, **ip: object) -> bytes:
    etype = ETH_IPV6 if is_v6(src) else ETH_IP
    return eth(etype, datagram(src, dst, proto, l4, **ip), tags, mac_dst, mac_src)


def l4_header(proto: int, sport: int, dport: int, *, flags: int = SYN,
              v6: bool = False) -> bytes:
    """A plain L4 header of proto between the ports (ICMP: an echo request
    whose identifier is sport)."""
    if proto == TCP:
        return tcp(sport, dport, flags)
    if proto == UDP:
        return udp(sport, dport)
    if proto in (ICMP, ICMPV6):
        return echo(sport, v6=v6)
    return b"\0" * 8


# -- fragments -------------------------------------------------------------------

def fragment4(src: str, dst: str, proto: int, chunk: bytes, offset: int, more: bool,
              ident: int, **kw: object) -> bytes:
    """One IPv4 fragment carrying chunk at byte offset (floored to 8)."""
    field = (IP_MF if more else 0) | ((offset // 8) & 0x1FFF)
    return eth(ETH_IP, ipv4(src, dst, proto, chunk, ident=ident, frag=field), **kw)


def fragment6(src: str, dst: str, nh: int, chunk: bytes, offset: int, more: bool,
              ident: int, **kw: object) -> bytes:
    """One IPv6 fragment carrying chunk at byte offset (floored to 8)."""
    payload = frag6(nh, offset, more, ident) + chunk
    return eth(ETH_IPV6, ipv6(src, dst, FRAGMENT, payload), **kw)


def split(data: bytes, rng: random.Random, max_piece: int = 64) -> list[tuple[int, bytes]]:
    """data in (offset, chunk) pieces whose offsets are multiples of 8."""
    out, off = [], 0
    while off < len(data):
        n = 8 * rng.randint(1, max(1, max_piece // 8))
        out.append((off, data[off:off + n]))
        off += n
    return out


# -- mutation ------------------------------------------------------------------

BOUNDARY_BYTES = (0x00, 0x01, 0x05, 0x0F, 0x10, 0x3F, 0x40, 0x45, 0x46, 0x4F, 0x5F, 0x60,
                  0x7F, 0x80, 0xFE, 0xFF)


def field_sweep(template: bytes, start: int, end: int) -> Iterator[bytes]:
    """template with one byte in [start, end) set to each boundary value and
    to its neighbours (original ± 1, one bit flipped)."""
    for pos in range(start, min(end, len(template))):
        orig = template[pos]
        values = set(BOUNDARY_BYTES) | {(orig + 1) & 0xFF, (orig - 1) & 0xFF, orig ^ 0x80}
        values.discard(orig)
        for v in sorted(values):
            yield template[:pos] + bytes([v]) + template[pos + 1:]


def with_true_lengths(frm: bytes) -> bytes:
    """frm with its IP length field rewritten to what it really carries (so a
    cut frame is a short packet that does not lie about its length)."""
    off, etype = l3_offset(frm)
    data = bytearray(frm)
    if etype == ETH_IP and len(frm) >= off + 4:
        struct.pack_into("!H", data, off + 2, len(frm) - off)
    elif etype == ETH_IPV6 and len(frm) >= off + 6:
        struct.pack_into("!H", data, off + 4, max(0, len(frm) - off - 40))
    return bytes(data)


def random_ext_chain(rng: random.Random, length: int, last: int,
                     budget: int = 2800) -> tuple[int, bytes]:
    """(first next-header value, bytes) of `length` random extension headers
    ending in `last`, at most `budget` bytes (BPF_PROG_TEST_RUN takes frames
    up to a page); fragment headers among them are atomic, first or later."""
    kinds = [rng.choice((HOPOPTS, ROUTING, DSTOPTS, AH, FRAGMENT)) for _ in range(length)]
    out = b""
    for i, kind in enumerate(kinds):
        nh = kinds[i + 1] if i + 1 < len(kinds) else last
        if kind == FRAGMENT:
            off = rng.choice((0, 0, 8, 16, 24, 1280))
            out += frag6(nh, off, rng.random() < 0.5, rng.getrandbits(32))
        else:
            room = (budget - len(out)) // 8 - 2
            hdrlen = rng.choice((0, 0, 0, 1, 2, 3, 7, 31, 63, 255))
            out += ext(kind, nh, max(0, min(hdrlen, room)))
    return (kinds[0] if kinds else last), out
