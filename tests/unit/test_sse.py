"""The stream reader: whole events out however the bytes are cut, the answer assembled, garbage
and oversized events refused, linear time."""

from __future__ import annotations

import json
import time

import pytest

from canaryflow.dataplane.sse import MalformedStream, StreamAssembly


def _event(chunk: dict, crlf: bool = False) -> bytes:
    end = b"\r\n\r\n" if crlf else b"\n\n"
    return b"data: " + json.dumps(chunk).encode() + end


def _content(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


STREAM = (
    _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    + b": keep-alive\n\n"
    + _event(_content("Paris "), crlf=True)
    + _event(_content("is the capital."))
    + _event(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "function": {"name": "look", "arguments": '{"q": '},
                            }
                        ]
                    },
                }
            ]
        }
    )
    + _event(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
                }
            ]
        }
    )
    + _event(_content("", "stop"))
    + _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
    + b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, len(STREAM)])
def test_events_come_out_whole_however_the_bytes_are_cut(step: int) -> None:
    assembly = StreamAssembly()
    raws = []
    for i in range(0, len(STREAM), step):
        raws += [e.raw for e in assembly.feed(STREAM[i : i + step], now=float(i))]
    assert b"".join(raws) == STREAM  # forwarded byte for byte
    assert len(raws) == 9
    assert assembly.content == "Paris is the capital."
    assert assembly.assembled_tool_calls() == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "look", "arguments": '{"q": "x"}'},
        }
    ]
    assert assembly.usage == {"prompt_tokens": 7, "completion_tokens": 5}
    assert assembly.finish_reason == "stop" and assembly.done
    assert assembly.token_events == 4  # the empty role chunk is not a token
    assert assembly.rest() == b""


def test_time_to_first_token_and_the_gaps_come_from_token_events() -> None:
    assembly = StreamAssembly()
    assembly.feed(_event({"choices": [{"delta": {"role": "assistant"}}]}), now=1.0)
    assembly.feed(_event(_content("a")), now=2.0)
    assembly.feed(_event(_content("b")), now=2.5)
    assembly.feed(_event(_content("c")), now=3.0)
    assert assembly.first_token_at == 2.0
    assert assembly.inter_token_ms() == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (b"data: {not json}\n\n", "not JSON"),
        (b"data: [1, 2]\n\n", "not a JSON object"),
        (_event({"error": {"message": "overloaded"}}), "overloaded"),
    ],
)
def test_garbage_is_refused_with_what_was_wrong(stream: bytes, words: str) -> None:
    with pytest.raises(MalformedStream, match=words):
        StreamAssembly().feed(stream, now=0.0)


def test_an_event_without_an_end_is_bounded() -> None:
    assembly = StreamAssembly(max_event_bytes=1000)
    assembly.feed(b"data: " + b"x" * 900, now=0.0)
    with pytest.raises(MalformedStream, match="over 1000 bytes"):
        assembly.feed(b"x" * 200, now=0.0)


def test_reading_is_linear_in_the_bytes() -> None:
    """Many tiny events in one feed, and one big event fed a byte at a time: both ~linear."""

    def seconds(n: int) -> float:
        events = _event(_content("w")) * n
        started = time.perf_counter()
        StreamAssembly(max_event_bytes=10**8).feed(events, now=0.0)
        big = StreamAssembly(max_event_bytes=10**8)
        for i in range(n):
            big.feed(b"x" if i else b"data: ", now=0.0)
        return time.perf_counter() - started

    small, large = seconds(5_000), seconds(40_000)
    assert large < small * 8 * 3, (small, large)  # 8x the input, far from 64x
