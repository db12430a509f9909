"""Real traffic for the firewall tests, stdlib only, so it also runs as a script inside
a namespace (`ip netns exec NS python fw_traffic.py serve|probe`).

    serve --tcp 5001,5002 --udp 5003   listens on every address (IPv4 and IPv6): a TCP
                                       connection gets "hello", a UDP datagram its echo;
                                       prints "ready" once bound
    probe < [{"proto": "tcp", "host": "10.213.0.2", "port": 5001, "source": null}, ...]
                                       prints one outcome per probe: open, blocked
                                       (no answer within the bounded wait) or refused;
                                       "icmp" sends an echo request (raw socket: root)

A firewall that drops shows up as `blocked`; a port with nothing listening as `refused`.
The listener listens on every port a test probes, so `blocked` is the firewall's doing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

# How long a probe waits for an answer before calling the port blocked. On a veth pair an
# allowed connection answers in well under a millisecond.
BLOCKED_AFTER = 0.5


def _dual_stack(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello\n")
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


async def serve(tcp: Sequence[int], udp: Sequence[int]) -> None:
    loop = asyncio.get_running_loop()
    for port in tcp:
        sock = _dual_stack(socket.SOCK_STREAM, port)
        await asyncio.start_server(_hello, sock=sock)
    for port in udp:
        await loop.create_datagram_endpoint(_Echo, sock=_dual_stack(socket.SOCK_DGRAM, port))
    print("ready", flush=True)
    await asyncio.Event().wait()


class _Reply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _ping(host: str, wait: float) -> str:
    """One ICMP (or ICMPv6) echo request over a raw socket (root): open when the reply comes."""
    v6 = ":" in host
    family, proto, request, reply = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0)
    )
    ident, payload = int.from_bytes(os.urandom(2), "big"), os.urandom(8)
    packet = struct.pack("!BBHHH", request, 0, 0, ident, 1) + payload
    if not v6:  # the kernel fills in ICMPv6 checksums itself
        packet = struct.pack("!BBHHH", request, 0, _checksum(packet), ident, 1) + payload
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.sendto(packet, (host, 0))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            if not v6:
                data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets see the IP header
            kind, _, _, got_ident, _ = struct.unpack("!BBHHH", data[:8])
            if kind == reply and got_ident == ident and data[8:] == payload:
                return "open"
    return "blocked"


async def probe(proto: str, host: str, port: int, source: str | None = None, wait: float = BLOCKED_AFTER) -> str:
    """open, blocked or refused (`icmp`: an echo request; the port is ignored)."""
    if proto == "icmp":
        return await asyncio.to_thread(_ping, host, wait)
    local = (source, 0) if source else None
    if proto == "tcp":
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), wait)
        except TimeoutError:
            return "blocked"
        except ConnectionRefusedError:
            return "refused"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return "open"
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Reply, remote_addr=(host, port), local_addr=local)
    token = os.urandom(8).hex().encode()
    try:
        transport.sendto(token)
        try:
            data = await asyncio.wait_for(protocol.answer, wait)
        except TimeoutError:
            return "blocked"
        except ConnectionRefusedError:
            return "refused"
        return "open" if data == token else "garbled"
    finally:
        transport.close()


async def probe_all(probes: Sequence[dict[str, Any]]) -> list[str]:
    """Every probe at once (each with fresh ports, so no conntrack entry is reused)."""
    return list(
        await asyncio.gather(
            *(
                probe(p["proto"], p["host"], int(p["port"]), p.get("source"), p.get("wait", BLOCKED_AFTER))
                for p in probes
            )
        )
    )


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", default="")
    s.add_argument("--udp", default="")
    sub.add_parser("probe")
    args = parser.parse_args(argv)
    if args.command == "serve":
        ports = [[int(p) for p in text.split(",") if p] for text in (args.tcp, args.udp)]
        asyncio.run(serve(*ports))
    else:
        print(json.dumps(asyncio.run(probe_all(json.load(sys.stdin)))))


if __name__ == "__main__":
    main(sys.argv[1:])
