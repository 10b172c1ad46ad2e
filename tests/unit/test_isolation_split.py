""":class:`Isolation` alone: how many runs a failed batch's split takes when the model
fails whatever its inputs, and when callers leave mid-split."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from mandant.errors import ModelFailed, Unavailable
from mandant.scheduling.isolation import Isolation, failure_log


@dataclass
class _Request:
    number: int

    def logged_id(self) -> str:
        return str(self.number)


@dataclass
class _Entry:
    request: _Request
    tenant: str
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _finish(entry: _Entry, *, exc: BaseException) -> None:
    """Answer ``entry`` with ``exc``, unless it was answered (its caller left)."""
    if not entry.future.done():
        entry.future.set_exception(exc)


async def _split_of_a_broken_model(entries: list[_Entry]) -> list[int]:
    """The sizes of the runs a split of ``entries`` takes, the model failing on all."""
    runs: list[int] = []

    async def attempt(part: list[_Entry]) -> tuple[list[_Entry], Exception | None]:
        live = [entry for entry in part if not entry.future.done()]
        if live:
            runs.append(len(live))
            return live, RuntimeError("broken model")
        return live, None

    isolation = Isolation("m", attempt, _finish, model_works=False, failures=failure_log())
    await isolation.run(list(entries), RuntimeError("broken model"))
    return runs


def _batch() -> list[_Entry]:
    """b's one call, then a's eight and c's eight."""
    tenants = ["b"] + ["a"] * 8 + ["c"] * 8
    return [_Entry(_Request(n), tenant) for n, tenant in enumerate(tenants)]


async def test_a_broken_model_is_judged_after_one_run_per_tenant_and_their_ends() -> None:
    batch = _batch()
    runs = await _split_of_a_broken_model(batch)
    assert runs == [1, 8, 8, 1, 1, 1, 1]  # the parts, fewest first; a's and c's ends
    verdicts = [type(entry.future.exception()).__name__ for entry in batch]
    assert verdicts.count("ModelFailed") == 5 and verdicts.count("Unavailable") == 12


async def test_a_tenant_whose_callers_left_does_not_keep_the_others_from_being_judged() -> None:
    """b's caller left before the split: its part runs nothing. The others' parts were
    then not judged together (a part that ran nothing is no failure), and each was
    split again: 10 runs instead of 6, past the 1 + 3 x tenants the module promises,
    for the light tenant's timeout this split order is for."""
    batch = _batch()
    batch[0].future.cancel()
    runs = await _split_of_a_broken_model(batch)
    assert runs == [8, 8, 1, 1, 1, 1]
    assert all(
        isinstance(entry.future.exception(), ModelFailed | Unavailable) for entry in batch[1:]
    )


async def test_a_probe_whose_caller_left_judges_nothing() -> None:
    """a's part is [poisoned, good, last]; the last one's caller leaves before its probe.
    The first probe alone failed, and the model was judged at fault: a's good call was
    answered Unavailable unrun, with one poisoned call of its tenant, not two. The
    split goes on instead."""
    poisoned_a, good, last = (_Entry(_Request(n), "a") for n in range(3))
    poisoned_b = _Entry(_Request(3), "b")
    poison = {id(poisoned_a), id(poisoned_b)}

    async def attempt(part: list[_Entry]) -> tuple[list[_Entry], Exception | None]:
        live = [entry for entry in part if not entry.future.done()]
        if len(live) == 3:
            last.future.cancel()  # as a's part runs: before the probes
        if not live:
            return live, None
        if any(id(entry) in poison for entry in live):
            return live, RuntimeError("poisoned row")
        for entry in live:
            entry.future.set_result("answer")
        return live, None

    isolation = Isolation("m", attempt, _finish, model_works=False, failures=failure_log())
    await isolation.run([poisoned_a, good, last, poisoned_b], RuntimeError("poisoned row"))
    assert good.future.result() == "answer"
    assert isinstance(poisoned_a.future.exception(), ModelFailed)
    assert isinstance(poisoned_b.future.exception(), ModelFailed)
