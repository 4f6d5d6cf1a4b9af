"""A real threaded HTTP file server on 127.0.0.1 with Range support and fault injection.

Tests drive the download stage against this server instead of mocking ``requests``: the
client's retries, Range resumption and verification run over a real socket. Faults are set
per path by the test (``server.faults["/a.txt"] = Fault(status=500, times=2)``) and every
request is recorded (``server.requests["/a.txt"]``) so a test can assert that a resume
really sent ``Range`` rather than downloading everything again.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    """What to do wrong for one path.

    ``status``: answer this HTTP status (e.g. 404, 500, 503) instead of the file.
    ``drop_after``: send headers with the full Content-Length, then only this many body
    bytes, then close the connection.
    ``stall``: sleep this many seconds before answering (a hung server; the client times out).
    ``status`` / ``stall`` / ``drop_after`` (checked in that order; set one) apply to the first
    ``times`` requests for the path after the fault is set (``None``: every request).
    Always, regardless of ``times``: ``ignore_range`` answers 200 with the whole body, as some
    servers do; ``rate`` limits the body to that many bytes per second (so a test can kill a
    client mid-file). ``retry_after`` adds that header to ``status`` answers.
    """

    status: int | None = None
    drop_after: int | None = None
    stall: float | None = None
    times: int | None = 1
    ignore_range: bool = False
    rate: int | None = None
    retry_after: str | None = None
    used: int = 0  # how many requests this fault has already affected

    def take(self) -> bool:
        """Consume one use of the status/drop fault; False once it is exhausted."""
        if self.times is not None and self.used >= self.times:
            return False
        self.used += 1
        return True


@dataclass(frozen=True)
class Request:
    """One request as the server saw it and answered it."""

    method: str
    range: str | None
    status: int


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _answer_status(self, path: str, status: int, extra: dict[str, str] | None = None) -> None:
        body = f"{status} for {path}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, *, body: bool) -> None:
        owner = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        with owner.lock:
            fault = owner.faults.get(path)
            status_fault = fault is not None and fault.status is not None and fault.take()
            stall = (fault.stall if not status_fault and fault is not None and fault.stall is not None
                     and fault.take() else None)
            drop_fault = (not status_fault and stall is None and fault is not None
                          and fault.drop_after is not None and fault.take())
            ignore_range = fault is not None and fault.ignore_range
            rate = fault.rate if fault is not None else None

        if stall is not None:
            time.sleep(stall)  # the client gives up meanwhile; then answer normally into the void

        def record(status: int) -> None:
            with owner.lock:
                owner.requests[path].append(Request(self.command, range_header, status))

        if status_fault:
            assert fault is not None and fault.status is not None
            record(fault.status)
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
            self._answer_status(path, fault.status, extra)
            return

        file = owner.resolve(path)
        if file is None:
            record(404)
            self._answer_status(path, 404)
            return
        data = file.read_bytes()
        size = len(data)
        start, end, status = 0, size, 200
        m = _RANGE.match(range_header or "")
        if m and not ignore_range and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix range: the last N bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                record(416)
                self._answer_status(path, 416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "none" if ignore_range else "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        payload = memoryview(data)[start:end]
        if drop_fault:
            assert fault is not None and fault.drop_after is not None
            self._write(payload[: fault.drop_after], rate)
            self.wfile.flush()
            self.close_connection = True  # the server then shuts the socket: a short body
            return
        self._write(payload, rate)

    def _write(self, payload: memoryview, rate: int | None) -> None:
        if rate is None:
            self.wfile.write(payload)
            return
        block = 32 * 1024
        for i in range(0, len(payload), block):
            self.wfile.write(payload[i : i + block])
            self.wfile.flush()
            time.sleep(block / rate)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "TestHTTPServer"

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client that hung up (as downloaders do after an error status) is normal
        super().handle_error(request, client_address)


class TestHTTPServer:
    """Serve ``root_dir`` over HTTP on 127.0.0.1 (a free port) from a background thread.

    Use as a context manager or call :meth:`close`. ``faults`` maps a URL path ("/a.txt") to
    a :class:`Fault`; ``requests`` maps a path to the list of :class:`Request` it received.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, root_dir: str | Path):
        self.root = Path(root_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.faults: dict[str, Fault] = {}
        self.requests: defaultdict[str, list[Request]] = defaultdict(list)
        self.lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"test-http-{self.port}", daemon=True,
        )
        self._thread.start()
        self._closed = False

    def url(self, path: str) -> str:
        """The URL of ``path`` (relative to the root, with or without a leading slash)."""
        return f"http://{self.host}:{self.port}/{urllib.parse.quote(path.lstrip('/'))}"

    def resolve(self, url_path: str) -> Path | None:
        """The file under the root that ``url_path`` names, or None (missing, a dir, outside)."""
        p = (self.root / url_path.lstrip("/")).resolve()
        if not p.is_relative_to(self.root) or not p.is_file():
            return None
        return p

    def count(self, path: str) -> int:
        """How many requests ``path`` has received (path with a leading slash)."""
        with self.lock:
            return len(self.requests.get(path, []))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "TestHTTPServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
