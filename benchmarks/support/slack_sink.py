"""Slack's Web API and response_url reduced to "ok", in a process of its own.

The Slack benchmarks measure acks from a client process; had the stand-in for Slack's servers run in that process,
the bot's replies (which the bare app never sends) would take the GIL from the client's own timing threads.

    python -m benchmarks.support.slack_sink    # prints the port it listens on, then serves until killed

`GET /posts` answers how many requests it has had, so that a benchmark can wait until the bot has gone quiet.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

POSTS = itertools.count(1)  # next() is atomic under the GIL: the count is exact with a thread per request
seen = 0


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        global seen
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = next(POSTS)
        self._answer({"ok": True, "channel": "C0BENCH", "ts": f"{time.time():.6f}", "users": []})

    def do_GET(self) -> None:  # noqa: N802
        self._answer({"posts": seen})

    def _answer(self, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        """Quiet: one line per request would drown the benchmark's own output."""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the bot's listener threads of every worker may call at once


def main() -> None:
    server = Server(("127.0.0.1", 0), Sink)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
