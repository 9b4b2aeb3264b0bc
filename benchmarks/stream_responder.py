"""A minimal provider that streams: the first token at once, the rest a few milliseconds later.

For the streamed data-plane benchmark (`bench_streaming`): a request with `"stream": true` gets
server-sent events (a first content event written with the head, the remaining events and
`[DONE]` after `--gap-ms`), any other request the canned completion of `responder.py`. With
`--tls-cert/--tls-key` it serves HTTPS, for the TLS-upstream row.

    python -m benchmarks.stream_responder --port 8099 [--gap-ms 5] [--tls-cert C --tls-key K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl

from benchmarks.responder import Responder


def _event(delta: dict[str, object], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "model": "responder",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    data = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)  # one HTTP chunk per event


FIRST = _event({"role": "assistant", "content": "Paris"})
REST = b"".join(
    _event({"content": word}) for word in (" is", " the", " capital", " of", " France.")
) + _event({}, "stop")
DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


class StreamResponder(Responder):
    """`Responder`, but a request asking `"stream": true` gets server-sent events."""

    def __init__(self, gap_s: float) -> None:
        super().__init__()
        self.gap_s = gap_s

    def answer(self, head: bytes, body: bytes, transport: asyncio.WriteTransport) -> None:
        if not head.startswith(b"get /health") and b'"stream":true' in body.replace(b" ", b""):
            transport.write(STREAM_HEAD + FIRST)
            asyncio.get_running_loop().call_later(self.gap_s, self._finish, transport)
        else:
            super().answer(head, body, transport)

    @staticmethod
    def _finish(transport: asyncio.WriteTransport) -> None:
        if not transport.is_closing():
            transport.write(REST + DONE)


async def serve(host: str, port: int, gap_s: float, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: StreamResponder(gap_s), host, port, backlog=4096, ssl=tls
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gap-ms", type=float, default=5.0, help="first token to the rest")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.gap_ms / 1000, tls))


if __name__ == "__main__":
    main()
