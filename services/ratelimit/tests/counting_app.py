"""The "application" behind a test VM's nginx: answers every request and records it.

    ip netns exec NS python counting_app.py PORT HITS_FILE

Each request appends one JSON line to HITS_FILE (method, path, the X-Real-IP nginx
passed), so a test counts what reached the application. The body says how many
times this path was asked for, so a response served from the cache is recognisable.
`/private/...` answers with `Cache-Control: private`, `/session/...` sets a cookie.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_lock = threading.Lock()
_counts: Counter[str] = Counter()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits_file = ""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with _lock:
            _counts[self.path] += 1
            count = _counts[self.path]
            with open(self.hits_file, "a") as hits:
                record = {"method": self.command, "path": self.path, "real_ip": self.headers.get("X-Real-IP")}
                hits.write(json.dumps(record) + "\n")
        body = f"{self.command} {self.path} #{count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if self.path.startswith("/private/"):
            self.send_header("Cache-Control", "private")
        if self.path.startswith("/session/"):
            self.send_header("Set-Cookie", f"session={count}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    port, hits_file = int(sys.argv[1]), sys.argv[2]
    Handler.hits_file = hits_file
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
