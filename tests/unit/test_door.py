"""The front door: a tenant below its weighted share of the places walks in, however
busy the others are; a tenant at its share waits, in arrival order, for one of its own
calls to leave or for the others to go quiet. Cancellation never loses or leaks a place."""

from __future__ import annotations

import asyncio

import pytest

from mandant.errors import ServerBusy
from mandant.scheduling.door import CallCap, FrontDoor, PlaceTaken
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


async def test_a_lone_tenant_may_use_every_place() -> None:
    door = FrontDoor(4)
    for _ in range(4):
        await door.enter(A)
    order: list[str] = []
    fifth = await _queue(door, A, order)
    assert (door.busy, door.waiting, order) == (4, 1, [])
    door.leave(A)
    await fifth
    assert (door.busy, door.waiting, order) == (4, 0, ["a"])


async def test_a_light_tenant_walks_past_a_flood() -> None:
    """a holds every place and has 20 more calls waiting; b's call goes straight in,
    and a is held to its half until b is done."""
    door = FrontDoor(4)
    for _ in range(4):
        await door.enter(A)
    order: list[str] = []
    flood = [await _queue(door, A, order) for _ in range(20)]
    await door.enter(B)  # no wait: b is below its share (2 of 4)
    assert door.busy == 5
    for _ in range(3):  # a's calls leave; a's waiters stay out until a is below 2
        door.leave(A)
        await settle()
    assert order == ["a"]
    door.leave(B)  # b goes quiet: a's share is every place again
    await settle()
    assert order == ["a"] * 3
    assert door.busy == 4
    for _ in range(30):
        if door.busy:
            door.leave(A)
        await settle()
    await asyncio.gather(*flood)
    assert (door.busy, door.waiting) == (0, 0)


async def test_shares_follow_weights() -> None:
    door = FrontDoor(8)
    heavy = Tenant("h", weight=3.0)
    for _ in range(6):
        await door.enter(heavy)  # alone, h may take all eight
    await door.enter(A)  # a arrives: shares become 2 (a) and 6 (h)
    await door.enter(A)
    order: list[str] = []
    waiting_a = await _queue(door, A, order)
    waiting_h = await _queue(door, heavy, order)  # h holds its six: it waits too
    assert order == []
    assert (door.busy, door.waiting) == (8, 2)
    door.leave(A)
    await waiting_a
    assert order == ["a"]
    door.leave(heavy)
    await waiting_h
    assert order == ["a", "h"]


async def _full_of_heavy_and_a() -> tuple[FrontDoor, Tenant]:
    """A door of 8 places full: 6 of tenant h (weight 3), 2 of a (weight 1)."""
    door = FrontDoor(8)
    heavy = Tenant("h", weight=3.0)
    for _ in range(6):
        await door.enter(heavy)
    await door.enter(A)
    await door.enter(A)
    return door, heavy


async def test_a_weight_changed_by_a_reload_applies_while_the_tenant_is_busy() -> None:
    """A tenant's weight at the door was the one it had when it got there, kept while
    it had calls inside or waiting: a flooding tenant an operator demoted kept its
    share for as long as it kept flooding."""
    door, heavy = await _full_of_heavy_and_a()
    demoted = Tenant("h", weight=1.0)  # the same tenant after a reload
    order: list[str] = []
    waiting_h = await _queue(door, demoted, order)  # shares now 4 and 4
    waiting_a = await _queue(door, A, order)
    assert order == ["a"]  # a is below its new share: it walks in
    for _ in range(2):
        door.leave(heavy)  # h holds 5, then 4: its share, its call still waits
        await settle()
    assert order == ["a"]
    door.leave(heavy)
    await settle()
    assert order == ["a", "h"]
    await asyncio.gather(waiting_a, waiting_h)


async def test_a_weight_cut_by_a_reload_lets_the_other_tenants_waiting_calls_in() -> None:
    """The others' shares grew, but their calls already waiting stayed out until one of
    their own calls ended."""
    door, heavy = await _full_of_heavy_and_a()
    order: list[str] = []
    waiting_a = [await _queue(door, A, order) for _ in range(2)]
    assert order == []
    waiting_h = await _queue(door, Tenant("h", weight=1.0), order)  # shares 4 and 4
    assert order == ["a", "a"]
    for _ in range(3):
        door.leave(heavy)
    await settle()
    assert order == ["a", "a", "h"]
    await asyncio.gather(*waiting_a, waiting_h)


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    door = FrontDoor(1)
    await door.enter(A)
    order: list[str] = []
    gone = await _queue(door, A, order)
    after = await _queue(door, A, order)
    gone.cancel()
    await settle()
    assert door.waiting == 1
    door.leave(A)
    await after
    assert order == ["a"]
    door.leave(A)
    assert (door.busy, door.waiting) == (0, 0)
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_place_given_to_a_cancelled_caller_is_passed_on() -> None:
    door = FrontDoor(1)
    await door.enter(A)
    order: list[str] = []
    first = await _queue(door, A, order)
    second = await _queue(door, A, order)
    door.leave(A)  # lets the first waiter in ...
    first.cancel()  # ... which is cancelled before it runs
    await settle()
    assert order == ["a"]  # its place went on to the next waiter
    await second
    door.leave(A)
    assert (door.busy, door.waiting) == (0, 0)


def test_the_call_cap_refuses_one_more_with_pushback() -> None:
    cap = CallCap(2)
    cap.enter()
    cap.enter()
    with pytest.raises(ServerBusy) as refused:
        cap.enter()
    assert refused.value.retry_after_s > 0
    cap.leave()
    cap.enter()
    assert cap.calls == 2


async def test_a_full_cap_takes_the_place_of_the_longest_queue_s_newest_waiter() -> None:
    """a floods: two calls inside the door, three waiting, all five under a cap of
    five. b's call takes the place of a's newest waiter (answered PlaceTaken, with
    pushback); a's own next call is refused, not swapped for one of a's."""
    door, cap = FrontDoor(2), CallCap(5)
    C = Tenant("c")
    inside = []
    for _ in range(2):
        cap.enter(door, "a")
        await door.enter(A)
        inside.append(A)
    order: list[str] = []
    waiters = []
    for _ in range(3):
        cap.enter(door, "a")
        waiters.append(await _queue(door, A, order))
    cap.enter(door, "c")  # the cap is full: c's call takes a's newest waiter's place
    await door.enter(C)  # and walks in (c is below its share of the door)
    assert (cap.calls, door.waiting) == (5 + 1, 2)  # until the shed call unwinds
    await settle()
    shed = [task for task in waiters if task.done()]
    assert len(shed) == 1 and shed[0] is waiters[-1]  # the newest
    with pytest.raises(PlaceTaken) as taken:
        await shed[0]
    assert taken.value.retry_after_s > 0
    cap.leave()  # the shed call unwinds: its place is given back
    assert (cap.calls, door.waiting) == (5, 2)
    with pytest.raises(ServerBusy):
        cap.enter(door, "a")  # a's own waiters are not shed for a
    door.leave(C)
    cap.leave()
    for _ in range(2):
        door.leave(A)
        cap.leave()
    await asyncio.gather(*waiters[:2])
    assert order == ["a", "a"]


async def test_a_flood_s_newcomer_is_refused_rather_than_take_another_s_waiting_place() -> None:
    """A full cap of 8 and a door of 4: a has 2 calls inside and 3 waiting, b 2 inside
    and 1 waiting. a's next call would be its fourth waiter: refused, b's waiter kept
    (it took b's place, and a's each next call took another tenant's). b's next call
    still takes a's newest waiter's place."""
    door, cap = FrontDoor(4), CallCap(8)
    order: list[str] = []
    tasks = {A.id: [], B.id: []}  # type: dict[str, list[asyncio.Task[None]]]
    for tenant, calls in ((B, 1), (A, 5), (B, 2)):  # b first: a's share is then 2
        for _ in range(calls):
            cap.enter(door, tenant.id)
            tasks[tenant.id].append(await _queue(door, tenant, order))
    assert (cap.calls, door.busy, door.waiting) == (8, 4, 4)
    with pytest.raises(ServerBusy) as refused:
        cap.enter(door, "a")
    assert not isinstance(refused.value, PlaceTaken)  # the newcomer's own refusal
    assert door.waiting == 4  # nobody was shed
    cap.enter(door, "b")  # b waits less: it takes a's newest waiter's place
    await settle()
    with pytest.raises(PlaceTaken):
        await tasks["a"][-1]
    assert door.waiting == 3
    for task in tasks["a"][:-1] + tasks["b"]:
        task.cancel()
    await asyncio.gather(*tasks["a"], *tasks["b"], return_exceptions=True)


async def test_a_waiter_cancelled_after_it_was_shed_leaves_no_trace() -> None:
    door = FrontDoor(1)
    await door.enter(A)
    order: list[str] = []
    waiter = await _queue(door, A, order)
    assert door.shed("b", "server busy")
    waiter.cancel()
    with pytest.raises((asyncio.CancelledError, PlaceTaken)):
        await waiter
    assert (door.busy, door.waiting) == (1, 0)
    door.leave(A)
    assert (door.busy, door.waiting) == (0, 0)
    assert not door.shed("b", "server busy")  # nobody waits


async def test_a_waiter_cancelled_after_its_tenant_went_idle_forgets_nothing_else() -> None:
    """A waiter's cancellation runs after its place was passed over, its tenant went
    idle and came back with a new call inside: it deleted that new state, and the call
    inside raised KeyError when it left (INTERNAL, and a place of the server-wide cap
    lost to a waiter behind it)."""
    door = FrontDoor(1)
    acme, globex = Tenant("acme"), Tenant("globex")
    await door.enter(acme)  # inside
    waiter = asyncio.create_task(door.enter(acme))  # waits
    await asyncio.sleep(0)
    waiter.cancel()  # its future is cancelled now; its own clean-up runs later
    door.leave(acme)  # the place is passed over the cancelled waiter
    await door.enter(acme)
    door.leave(acme)  # acme idle: forgotten
    await door.enter(acme)  # back, inside, under a new state
    await door.enter(globex)
    with pytest.raises(asyncio.CancelledError):
        await waiter  # the cancelled waiter cleans up after the old state
    assert door.busy == 2
    door.leave(acme)  # raised KeyError
    door.leave(globex)
    assert door.busy == 0 and not door._tenants
