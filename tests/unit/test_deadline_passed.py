"""The gate's reading of a call's deadline: a call its client cancelled just before the
server's view of the deadline was given up at the client's (earlier) deadline."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
import pytest

from mandant.errors import DeadlineExceeded, InvalidInput
from mandant.transport.grpc.gateway import CANCELLED_AT_DEADLINE_S, abort, deadline_passed


class _Remaining:
    def __init__(self, remaining_s: float | None) -> None:
        self._remaining_s = remaining_s

    def time_remaining(self) -> float | None:
        return self._remaining_s


def _passed(remaining_s: float | None, slack_s: float = 0.0) -> bool:
    return deadline_passed(cast(Any, _Remaining(remaining_s)), slack_s)


def test_no_deadline_never_passes() -> None:
    assert not _passed(None) and not _passed(None, CANCELLED_AT_DEADLINE_S)


def test_a_deadline_passes_at_zero_left() -> None:
    assert _passed(0.0) and _passed(-1.0) and not _passed(0.01)


def test_a_cancellation_close_to_the_deadline_counts_as_the_deadline() -> None:
    assert _passed(0.03, CANCELLED_AT_DEADLINE_S)
    assert not _passed(CANCELLED_AT_DEADLINE_S + 0.5, CANCELLED_AT_DEADLINE_S)


class _Aborting(_Remaining):
    def __init__(self, remaining_s: float | None) -> None:
        super().__init__(remaining_s)
        self.sent: list[grpc.StatusCode] = []

    def set_trailing_metadata(self, trailers: object) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.sent.append(code)
        raise grpc.aio.AbortError()


async def test_a_refusal_past_the_deadline_is_not_sent() -> None:
    """gRPC has ended such a call: a status sent then fails in its core, which logs an
    ERROR with a traceback (17 of 1,500 calls timing out in a queue did)."""
    late = _Aborting(0.0)
    with pytest.raises(asyncio.CancelledError):
        await abort(cast(Any, late), DeadlineExceeded("deadline exceeded while queued"))
    assert late.sent == []
    early = _Aborting(1.0)
    with pytest.raises(grpc.aio.AbortError):
        await abort(cast(Any, early), InvalidInput("no"))
    assert early.sent == [grpc.StatusCode.INVALID_ARGUMENT]
