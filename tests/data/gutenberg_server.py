"""A tiny threaded HTTP server on 127.0.0.1 that serves a gutenberg.org-layout tree with scriptable faults.

Tests write books into `root` (`cache/epub/{id}/pg{id}.txt`, `files/{id}/{id}-0.txt`, ...), queue faults per
path, and read back what the scraper asked for. Faults are consumed one per request, in order:
  Fault.status(500)                      answer with that status (a 429/503 may carry Retry-After)
  Fault.truncated(fraction)              promise the full Content-Length, send only part, close the connection
  Fault.slow(seconds)                    wait before answering (to trip the client's timeout)
Unknown paths answer 404. `fail_all_after(n)` makes every request after the n-th served book answer 500,
like a server that dies mid-run.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    kind: str  # "status", "truncated" or "slow"
    status: int = 500
    retry_after: str | None = None
    fraction: float = 0.5
    seconds: float = 0.0

    @classmethod
    def status_code(cls, status: int, retry_after: str | None = None) -> Fault:
        return cls("status", status=status, retry_after=retry_after)

    @classmethod
    def truncated(cls, fraction: float = 0.5) -> Fault:
        return cls("truncated", fraction=fraction)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls("slow", seconds=seconds)


@dataclass
class Request:
    path: str
    user_agent: str
    started: float  # time.monotonic() when the request arrived
    status: int = 0


@dataclass
class ServerState:
    root: Path
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    books_served: int = 0
    fail_after: int | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output quiet
        pass

    def do_GET(self):
        state = self.server.state
        request = Request(self.path, self.headers.get("User-Agent", ""), time.monotonic())
        with state.lock:
            state.requests.append(request)
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            queue = state.faults.get(self.path)
            fault = queue.pop(0) if queue else None
            dead = state.fail_after is not None and state.books_served >= state.fail_after
        try:
            self._answer(state, request, fault, dead)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _answer(self, state: ServerState, request: Request, fault: Fault | None, dead: bool) -> None:
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        if dead:
            return self._status(request, 500)
        if fault is not None and fault.kind == "status":
            return self._status(request, fault.status, fault.retry_after)
        file = (state.root / self.path.lstrip("/")).resolve()
        if not file.is_relative_to(state.root.resolve()) or not file.is_file():
            return self._status(request, 404)
        body = file.read_bytes()
        request.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if fault is not None and fault.kind == "truncated":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: int(len(body) * fault.fraction)])
            self.wfile.flush()
            self.close_connection = True
            return None
        self.end_headers()
        self.wfile.write(body)
        with state.lock:
            state.books_served += 1
        return None

    def _status(self, request: Request, status: int, retry_after: str | None = None) -> None:
        request.status = status
        body = f"status {status}\n".encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request, client_address):
        """A client that hung up (after a timeout or a truncated body) is part of the test, not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class GutenbergServer:
    """`with GutenbergServer(root) as server:` serves `root` at `server.base_url` until the block ends."""

    def __init__(self, root: Path):
        self.state = ServerState(root=Path(root))
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        # A short poll interval makes shutdown (once per test) take milliseconds instead of half a second.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="gutenberg-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> GutenbergServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_faults(self, path: str, *faults: Fault) -> None:
        with self.state.lock:
            self.state.faults.setdefault(path, []).extend(faults)

    def fail_all_after(self, books: int | None) -> None:
        """Answer 500 to everything once `books` bodies have been served (None: heal)."""
        with self.state.lock:
            self.state.fail_after = books

    def requests_for(self, path: str) -> list[Request]:
        with self.state.lock:
            return [request for request in self.state.requests if request.path == path]

    def paths_requested(self) -> list[str]:
        with self.state.lock:
            return [request.path for request in self.state.requests]

    @property
    def max_in_flight(self) -> int:
        return self.state.max_in_flight


def write_layout_book(root: Path, book_id: int, text: str, form: str = "cache") -> Path:
    """Place a book in the tree under one of the URL forms: "cache" (pg{id}.txt), "files-0" or "files"."""
    relative = {
        "cache": f"cache/epub/{book_id}/pg{book_id}.txt",
        "files-0": f"files/{book_id}/{book_id}-0.txt",
        "files": f"files/{book_id}/{book_id}.txt",
    }[form]
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path
