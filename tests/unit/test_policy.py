"""The pure batch-filling policies: weighted deficit round robin and FIFO."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from mandant.scheduling.policy import (
    MAX_PRIORITY,
    UNSET_PRIORITY_LEVEL,
    FairQueue,
    FifoQueue,
    LevelQueue,
    TakeFailed,
    priority_level,
)


@dataclass(eq=False)
class Item:
    tenant: str
    rows: int = 1
    weight: float = 1.0
    level: int = UNSET_PRIORITY_LEVEL
    group: object = "g"
    arrival: float = 0.0
    name: str = ""


def rows_by_tenant(batch: list[Item]) -> Counter[str]:
    shares: Counter[str] = Counter()
    for item in batch:
        shares[item.tenant] += item.rows
    return shares


def test_priority_levels_one_is_highest_unset_is_lowest() -> None:
    assert priority_level(1) < priority_level(2) < priority_level(0)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_weighted_shares_under_saturation(rows: int) -> None:
    queue: FairQueue[Item] = FairQueue()
    shares: Counter[str] = Counter()
    for _ in range(200):
        # Keep both tenants backlogged: refill before every batch.
        while queue.rows_of("a") < 128:
            queue.push(Item("a", rows, weight=1))
        while queue.rows_of("b") < 128:
            queue.push(Item("b", rows, weight=3))
        batch = queue.take(64)
        assert sum(i.rows for i in batch) <= 64
        shares += rows_by_tenant(batch)
    ratio = shares["b"] / shares["a"]
    assert 3 * 0.95 <= ratio <= 3 * 1.05


def test_a_lone_request_joins_the_next_batch_despite_a_flood() -> None:
    queue: FairQueue[Item] = FairQueue()
    for _ in range(256):
        queue.push(Item("a"))
    queue.take(64)
    queue.push(Item("b", name="b1"))
    assert any(i.name == "b1" for i in queue.take(64))


def test_idle_tenant_gets_everything() -> None:
    queue: FairQueue[Item] = FairQueue()
    for _ in range(10):
        queue.push(Item("a", 3))
    assert sum(i.rows for i in queue.take(64)) == 30
    assert len(queue) == 0 and queue.rows == 0


def test_a_tenant_that_was_alone_keeps_no_credit_when_another_joins() -> None:
    """Alone, a tenant takes what fits without counting credit; once a second tenant
    is backlogged too, every batch is shared by weight from the first one on."""
    queue: FairQueue[Item] = FairQueue()
    for _ in range(300):
        queue.push(Item("a", 3))
    assert sum(i.rows for i in queue.take(64)) == 63  # 21 requests: the next cannot fit
    for _ in range(300):
        queue.push(Item("b", 3, weight=2))
    for _ in range(5):
        shares = rows_by_tenant(queue.take(64))
        assert abs(shares["b"] - 2 * shares["a"]) <= 6, shares  # two requests of rounding


def test_batch_never_exceeds_room_and_closes_before_a_request_that_cannot_join() -> None:
    queue: FairQueue[Item] = FairQueue()
    queue.push(Item("a", 5, name="a5"))
    queue.push(Item("a", 5, name="a5b"))
    batch = queue.take(8)
    assert [i.name for i in batch] == ["a5"]
    assert [i.name for i in queue.take(8)] == ["a5b"]


def test_first_request_is_taken_even_if_bigger_than_room() -> None:
    queue: FairQueue[Item] = FairQueue()
    queue.push(Item("a", 16))
    assert [i.rows for i in queue.take(8)] == [16]


def test_batches_hold_one_group() -> None:
    queue: FairQueue[Item] = FairQueue()
    queue.push(Item("a", group=(4,)))
    queue.push(Item("b", group=(8,)))
    queue.push(Item("a", group=(4,)))
    queue.push(Item("b", group=(8,)))
    groups = [{i.group for i in queue.take(64)} for _ in range(4)]
    assert all(len(g) <= 1 for g in groups)
    assert sum(len(g) for g in groups) >= 2 and len(queue) == 0


def test_another_tenant_s_shape_does_not_break_up_a_tenant_s_batches() -> None:
    """One request of another shape always queued (an attacker, or a tenant with other
    sequence lengths) closed every batch after one request: the victim's 64 one-row
    calls went out one per batch. Now the victim's calls fill the batch, and the
    tenant passed over leads the next one (with the credit it kept)."""
    queue: FairQueue[Item] = FairQueue()
    for _ in range(64):
        queue.push(Item("victim", group=(4,)))
    served: list[list[Item]] = []
    for _ in range(4):
        if queue.rows_of("attacker") == 0:
            queue.push(Item("attacker", group=(5,)))
        served.append(queue.take(64))
    victim_batches = [b for b in served if b and b[0].tenant == "victim"]
    assert sum(len(b) for b in victim_batches) == 64 and len(victim_batches) <= 2
    assert all(len({i.group for i in batch}) == 1 for batch in served)
    assert sum(1 for b in served for i in b if i.tenant == "attacker") >= 1


def _saturated(
    tenants: dict[str, tuple[object, float]], batches: int, room: int = 16
) -> Counter[str]:
    """Rows served per tenant over ``batches`` batches, each tenant (its group, its
    weight) kept backlogged with one-row requests."""
    queue: FairQueue[Item] = FairQueue()
    served: Counter[str] = Counter()
    for _ in range(batches):
        for tenant, (group, weight) in tenants.items():
            while queue.rows_of(tenant) < 64:
                queue.push(Item(tenant, weight=weight, group=group))
        batch = queue.take(room)
        assert len({i.group for i in batch}) == 1 and len(batch) == room
        served.update(rows_by_tenant(batch))
    return served


def test_three_groups_backlogged_share_alike() -> None:
    """Three tenants of three shapes: moving the one passed over to the front of the
    ring left the third behind two that passed the lead to each other (0 rows in 300
    batches)."""
    served = _saturated({"a": ((4,), 1), "b": ((5,), 1), "c": ((6,), 1)}, 300)
    assert served["a"] == served["b"] == served["c"] == 1600


def test_weights_hold_across_groups() -> None:
    """Rows by weight whatever the shapes: 10 tenants of one shape and one of another
    get a row in 11 each (the lone shape took half); weights 1 and 3 on two shapes
    get 1:3 (they got 1:1)."""
    served = _saturated({**{f"v{n}": ((4,), 1) for n in range(10)}, "odd": ((5,), 1)}, 440)
    assert max(served.values()) - min(served.values()) <= 16, served
    served = _saturated({"light": ((4,), 1), "heavy": ((5,), 3)}, 200)
    assert served["heavy"] == pytest.approx(3 * served["light"], rel=0.05), served


def test_a_tenant_mixing_shapes_banks_no_credit_to_take_later_batches() -> None:
    """A tenant whose requests alternate between two shapes led batches of one short
    run each and kept the credit of every turn it was passed over in: after 500
    batches so, sending one shape only, it took every row of the next hundreds of
    batches from a tenant of equal weight."""
    queue: FairQueue[Item] = FairQueue()
    shapes = [(4,), (5,)]

    def refill(mixing: bool) -> None:
        while queue.rows_of("a") < 32:
            queue.push(Item("a", group=shapes[queue.rows_of("a") % 2] if mixing else (4,)))
        while queue.rows_of("b") < 32:
            queue.push(Item("b", group=(4,)))

    for _ in range(500):
        refill(mixing=True)
        queue.take(16)
    served: Counter[str] = Counter()
    for _ in range(50):
        refill(mixing=False)
        served.update(rows_by_tenant(queue.take(16)))
    assert served["b"] >= 0.4 * sum(served.values()), served


def test_a_tenant_passed_over_for_its_shape_leads_the_next_batch() -> None:
    """However many same-shape requests the others keep queued, the tenant whose
    request was passed over for its shape is served by the next batch."""
    queue: FairQueue[Item] = FairQueue()
    for tenant in ("x1", "x2"):
        for _ in range(200):
            queue.push(Item(tenant, group=(4,)))
    queue.push(Item("y", group=(5,), name="other"))
    first = queue.take(16)
    assert {i.group for i in first} == {(4,)}
    second = queue.take(16)
    assert [i.name for i in second] == ["other"]


def test_large_requests_are_not_starved_by_small_ones() -> None:
    queue: FairQueue[Item] = FairQueue()
    queue.push(Item("big", 64, name="big"))
    served = False
    for _ in range(10):
        while queue.rows_of("small") < 256:
            queue.push(Item("small"))
        if any(i.name == "big" for i in queue.take(64)):
            served = True
            break
    assert served


def test_priority_is_strict_within_a_tenant() -> None:
    queue: FairQueue[Item] = FairQueue()
    queue.push(Item("a", name="low", level=priority_level(0)))
    queue.push(Item("a", name="p2", level=priority_level(2)))
    queue.push(Item("a", name="p1", level=priority_level(1)))
    assert [i.name for i in queue.take(1)] == ["p1"]
    assert [i.name for i in queue.take(1)] == ["p2"]
    assert [i.name for i in queue.take(1)] == ["low"]


def test_priority_never_crosses_tenants_shares() -> None:
    queue: FairQueue[Item] = FairQueue()
    for _ in range(50):
        queue.push(Item("a", level=priority_level(1)))
        queue.push(Item("b"))
    shares = rows_by_tenant(queue.take(40))
    assert shares["a"] == shares["b"] == 20


def test_remove_frees_rows_at_once_and_forgets_empty_tenants() -> None:
    queue: FairQueue[Item] = FairQueue()
    first, second = Item("a", 2), Item("b", 3)
    queue.push(first)
    queue.push(second)
    assert queue.remove(first)
    assert not queue.remove(first)
    assert queue.rows == 3 and queue.rows_of("a") == 0 and len(queue) == 1
    assert queue.take(64) == [second]
    assert queue.take(64) == []


def test_oldest_arrival_across_tenants_and_levels() -> None:
    queue: FairQueue[Item] = FairQueue()
    assert queue.oldest_arrival() is None
    queue.push(Item("a", arrival=5.0))
    queue.push(Item("b", arrival=3.0, level=1))
    queue.push(Item("b", arrival=4.0))
    assert queue.oldest_arrival() == 3.0


def test_fractional_weights_and_big_requests_converge() -> None:
    queue: FairQueue[Item] = FairQueue()
    shares: Counter[str] = Counter()
    for _ in range(400):
        while queue.rows_of("a") < 64:
            queue.push(Item("a", 8, weight=0.1))
        while queue.rows_of("b") < 64:
            queue.push(Item("b", 8, weight=0.2))
        shares += rows_by_tenant(queue.take(16))
    assert 2 * 0.95 <= shares["b"] / shares["a"] <= 2 * 1.05


def test_fifo_serves_in_arrival_order_regardless_of_tenant() -> None:
    queue: FifoQueue[Item] = FifoQueue()
    for n in range(100):
        queue.push(Item("a", name=f"a{n}"))
    queue.push(Item("b", name="b"))
    taken = [i.name for i in queue.take(64)]
    assert "b" not in taken and taken[0] == "a0"
    assert queue.rows_of("a") == 36 and queue.rows_of("b") == 1


def test_fifo_closes_batch_at_group_change_and_priority_orders() -> None:
    queue: FifoQueue[Item] = FifoQueue()
    queue.push(Item("a", group=1, name="x"))
    queue.push(Item("a", group=2, name="y"))
    queue.push(Item("b", group=1, name="urgent", level=priority_level(1)))
    assert [i.name for i in queue.take(64)] == ["urgent", "x"]
    assert [i.name for i in queue.take(64)] == ["y"]
    assert queue.remove(Item("a")) is False


@pytest.mark.parametrize("make_queue", [FairQueue, FifoQueue])
def test_a_tenant_s_empty_requests_are_counted_as_requests(make_queue: type) -> None:
    """A 0-row request after a tenant's other one: taking or removing both leaves the
    tenant's count at zero (FIFO counted rows alone, and the second one raised)."""
    queue = make_queue()
    first, empty, other = Item("a", rows=2), Item("a", rows=0), Item("b")
    for item in (first, empty, other):
        queue.push(item)
    assert queue.rows_of("a") == 2
    taken: list[Item] = []
    while len(queue):
        taken += queue.take(8)
    assert sorted(map(id, taken)) == sorted(map(id, (first, empty, other)))
    assert queue.rows_of("a") == queue.rows_of("b") == queue.rows == 0
    for item in (Item("a", rows=1), Item("a", rows=0), Item("a", rows=0)):
        queue.push(item)
        last = item
    assert queue.remove(last) and queue.rows_of("a") == 1
    while len(queue):
        queue.take(8)
    assert queue.rows_of("a") == 0


class BrokenGroup:
    """A group that cannot be compared: a stand-in for a bug while taking a batch."""

    def __ne__(self, other: object) -> bool:
        raise RuntimeError("broken")

    __hash__ = object.__hash__


@pytest.mark.parametrize("make_queue", [FairQueue, FifoQueue])
def test_a_take_that_breaks_off_hands_over_what_it_removed(make_queue: type) -> None:
    queue = make_queue()
    first, second = Item("a", group=BrokenGroup()), Item("a", group=BrokenGroup())
    queue.push(first)
    queue.push(second)
    with pytest.raises(TakeFailed) as failed:
        queue.take(8)
    assert failed.value.taken == [first]
    assert isinstance(failed.value.__cause__, RuntimeError)


def test_an_explicit_priority_however_large_ranks_before_unset() -> None:
    """A priority of 2**31 or more tied with, or came after, requests that set none."""
    assert priority_level(MAX_PRIORITY) < priority_level(0)
    assert priority_level(2**31) < priority_level(0)
    assert priority_level(2**40) < priority_level(0)
    queue: FifoQueue[Item] = FifoQueue()
    unset, huge = Item("a", level=priority_level(0)), Item("b", level=priority_level(2**40))
    queue.push(unset)
    queue.push(huge)
    assert queue.take(1) == [huge]


def test_many_levels_come_out_in_level_order_through_removals_and_returns() -> None:
    """The levels' keys live in a heap, some of them stale (a level that emptied and
    came back): whatever the churn, requests leave by level, then arrival."""
    queue: LevelQueue[Item] = LevelQueue()
    pushed: list[Item] = []
    for n in range(600):
        item = Item("a", level=(n * 7919) % 97 + 1, arrival=float(n), name=str(n))
        queue.push(item)
        pushed.append(item)
        if n % 5 == 4:  # remove one, emptying its level now and then
            gone = pushed.pop((n * 31) % len(pushed))
            assert queue.remove(gone)
        if n % 11 == 10:  # take one from the top
            top = min(pushed, key=lambda i: (i.level, i.arrival))
            assert queue.pop() is top
            pushed.remove(top)
    order = [queue.pop() for _ in range(len(queue))]
    assert order == sorted(pushed, key=lambda i: (i.level, i.arrival))


def test_keys_of_emptied_levels_do_not_pile_up() -> None:
    """A level emptied below the first one left its key in the heap until it came to
    the top: one key per request for a tenant cycling through priorities while
    another's backlog stayed (200,001 keys for one live level)."""
    queue: LevelQueue[Item] = LevelQueue()
    queue.push(Item("backlog", level=1))
    for level in range(2, 5000):
        item = Item("b", level=level)
        queue.push(item)
        assert queue.remove(item)
    assert len(queue._keys) <= 2 * 1 + 64 + 1
    assert queue.pop().tenant == "backlog" and len(queue) == 0


def test_keys_of_levels_emptied_by_taking_do_not_pile_up() -> None:
    """A level emptied by a pop kept its key in the heap while every later level sorted
    before it: a client sending each call a smaller priority than the last grew the
    queue of a ``fifo`` model by one key a call, for the model's life (20,000 keys held
    by an empty queue after 20,000 calls)."""
    queue: LevelQueue[Item] = LevelQueue()
    for n in range(5000):
        queue.push(Item("a", level=MAX_PRIORITY - n))
        assert queue.pop().level == MAX_PRIORITY - n
    assert len(queue) == 0 and len(queue._keys) <= 1


@dataclass(eq=False)
class Counted(Item):
    """An item that counts how often it is compared (a deque's ``remove`` compares
    each item it passes with ``==``)."""

    compared: list[int] | None = None

    def __eq__(self, other: object) -> bool:
        if self.compared is not None:
            self.compared[0] += 1
        return self is other

    __hash__ = object.__hash__


@pytest.mark.parametrize("make_queue", [FairQueue, FifoQueue])
def test_a_request_leaves_from_the_middle_of_a_level_without_a_scan(make_queue: type) -> None:
    """A caller that gives up, or whose deadline passes, leaves the queue in O(1): a
    deque's ``remove`` scanned the level (20,000 callers of one tenant giving up
    cost 1.9 s of the event loop). Order and counts hold through it."""
    compared = [0]
    queue = make_queue()
    items = [Counted("a", arrival=float(n), name=str(n), compared=compared) for n in range(2000)]
    for item in items:
        queue.push(item)
    for item in items[500:1500]:  # from the middle
        assert queue.remove(item)
    assert compared[0] == 0
    assert not queue.remove(items[700])  # gone already
    assert len(queue) == 1000 and queue.rows == 1000 and queue.rows_of("a") == 1000
    assert queue.oldest_arrival() == 0.0
    taken = [item for _ in range(10) for item in queue.take(100)]
    assert taken == items[:500] + items[1500:]
