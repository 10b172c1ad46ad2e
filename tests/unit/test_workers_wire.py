"""The wire between front ends and the engine (``workers/framing.py``, ``workers/ipc.py``):
messages cut from a byte stream however the kernel splits it, tensors as views of the
received bytes, request headers and errors through a round trip."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mandant import errors
from mandant.transport.grpc.codec import ProtoInferRequest
from mandant.types import DATATYPES, TensorHeader
from mandant.workers import ipc
from mandant.workers.engine_link import _frames
from mandant.workers.framing import MessageReader, encode, packb, unpackb
from mandant_client._proto import grpc_service_pb2 as pb

_frame = st.binary(max_size=3000)
_message = st.tuples(
    st.integers(0, 9),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    st.lists(_frame, max_size=4),
)


def _feed(reader: MessageReader, stream: bytes, cuts: list[int]) -> None:
    """``stream`` into ``reader`` as a transport would: into its buffers, in pieces."""
    position = 0
    for cut in [*cuts, len(stream)]:
        end = min(max(cut, position), len(stream))
        while position < end:
            buffer = reader.get_buffer(-1)
            size = min(len(buffer), end - position)
            assert size > 0
            buffer[:size] = stream[position : position + size]
            reader.buffer_updated(size)
            position += size


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(_message, max_size=12),
    cuts=st.lists(st.integers(0, 40_000), max_size=20),
    scratch=st.sampled_from([64, 256, 4096]),
)
def test_messages_come_out_whole_and_in_order_however_the_stream_is_cut(
    messages: list[tuple[int, list[int], list[bytes]]], cuts: list[int], scratch: int
) -> None:
    got: list[tuple[int, Any, list[bytes]]] = []
    reader = MessageReader(lambda k, p, f: got.append((k, p, [bytes(x) for x in f])), scratch)
    stream = b"".join(bytes(part) for m in messages for part in encode(*m))
    _feed(reader, stream, sorted(cuts))
    assert got == [(kind, payload, frames) for kind, payload, frames in messages]


def test_a_large_message_is_received_in_a_buffer_of_its_own_and_viewed_not_copied() -> None:
    got: list[list[memoryview]] = []
    reader = MessageReader(lambda k, p, frames: got.append(frames), scratch_bytes=1024)
    tensor = np.arange(10_000, dtype=np.float32)
    _feed(reader, b"".join(bytes(p) for p in encode(1, [], [tensor.data.cast("B")])), [100])
    (frame,) = got[0]
    view = np.frombuffer(frame, np.float32)
    np.testing.assert_array_equal(view, tensor)
    assert view.base is not None  # a view of the receive buffer


def test_a_request_header_survives_the_round_trip() -> None:
    header = ipc.RequestHeader(
        7,
        "acme",
        "classifier",
        "2",
        "id-1",
        {"priority": 1, "timeout": 5000, "flag": True, "note": "x"},
        ("OUTPUT0",),
        (TensorHeader("INPUT0", "FP32", (2, 256)),),
        0.25,
        1234.5,
        None,
    )
    again = ipc.RequestHeader.unpack(unpackb(packb(header.pack())))
    assert again.pack() == header.pack()


@pytest.mark.parametrize(
    "error",
    [
        errors.Unauthenticated(),
        errors.ModelNotFound("secret", "3"),
        errors.InvalidInput("input 'INPUT0': wrong"),
        errors.ModelFailed("classifier", "id-9"),
        errors.FailedPrecondition("never fits"),
        errors.RateLimited("rate limit exceeded", 0.25),
        errors.QuotaExceeded("quota exceeded", 3600.0),
        errors.QueueFull("queue full", 0.01),
        errors.ServerBusy("busy", 0.5),
        errors.DeadlineExceeded("deadline exceeded"),
        errors.Unavailable("draining"),
    ],
)
def test_domain_errors_cross_with_their_class_message_and_pushback(
    error: errors.MandantError,
) -> None:
    again = ipc.unpack_error(unpackb(packb(ipc.pack_error(error))))
    assert type(again) is type(error) and str(again) == str(error)
    if isinstance(error, errors.ResourceExhausted):
        assert isinstance(again, errors.ResourceExhausted)
        assert again.retry_after_s == error.retry_after_s


def test_an_unexpected_engine_exception_crosses_without_its_text() -> None:
    packed = ipc.pack_error(KeyError("secret internals of tenant acme"))
    again = ipc.unpack_error(unpackb(packb(packed)))
    assert isinstance(again, ipc.EngineFault) and "acme" not in str(again)


def test_inputs_decode_as_views_of_the_frames_and_bad_bytes_framing_is_invalid_input() -> None:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    frame = ipc.tensor_frame(rows, "FP32")
    header = ipc.RequestHeader(
        1, "acme", "m", "", "", {}, (), (TensorHeader("X", "FP32", (2, 4)),), None, 0.0
    )
    decoded = ipc.IpcRequest(header, [frame]).decode_inputs()["X"]
    np.testing.assert_array_equal(decoded, rows)
    assert np.shares_memory(decoded, rows)
    bad = ipc.RequestHeader(
        1, "acme", "m", "", "", {}, (), (TensorHeader("S", "BYTES", (2,)),), None, 0.0
    )
    with pytest.raises(errors.InvalidInput, match="input 'S'"):
        ipc.IpcRequest(bad, [b"\x05\x00\x00\x00ab\x00\x00\x00\x00"]).decode_inputs()


BYTES_SENT = {
    "elements": ([b"", b"a", b"\x00bc"], 3),
    # Long enough for the prefixes the shape claims, checked before anything is split:
    "one element fewer than the shape": ([b"abcdefgh", b"c"], 3),
    "one element more": ([b"ab", b"c", b"d"], 2),
}


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed contents"])
@pytest.mark.parametrize("case", list(BYTES_SENT))
def test_a_front_end_hands_bytes_on_unsplit_and_the_engine_decodes_them_as_one_process(
    monkeypatch: pytest.MonkeyPatch, typed: bool, case: str
) -> None:
    """BYTES cost a Python object an element to split: a front end hands the client's
    own encoding on (raw or typed), so that a call the engine refuses (a rate limit, an
    unknown model) never costs a front end the split; the engine decodes them, after
    admission, with one process's answer, its errors' messages included."""
    items, count = BYTES_SENT[case]
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="S", datatype="BYTES", shape=[count])
    if typed:
        tensor.contents.bytes_contents.extend(items)
    else:
        message.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in items))
    try:
        one_process: object = ProtoInferRequest(message).decode_inputs()["S"].tolist()
    except errors.InvalidInput as exc:
        one_process = str(exc)
    monkeypatch.setattr(ProtoInferRequest, "decode_inputs", _no_decode)
    request = ProtoInferRequest(message)
    frames, deferred, _, is_typed = _frames(request, request.input_headers())
    assert deferred is None and is_typed == typed
    header = ipc.RequestHeader(
        1, "acme", "m", "", "", {}, (), request.input_headers(), None, 0.0, typed=is_typed
    )
    header = ipc.RequestHeader.unpack(unpackb(packb(header.pack())))
    try:
        engine: object = ipc.IpcRequest(header, frames).decode_inputs()["S"].tolist()
    except errors.InvalidInput as exc:
        engine = str(exc)
    assert engine == one_process
    assert (engine == items) == (case == "elements")


def _no_decode(self: ProtoInferRequest) -> None:
    raise AssertionError("a front end decoded the inputs")


@pytest.mark.parametrize("datatype", ["FP32", "BOOL", "INT64", "UINT8"])
@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0, 2), ()])
def test_any_tensor_becomes_a_frame_and_back_empty_ones_too(
    datatype: str, shape: tuple[int, ...]
) -> None:
    """An empty tensor (a request of zero rows, an empty output) is a frame of no
    bytes, not an error; a scalar one of its item."""
    array = np.ones(shape, dtype=DATATYPES[datatype])
    frame = ipc.tensor_frame(array, datatype)
    assert len(frame) == array.nbytes
    back = ipc.decode_frame(frame, TensorHeader("X", datatype, shape))
    assert back.shape == shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


class _Written:
    """A transport that keeps what is written, message by message."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def writelines(self, parts: list[Any]) -> None:
        self.messages.append(b"".join(bytes(p) for p in parts))


async def test_a_front_end_that_was_itself_stopped_gives_the_engine_time_to_read() -> None:
    """A front end stopped longer than its link's ``silent_s`` (a paused container)
    sends, as it wakes, the calls that came meanwhile before it hears from the engine
    again: their give-up time must lie ahead, the engine refusing what it reads after
    it (it refused those "retry", and nobody had given up), and the link must not give
    up on the engine before it."""
    from mandant.workers import engine_link

    link = engine_link.EngineLink(Path("unused"), ping_s=0.5, silent_s=5.0)
    connection = engine_link._Connection(link)
    connection.connection_made(cast(Any, written := _Written()))
    connection.heard_at -= 7.0  # nothing heard, nor looked at, for 7 s: this process
    connection.looked_at -= 7.0  # was stopped
    header = ipc.RequestHeader(
        1, "acme", "echo", "", "", {}, (), (TensorHeader("X", "UINT8", (4,)),), None, 0.0
    )
    connection.send(header, [bytes(4)])
    await asyncio.sleep(0)  # the turn ends: the message goes
    got: list[list[Any]] = []
    _feed(MessageReader(lambda kind, payload, frames: got.append(payload)), written.messages[0], [])
    ((_, _, _, give_up_at),) = got
    assert give_up_at > time.monotonic() + 0.5  # two pings ahead, less this test's time
    assert connection.promised > asyncio.get_running_loop().time() + 0.5
    # A front end that ran all along while the engine said nothing promises nothing
    # more: calls coming all the time must not put its giving up off for ever.
    connection.looked_at = asyncio.get_running_loop().time()
    connection.promised = 0.0
    connection.send(header._replace(rid=2), [bytes(4)])
    await asyncio.sleep(0)
    _feed(MessageReader(lambda kind, payload, frames: got.append(payload)), written.messages[1], [])
    assert got[1][3] < time.monotonic() - 1.0  # the 7 s of silence are past its 5 s
    assert connection.promised == 0.0


async def test_a_turn_of_calls_is_cut_into_messages_the_length_prefix_can_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A front end gathers one loop turn's calls into one message, but sends it once
    their tensors reach MAX_GATHERED_BYTES (the prefix is a u32: 65 calls of 64 MiB
    in one turn overflowed it, and none of that turn's calls was ever answered)."""
    from mandant.workers import engine_link, framing

    monkeypatch.setattr(framing, "MAX_GATHERED_BYTES", 1000)  # both ends' Gathered
    connection = engine_link._Connection(engine_link.EngineLink(Path("unused")))
    written = _Written()
    connection.connection_made(cast(Any, written))
    for rid in range(5):
        header = ipc.RequestHeader(
            rid, "acme", "echo", "", "", {}, (), (TensorHeader("X", "UINT8", (400,)),), None, 0.0
        )
        connection.send(header, [bytes([rid]) * 400])
    assert len(written.messages) == 1  # the first three reached the bound
    await asyncio.sleep(0)  # the turn ends: the rest goes
    got: list[tuple[list[Any], list[bytes]]] = []
    reader = MessageReader(lambda kind, payload, frames: got.append((payload[0], frames)))
    _feed(reader, b"".join(written.messages), [])
    assert [len(requests) for requests, _ in got] == [3, 2]
    frames = [bytes(frame) for _, message_frames in got for frame in message_frames]
    assert frames == [bytes([rid]) * 400 for rid in range(5)]


async def test_an_answer_that_comes_as_its_caller_gives_up_is_its_last_word() -> None:
    """The engine answered a call in the same turn its caller was cancelled (a stream's
    deadline): the answer found its future cancelled and was dropped, the call's
    cancellation then found nothing pending, and the call was counted under no model
    (a fifth of a stream's messages ended by its deadline, with ``workers: 2``)."""
    from mandant.workers import engine_link

    connection = engine_link._Connection(cast(Any, None))
    connection.connection_made(cast(Any, _Written()))
    header = ipc.RequestHeader(
        1, "acme", "echo", "", "", {}, (), (TensorHeader("X", "UINT8", (4,)),), None, 0.0
    )
    future = connection.send(header, [bytes(4)])
    future.cancel()  # the caller gives up; it resumes after the answer came
    answer = [1, "sleepy", "1", ipc.pack_error(errors.DeadlineExceeded("late")), [], ""]
    connection._message(ipc.ANSWERS, [answer], [])
    last = connection.cancel(1)
    assert last is not None and last.done()
    assert last.result()[0][1:3] == ["sleepy", "1"]
    assert connection.cancel(1) is None  # handed over once
