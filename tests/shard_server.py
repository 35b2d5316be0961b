"""A real HTTP server on 127.0.0.1 that serves a folder the way a storage bucket does: GET with
byte ranges (206 Partial Content), 404 for what is not there, and, for the tests, a throttle
(so a fetch can be killed mid-file) and a number of 503 answers before the first success."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        self.throttle_s = 0.0  # seconds slept per 16 KiB sent
        self.fail_first = 0  # answer this many GETs with 503 first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/click-me/"


class _Handler(BaseHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        rng = self.headers.get("Range")
        if self.server.fail_first > 0:
            self.server.fail_first -= 1
            return self._status(503, rng)
        relative = self.path.split("?")[0].removeprefix("/click-me/").lstrip("/")  # bucket-relative
        path = (self.server.root / relative).resolve()
        if self.server.root.resolve() not in path.parents or not path.is_file():
            return self._status(404, rng)
        data = path.read_bytes()
        start = 0
        if rng:
            match = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(match.group(1)) if match else 0
            if start >= len(data):
                return self._status(416, rng)
        self.server.requests.append((self.path, rng, 206 if rng else 200))
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            for offset in range(start, len(data), 16384):
                self.wfile.write(data[offset : offset + 16384])
                if self.server.throttle_s:
                    time.sleep(self.server.throttle_s)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _status(self, code: int, rng) -> None:
        self.server.requests.append((self.path, rng, code))
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def serving(root: Path):
    """A ShardServer for ``root`` running in a thread for the duration of the block."""
    server = ShardServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
