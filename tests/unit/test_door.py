"""The front door: calls walk in while slots are free; beyond that each freed slot
goes to the next waiting tenant by weighted round robin, so a light tenant waits for
about one slot, not for a flood's backlog. Cancellation never loses or leaks a slot."""

from __future__ import annotations

import asyncio

import pytest

from mandant.scheduling.door import FrontDoor
from mandant.types import Tenant
from tests.fakes import settle

A, B = Tenant("a"), Tenant("b")


async def _queue(door: FrontDoor, tenant: Tenant, order: list[str]) -> asyncio.Task[None]:
    async def enter() -> None:
        await door.enter(tenant)
        order.append(tenant.id)

    task = asyncio.create_task(enter())
    await settle()
    return task


async def test_calls_walk_in_while_slots_are_free() -> None:
    door = FrontDoor(2)
    await door.enter(A)
    await door.enter(B)
    assert (door.busy, door.waiting) == (2, 0)
    door.leave()
    assert door.busy == 1


async def test_a_light_tenant_gets_the_next_slot_ahead_of_a_flood() -> None:
    door = FrontDoor(2)
    await door.enter(A)
    await door.enter(A)
    order: list[str] = []
    flood = [await _queue(door, A, order) for _ in range(20)]
    light = await _queue(door, B, order)
    assert door.waiting == 21
    door.leave()
    await settle()
    door.leave()
    await settle()
    assert "b" in order[:2]  # served within two freed slots, ahead of 19 of a's calls
    assert door.busy == 2
    for _ in range(40):
        door.leave()
        await settle()
    await asyncio.gather(*flood, light)
    assert sorted(order) == ["a"] * 20 + ["b"]


async def test_weights_share_the_slots() -> None:
    door = FrontDoor(1)
    await door.enter(A)
    order: list[str] = []
    heavy = Tenant("h", weight=3.0)
    tasks = [await _queue(door, A, order) for _ in range(8)]
    tasks += [await _queue(door, heavy, order) for _ in range(24)]
    for _ in range(16):
        door.leave()
        await settle()
    assert order.count("h") >= 3 * order.count("a") - 3
    for _ in range(40):
        door.leave()
        await settle()
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_leaves_its_place() -> None:
    door = FrontDoor(1)
    await door.enter(A)
    order: list[str] = []
    gone = await _queue(door, B, order)
    after = await _queue(door, A, order)
    gone.cancel()
    await settle()
    assert door.waiting == 1
    door.leave()
    await settle()
    assert order == ["a"]
    await after
    door.leave()
    assert (door.busy, door.waiting) == (0, 0)
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_slot_handed_to_a_cancelled_caller_is_passed_on() -> None:
    door = FrontDoor(1)
    await door.enter(A)
    order: list[str] = []
    first = await _queue(door, B, order)
    second = await _queue(door, A, order)
    door.leave()  # hands the slot to b's call ...
    first.cancel()  # ... which is cancelled before it runs
    await settle()
    assert order == ["a"]  # the slot went on to the next waiter
    await second
    door.leave()
    assert (door.busy, door.waiting) == (0, 0)
