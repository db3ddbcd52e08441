"""Every parse path: Ethernet, 802.1Q, IPv4 (+options), IPv6 (+extension
headers), TCP, UDP, ICMP, ICMPv6 — and what happens to packets that lie."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6MLReport,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from microseg.kernel.abi import Direction, EventType, Reason, Verdict

from .harness import MAC_A, MAC_B, Harness, eth, tcp
from .policies import DB4, DB6, WEB4, WEB6, shop


def invalid(dp: Harness, pkt) -> None:
    out = dp.send(pkt)
    assert out.dropped, "a malformed packet must be dropped"
    e = out.verdict
    assert (e.type, e.verdict, e.reason) == (EventType.DROP, Verdict.DROPPED, Reason.INVALID)


def allowed(dp: Harness, pkt) -> None:
    out = dp.send(pkt)
    assert out.passed
    assert (out.verdict.verdict, dp.rule_name(out.verdict.rule_id)) == (Verdict.ALLOWED,
                                                                          "web-to-db")


@pytest.fixture(autouse=True)
def _policy(dp: Harness) -> None:
    dp.install(shop())


class TestPassThrough:
    def test_arp_passes_and_is_counted(self, dp: Harness) -> None:
        pkt = Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=WEB4, pdst=DB4)
        out = dp.send(pkt)
        assert out.passed and out.events == []
        assert dp.stats()[(Direction.INGRESS, Verdict.ALLOWED, Reason.NON_IP)][0] == 1

    @pytest.mark.parametrize("icmp", [
        ICMPv6ND_NS(tgt=DB6), ICMPv6ND_NA(tgt=DB6), ICMPv6ND_RS(), ICMPv6ND_RA(),
        ICMPv6MLReport(),
    ], ids=["NS", "NA", "RS", "RA", "MLD"])
    def test_ipv6_neighbour_discovery_passes(self, dp: Harness, icmp) -> None:
        out = dp.send(eth(IPv6(src="fe80::1", dst="ff02::1", hlim=255) / icmp))
        assert out.passed and out.events == []
        assert dp.stats()[(Direction.INGRESS, Verdict.ALLOWED, Reason.NEIGHBOR)][0] == 1


class TestValidPaths:
    def test_vlan_tagged(self, dp: Harness) -> None:
        allowed(dp, Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=42) / IP(src=WEB4, dst=DB4)
                / TCP(sport=1, dport=5432, flags="S"))

    def test_qinq(self, dp: Harness) -> None:
        allowed(dp, Ether(src=MAC_A, dst=MAC_B) / Dot1AD(vlan=7) / Dot1Q(vlan=42)
                / IP(src=WEB4, dst=DB4) / TCP(sport=1, dport=5432, flags="S"))

    def test_ipv4_options(self, dp: Harness) -> None:
        pkt = eth(IP(src=WEB4, dst=DB4, options=[b"\x01\x01\x01\x00"])
                  / TCP(sport=1, dport=5432, flags="S"))
        assert pkt[IP].ihl is None or True  # scapy fills ihl=6 on build
        allowed(dp, pkt)

    def test_tcp_options(self, dp: Harness) -> None:
        allowed(dp, eth(IP(src=WEB4, dst=DB4) / TCP(
            sport=1, dport=5432, flags="S",
            options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)])))

    def test_ethernet_padding_is_not_ip_payload(self, dp: Harness) -> None:
        pkt = bytes(tcp(WEB4, DB4, 1, 5432)) + b"\0" * 20
        allowed(dp, pkt)

    @pytest.mark.parametrize("ext", [
        IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
        IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt(),
        IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt(),
    ], ids=["hbh", "dst", "routing", "chain3", "chain4"])
    def test_ipv6_extension_headers(self, dp: Harness, ext) -> None:
        allowed(dp, eth(IPv6(src=WEB6, dst=DB6) / ext / TCP(sport=1, dport=5432, flags="S")))

    def test_ipv6_no_next_header_is_judged_by_policy(self, dp: Harness) -> None:
        out = dp.send(eth(IPv6(src=WEB6, dst=DB6, nh=59)))
        assert out.dropped and out.verdict.reason == Reason.DEFAULT


def _ipv4(src: str, dst: str, payload: bytes, *, ihl: int = 5, tot_len: int | None = None,
          version: int = 4, proto: int = 6, frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0,
                      tot_len if tot_len is not None else 4 * ihl + len(payload), 1, frag, 64,
                      proto, 0, bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    hdr += b"\0" * (4 * ihl - 20) if ihl > 5 else b""
    return bytes(Ether(src=MAC_A, dst=MAC_B, type=0x0800)) + hdr[:max(20, 4 * ihl)] + payload


def _tcp_hdr(dport: int = 5432, doff: int = 5, flags: int = 0x02) -> bytes:
    return struct.pack("!HHIIBBHHH", 1234, dport, 0, 0, doff << 4, flags, 1024, 0, 0) + \
        b"\0" * max(0, 4 * doff - 20)


def _vlan(ethertype: int) -> bytes:
    """BPF_PROG_TEST_RUN refuses frames whose outer ethertype is IP and whose
    IP header is cut short; a VLAN tag in front gets them to the program, as
    a real wire would."""
    return bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=5, type=ethertype))


class TestMalformed:
    def test_truncated_ip_header(self, dp: Harness) -> None:
        invalid(dp, _vlan(0x0800) + b"\x45\x00\x00")

    def test_wrong_ip_version(self, dp: Harness) -> None:
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr(), version=6))

    @pytest.mark.parametrize("ihl", [0, 4])
    def test_ihl_too_small(self, dp: Harness, ihl: int) -> None:
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr(), ihl=ihl, tot_len=40))

    def test_ihl_beyond_packet(self, dp: Harness) -> None:
        data = _ipv4(WEB4, DB4, b"", ihl=15, tot_len=60)[:14 + 24]
        invalid(dp, data)
        invalid(dp, _vlan(0x0800) + data[14:])

    def test_tot_len_beyond_packet(self, dp: Harness) -> None:
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr(), tot_len=400))

    def test_tot_len_shorter_than_header(self, dp: Harness) -> None:
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr(), tot_len=12))

    def test_tcp_header_cut_by_ip_length(self, dp: Harness) -> None:
        """IP says 8 bytes of TCP follow; padding after them is not TCP."""
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr(), tot_len=28))

    def test_truncated_tcp(self, dp: Harness) -> None:
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr()[:10]))

    @pytest.mark.parametrize("doff", [0, 4, 15])
    def test_bad_tcp_data_offset(self, dp: Harness, doff: int) -> None:
        invalid(dp, _ipv4(WEB4, DB4, _tcp_hdr(doff=5)[:12] + bytes([doff << 4, 0x02])
                          + b"\0" * 6))

    @pytest.mark.parametrize("flags", ["", "FSRPAU", "SF", "SR", "F", "FPU", "SRA"])
    def test_impossible_tcp_flags(self, dp: Harness, flags: str) -> None:
        invalid(dp, tcp(WEB4, DB4, 1, 5432, flags))

    @pytest.mark.parametrize("ulen", [0, 7, 200])
    def test_bad_udp_length(self, dp: Harness, ulen: int) -> None:
        invalid(dp, eth(IP(src=WEB4, dst=DB4) / UDP(sport=1, dport=53, len=ulen) / Raw(b"x" * 8)))

    def test_truncated_icmp(self, dp: Harness) -> None:
        invalid(dp, _ipv4(WEB4, DB4, b"\x08\x00\x00", proto=1))

    def test_truncated_ipv6(self, dp: Harness) -> None:
        invalid(dp, _vlan(0x86DD) + b"\x60" + b"\0" * 20)

    def test_ipv6_payload_length_beyond_packet(self, dp: Harness) -> None:
        pkt = IPv6(src=WEB6, dst=DB6, plen=500) / TCP(sport=1, dport=5432, flags="S")
        invalid(dp, eth(pkt))

    def test_ipv6_wrong_version(self, dp: Harness) -> None:
        raw = bytearray(bytes(eth(IPv6(src=WEB6, dst=DB6) / TCP(dport=5432, flags="S"))))
        raw[14] = 0x40
        invalid(dp, bytes(raw))

    @pytest.mark.parametrize("length", [5, 10])
    def test_ipv6_extension_chain_too_long(self, dp: Harness, length: int) -> None:
        """More than four extension headers (bpf/lib/parse.h MAX_IPV6_EXT):
        dropped as invalid, never walked on."""
        chain = IPv6ExtHdrDestOpt()
        for _ in range(length - 1):
            chain = chain / IPv6ExtHdrDestOpt()
        invalid(dp, eth(IPv6(src=WEB6, dst=DB6) / chain / TCP(sport=1, dport=5432, flags="S")))

    def test_ipv6_extension_beyond_payload(self, dp: Harness) -> None:
        raw = bytearray(bytes(eth(IPv6(src=WEB6, dst=DB6) / IPv6ExtHdrDestOpt()
                                  / TCP(sport=1, dport=5432, flags="S"))))
        raw[14 + 40 + 1] = 200  # hdrlen: far past the payload
        invalid(dp, bytes(raw))

    def test_garbage_after_ethernet(self, dp: Harness) -> None:
        invalid(dp, bytes(Ether(src=MAC_A, dst=MAC_B, type=0x0800)) + b"\xff" * 40)

    def test_drop_is_counted_by_reason(self, dp: Harness) -> None:
        for _ in range(3):
            dp.send(tcp(WEB4, DB4, 1, 5432, "SF"))
        assert dp.stats()[(Direction.INGRESS, Verdict.DROPPED, Reason.INVALID)][0] == 3
