"""A small HTTP/1.1 client for the rate-limit tests: n requests pipelined on one
connection, so they reach nginx within a millisecond or two (a rate limit is about
time; a client that spends 0.4 s sending 150 requests would see the refill).

Also runnable inside a VM's network namespace, as a second client address:

    ip netns exec NS python rl_webclient.py URL N [--bind ADDR] [--header 'K: V'] [--method GET]

prints one JSON object per response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    path: str = "/"
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Batch:
    responses: list[Response]
    elapsed: float  # from the first byte sent to the last response read

    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    def count(self, status: int) -> int:
        return sum(1 for r in self.responses if r.status == status)


def _encode(req: Request, host: str) -> bytes:
    lines = [f"{req.method} {req.path} HTTP/1.1"]
    if not any(k.lower() == "host" for k in req.headers):
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in req.headers.items()]
    if req.body or req.method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(req.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + req.body


async def _read_response(reader: asyncio.StreamReader, method: str) -> Response:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if method != "HEAD" and status not in (204, 304):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await reader.readline()).split(b";")[0], 16):
                body += await reader.readexactly(size)
                await reader.readline()
            await reader.readline()
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
    return Response(status, headers, body.decode("utf-8", "replace"))


async def pipelined(
    url: str,
    requests: list[Request],
    *,
    bind: str | None = None,
    timeout: float = 10.0,
) -> Batch:
    """Send every request on one connection at once, then read the responses in order."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    local = (bind, 0) if bind else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), timeout)
    try:
        data = b"".join(_encode(r, parts.netloc) for r in requests)
        started = time.perf_counter()
        writer.write(data)
        await writer.drain()
        responses = []
        for req in requests:
            responses.append(await asyncio.wait_for(_read_response(reader, req.method), timeout))
        return Batch(responses, time.perf_counter() - started)
    finally:
        writer.close()


async def get(url: str, path: str = "/", headers: dict[str, str] | None = None, **kw: object) -> Response:
    batch = await pipelined(url, [Request(path, headers=headers or {})], **kw)  # type: ignore[arg-type]
    return batch.responses[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--bind")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    parts = urlsplit(args.url)
    headers = dict(h.split(": ", 1) for h in args.header)
    req = Request(parts.path or "/", args.method, headers)
    batch = asyncio.run(pipelined(f"{parts.scheme}://{parts.netloc}", [req] * args.count, bind=args.bind))
    json.dump({"elapsed": batch.elapsed, "responses": [asdict(r) for r in batch.responses]}, sys.stdout)


if __name__ == "__main__":
    main()
