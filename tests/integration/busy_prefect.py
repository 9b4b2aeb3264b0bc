"""A proxy in front of a real Prefect server that is busy on request (the `busy_prefect` fixture).

Prefect answers 503 for errors a client may retry (a locked SQLite database), but a real server
cannot be made to do so on demand. This proxy answers the first `times` requests on a path prefix
as Prefect would then, and forwards everything else (method, path, query, headers, body) to the
real server, recording what it saw: tests assert the exact path called and that the call reached
Prefect in the end.

Its own module, not conftest.py: pytest imports conftest.py under a name of its own, so a test
importing it would get a second copy.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# Headers about one connection, not the message: a proxy must not pass them on.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
Headers = list[tuple[str, str]]
Reply = tuple[int, Headers, bytes]
BUSY_BODY = json.dumps({"exception_message": "Service Unavailable"}).encode()  # Prefect's own


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # with the query, as the client sent it
    status: int  # what the client was answered
    body: bytes


class BusyPrefect:
    """`busy.fail("/api/flow_runs/<id>/resume", times=2)`, then point a client at `busy.api_url`."""

    def __init__(self, upstream: str) -> None:
        self._upstream = httpx.Client(base_url=upstream, timeout=30)
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._retry_after: str | None = None
        self.seen: list[Seen] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self.api_url = f"http://127.0.0.1:{self._server.server_address[1]}/api"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(self, prefix: str, times: int, retry_after: str | None = "0") -> None:
        """Answer 503 to the next `times` requests whose path starts with `prefix`. The default
        Retry-After of 0 keeps the clients' backoff (Prefect's own is 2, 4, 8 s) out of the test;
        None answers exactly as Prefect does."""
        with self._lock:
            self._busy[prefix] = times
            self._retry_after = retry_after

    def calls(self, prefix: str) -> list[tuple[str, str, int]]:
        """(method, path, status answered) of every request under `prefix`, in order."""
        with self._lock:
            return [(s.method, s.path, s.status) for s in self.seen if s.path.startswith(prefix)]

    def bodies(self, prefix: str) -> list[dict[str, object]]:
        with self._lock:
            return [json.loads(s.body) for s in self.seen if s.path.startswith(prefix) and s.body]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()

    def answer(self, method: str, path: str, headers: Headers, body: bytes) -> Reply:
        """503 while `path` is busy, else the real server's answer, as it was sent."""
        with self._lock:
            prefix = next((p for p, n in self._busy.items() if n > 0 and path.startswith(p)), None)
            if prefix is not None:
                self._busy[prefix] -= 1
                self.seen.append(Seen(method, path, 503, body))
                busy = [("content-type", "application/json")]
                if self._retry_after is not None:
                    busy.append(("retry-after", self._retry_after))
                return 503, busy, BUSY_BODY
        sent = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        request = self._upstream.build_request(method, path, headers=sent, content=body)
        response = self._upstream.send(request, stream=True)
        try:
            raw = b"".join(response.iter_raw())  # still encoded: content-encoding stays true
        finally:
            response.close()
        with self._lock:
            self.seen.append(Seen(method, path, response.status_code, body))
        kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        return response.status_code, kept, raw


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real server does

    def _proxy(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        proxy: BusyPrefect = self.server.proxy  # type: ignore[attr-defined]
        status, headers, data = proxy.answer(self.command, self.path, self.headers.items(), body)
        self.send_response_only(status)  # Date and Server come from upstream
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

    def log_message(self, *args: object) -> None:
        pass
