"""A stand-in for Prefect's API that is busy on request (the `busy_prefect` fixture serves it).

Its own module, not conftest.py: tests set its class attributes, and conftest.py is imported by
pytest under a name of its own, so a test importing it would get a second, unused copy.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import ClassVar


class BusyPrefect(BaseHTTPRequestHandler):
    """Prefect's API at the HTTP boundary, answering 503 (as it does for a locked database) to the
    first `busy` POSTs, then `ok`. A real server cannot be made to do that on demand."""

    busy: ClassVar[int] = 0
    ok: ClassVar[tuple[int, dict[str, object]]] = (200, {})
    posts: ClassVar[list[dict[str, object]]] = []

    def do_GET(self) -> None:  # a deployment lookup
        self._answer(200, {"id": "deployment-1"})

    def do_POST(self) -> None:
        BusyPrefect.posts.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        if len(BusyPrefect.posts) <= BusyPrefect.busy:
            self._answer(503, {"exception_message": "Service Unavailable"})
        else:
            self._answer(*BusyPrefect.ok)

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass
