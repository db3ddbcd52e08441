"""Echo servers and probes that run inside lab namespaces.

    python -m microseg.labtraffic serve --tcp 80 --udp 53   # prints "ready"
    python -m microseg.labtraffic probe tcp 10.203.0.20 80  # exit 0 if echoed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in tcp_ports:
        # One dual-stack socket per port: [::] also accepts IPv4.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        servers.append(await asyncio.start_server(_tcp_echo, sock=sock, backlog=1024))
    for port in udp_ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
    print("ready", flush=True)
    await asyncio.Event().wait()


def probe(proto: str, host: str, port: int, timeout: float, payload: bytes = b"ping") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.sendall(payload)
            return s.recv(len(payload)) == payload
        except OSError:
            return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microseg.labtraffic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    p = sub.add_parser("probe")
    p.add_argument("proto", choices=["tcp", "udp"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=1.0)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.tcp, args.udp))
        return 0
    return 0 if probe(args.proto, args.host, args.port, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
