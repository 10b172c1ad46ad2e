"""The count of each tenant's unread answers (``transport/unread.py``): a tenant
is refused only once what it holds reaches the bound (an answer alone never is), each
refusal is counted, other tenants are not touched (its call is refused before it takes
a place), and what is written is forgotten."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from mandant.scheduling.door import CallCap, FrontDoor
from mandant.transport.grpc.gateway import Access, Gate
from mandant.transport.unread import UNREAD_REASON, AnswersUnread, UnreadAnswers
from mandant.types import Call, InferResponse, Tenant
from mandant_client._proto import grpc_service_pb2 as pb
from tests.fakes import RecordingObserver
from tests.unit.test_gate_reports import _Context, _refuse_admin


def test_a_tenant_is_refused_only_at_the_bound_and_alone() -> None:
    observer = RecordingObserver()
    unread = UnreadAnswers(100, observer)
    unread.check("acme")  # nothing held
    unread.hold("acme", 250)  # one answer larger than the bound is held all the same
    with pytest.raises(AnswersUnread) as refused:
        unread.check("acme")
    assert refused.value.retry_after_s == 1.0
    assert "250 bytes of this tenant's answers are not read yet" in str(refused.value)
    unread.check("globex")  # another tenant's calls go on
    assert observer.rejections == [("acme", UNREAD_REASON, "")]


def test_an_answer_past_twice_the_bound_is_refused_as_it_is_handed_over_unless_alone() -> None:
    """Calls that all passed :meth:`check` while nothing was held: each answer is
    taken as it comes, and one that would take the tenant past twice the bound is
    refused (not held; a batch's answers to a client that reads them at once are all
    held for a moment); one alone is taken whatever its size, one without tensors
    always."""
    observer = RecordingObserver()
    unread = UnreadAnswers(100, observer)
    unread.take("acme", 250)  # alone
    unread.release("acme", 250)
    unread.take("acme", 150)
    with pytest.raises(AnswersUnread):  # new calls: at the bound
        unread.check("acme")
    unread.take("acme", 50)  # to twice the bound exactly
    with pytest.raises(AnswersUnread, match=r"200 bytes of this tenant's answers .*at most 200"):
        unread.take("acme", 1)
    unread.take("acme", 0)  # nothing to hold
    assert unread.held("acme") == 200
    unread.release("acme", 50)
    with pytest.raises(AnswersUnread):
        unread.check_answer("acme", 51)
    unread.take("acme", 50)
    unread.take("globex", 200)  # another tenant's count is its own
    assert observer.rejections == [("acme", UNREAD_REASON, "")] * 3


def test_written_answers_are_forgotten() -> None:
    unread = UnreadAnswers(100, RecordingObserver())
    unread.hold("acme", 60)
    unread.hold("acme", 60)
    with pytest.raises(AnswersUnread):
        unread.check("acme")
    unread.release("acme", 60)
    assert unread.held("acme") == 60
    unread.check("acme")  # below the bound again
    unread.release("acme", 60)
    assert unread.held("acme") == 0
    unread.hold("acme", 0)  # an answer without tensors holds nothing
    assert unread.held("acme") == 0


async def test_an_inference_call_at_the_bound_is_refused_before_it_takes_a_place() -> None:
    """The gate checks before the cap and the door: with the cap full (b's call inside,
    b's next at the door), a's call over its bound is refused for its unread answers
    and takes nobody's place (it used to shed b's waiting call, then be refused)."""
    keys = {"key-a": Tenant("a"), "key-b": Tenant("b")}
    observer, cap, door = RecordingObserver(), CallCap(2), FrontDoor(1)
    unread = UnreadAnswers(100, observer)
    unread.hold("a", 1000)
    gate = Gate(lambda key: keys[key or ""], _refuse_admin, observer, cap, door, unread=unread)
    release = asyncio.Event()

    async def behavior(request: object, call: Call, context: object) -> pb.ModelInferResponse:
        await release.wait()
        return pb.ModelInferResponse()

    handler = gate.unary(
        "/inference.GRPCInferenceService/ModelInfer",
        Access.TENANT,
        pb.ModelInferRequest,
        behavior,
        pb.ModelInferResponse.SerializeToString,
        fair=True,
    ).stream_unary

    async def call(key: str) -> tuple[grpc.StatusCode, str] | None:
        context = _Context(key, observer, cap)
        with contextlib.suppress(grpc.aio.AbortError):
            await handler(None, context)
        return context.aborted

    inside = asyncio.create_task(call("key-b"))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(call("key-b"))  # at the door, the cap's last place
    await asyncio.sleep(0.01)
    refused = await asyncio.wait_for(call("key-a"), 5)  # not let in to wait for release
    assert refused is not None and refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "answers are not read yet" in refused[1]
    release.set()
    assert await inside is None and await waiting is None  # b's calls both served
    assert observer.rejections == [("a", UNREAD_REASON, "")]


def test_an_answer_counts_its_bytes_tensors_by_their_elements() -> None:
    """A BYTES output counts what is sent: each element and its 4-byte length (its
    array holds only references: 8 bytes an element, 32 for 4 MiB of answer)."""
    words = np.array([b"x" * 1024] * 4, dtype=object)
    scores = np.zeros((2, 3), np.float32)
    answer = InferResponse("m", "1", "", {"WORDS": words, "SCORES": scores})
    assert answer.nbytes == 4 * (1024 + 4) + 24
