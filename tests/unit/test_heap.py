"""``mandant.heap.settle``: in a process of its own (freezing pytest's heap would keep
every later test's cyclic garbage alive)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.servers import SUBPROCESS_ENV as ENV

PROGRAM = textwrap.dedent(
    """
    import gc
    import numpy, torch  # a server's start-up heap
    from mandant.heap import settle

    class Node:
        def __init__(self): self.me = self

    kept = [Node() for _ in range(1000)]
    tracked = len(gc.get_objects())
    frozen = settle()
    assert frozen == gc.get_freeze_count() and frozen > tracked // 2, (frozen, tracked)
    # What a full collection walks now: what was made since, not the start-up heap.
    assert len(gc.get_objects()) < 1000, len(gc.get_objects())
    assert all(n.me is n for n in kept)  # frozen objects are alive as before
    for _ in range(500):
        Node()  # cyclic garbage made after settling is still collected
    assert gc.collect() >= 500
    print("ok", frozen)
    """
)


def test_settle_moves_the_start_up_heap_out_of_full_collections() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ")
    assert int(done.stdout.split()[1]) > 50_000  # torch and numpy alone are this many
