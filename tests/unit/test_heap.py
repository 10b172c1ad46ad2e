"""``mandant.heap.settle``: in processes of their own (freezing pytest's heap would keep
every later test's cyclic garbage alive)."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandant.heap import SettleSoon, loads_untrusted
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


RELOAD = textwrap.dedent(
    """
    import asyncio, gc, sys, tempfile
    from pathlib import Path
    from mandant.app import App
    from mandant.config import parse_config
    from mandant.heap import SettleSoon, settle

    MADE = []  # a weak reference to each module the factory builds
    MODEL = {
        "name": "m", "backend": "torch", "factory": "tests.unit.torch_models:cyclic",
        "factory_args": {"made": MADE},
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1]}],
    }
    CONFIG = parse_config({
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
        "tenants": [{"id": "t", "api_keys": []}],
        "models": [MODEL],
    })

    async def main(hook):
        app = App(CONFIG, Path(tempfile.mkdtemp()), on_models_retired=hook)
        await app.start()
        settle()  # as mandant serve does once the models are loaded
        [old] = MADE
        await app.registry.load("m")  # a reload: the old version is retired
        assert len(MADE) == 2 and MADE[1]() is not None
        gc.collect()
        await app.aclose(0)
        await asyncio.sleep(0.5)  # the settle comes a moment after the retirement
        return old() is None

    print("freed" if asyncio.run(main(SettleSoon() if sys.argv[1] == "hook" else None)) else "kept")
    """
)


def run_reload(hook: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, hook], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-1]


def test_a_retired_model_frozen_at_start_is_freed_once_the_heap_settles_again() -> None:
    # A frozen cycle outlives its last reference: what the hook is for.
    assert run_reload("none") == "kept"
    assert run_reload("hook") == "freed"


async def test_the_versions_retired_together_settle_the_heap_once() -> None:
    """A reload that changed 20 models settled the heap (a full collection) 20 times
    back to back: every tenant's calls stalled for over a second."""
    settled: list[int] = []
    soon = SettleSoon(lambda: settled.append(1), delay_s=0.05)
    for _ in range(20):
        soon()
    assert settled == []
    await asyncio.sleep(0.1)
    assert settled == [1]
    soon()  # a later retirement settles again
    await asyncio.sleep(0.1)
    assert settled == [1, 1]


def test_a_client_document_is_parsed_with_the_collector_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nested up to the recursion limit, the parser has no stack left for the
    finalizers a collection would run there."""
    parsing = [False]
    inside: list[str] = []

    def watched(real_loads: Callable[[str | bytes], object]) -> Callable[[str | bytes], object]:
        def loads(document: str | bytes) -> object:
            parsing[0] = True
            try:
                return real_loads(document)
            finally:
                parsing[0] = False

        return loads

    def watch(phase: str, info: dict[str, int]) -> None:
        if parsing[0]:
            inside.append(phase)

    monkeypatch.setattr(json, "loads", watched(json.loads))
    monkeypatch.setattr(orjson, "loads", watched(orjson.loads))  # where it reads as json
    nested = functools.reduce(lambda inner, _: [inner], range(100), 1)
    shallow, deep = json.dumps(nested), "[" * 100_000 + "]" * 100_000
    threshold = gc.get_threshold()
    gc.callbacks.append(watch)
    gc.set_threshold(1)  # else a collection at nearly every allocation
    try:
        assert loads_untrusted(shallow) == nested
        with pytest.raises(RecursionError):  # callers answer it as invalid input
            loads_untrusted(deep)
    finally:
        gc.callbacks.remove(watch)
        gc.set_threshold(*threshold)
    assert inside == [] and gc.isenabled()
    gc.disable()
    try:
        loads_untrusted("{}")
        assert not gc.isenabled()  # as it was
    finally:
        gc.enable()


#: JSON documents as clients write them, and as they may: numbers of every form
#: (integers beyond 64 bits, floats beyond a double, long fractions), the literals
#: Python's JSON reads (NaN, Infinity), escapes of lone surrogates, byte-order marks.
_NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False, places=25).map(str),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e-400", "-0", "1E+19",
                     "0.0000123456789012345678901", "12345678901234567890e3",
                     "9223372036854775807", "-9223372036854775809", "18446744073709551616"]),
)  # fmt: skip
_STRINGS = st.one_of(
    st.text().map(json.dumps),
    st.sampled_from([r'"\ud800"', r'"\udc00x"', '"12345678901234567890"', r'"\u00e9"']),
)
_VALUES: st.SearchStrategy[str] = st.recursive(
    st.one_of(_NUMBERS, _STRINGS, st.sampled_from(["true", "false", "null"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(_STRINGS, inner), max_size=6).map(
            lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
        ),
    ),
    max_leaves=30,
)


def _read(reader: Callable[[bytes], Any], document: bytes) -> tuple[str, Any]:
    try:
        return "value", _typed(reader(document))
    except (ValueError, RecursionError) as exc:
        return "refused", "ValueError" if isinstance(exc, ValueError) else "RecursionError"


def _typed(value: Any) -> Any:
    """``value`` with each item's type beside it (1 and 1.0 and True differ)."""
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    return (type(value).__name__, value)


@given(document=_VALUES, bom=st.booleans())
def test_a_client_document_reads_as_json_reads_it(document: str, bom: bool) -> None:
    """orjson reads a document where it reads it as ``json`` does (20 times faster for
    numbers), ``json`` the rest: the same values, of the same types (an integer beyond
    64 bits stays an integer: orjson makes a float of it), or refused alike."""
    raw = (b"\xef\xbb\xbf" if bom else b"") + document.encode(errors="surrogatepass")
    assert _read(loads_untrusted, raw) == _read(json.loads, raw)
