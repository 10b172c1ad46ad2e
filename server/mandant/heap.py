"""The serving process's long-lived heap, out of the cyclic garbage collector's way.

A server imports torch, numpy, grpc and its models before the first call: a few hundred
thousand objects that live as long as the process. CPython's full (generation 2)
collection walks every one of them whenever enough newer objects have survived: under
load that happened every few seconds, each pass stopping the event loop for more than
100 ms, which set a light tenant's p99 (``python -m benchmarks.gc_pauses`` runs the
server with and without the freeze; with it, no full collection took over 1 ms in the
recorded runs: ``benchmarks/README.md``). Once the server is up, :func:`settle`
collects what start-up left behind and moves every survivor to the permanent generation
(:func:`gc.freeze`), which no collection walks again: a full collection then costs what
the objects made since take.

Frozen objects that become cyclic garbage are never freed by the collector, and a
model version replaced or unloaded later (a reload, RepositoryModelUnload) was frozen
with the rest: its module may hold a reference cycle, and its weights with it. So
:func:`settle` runs again once retired versions are closed (``App(on_models_retired=)``):
it unfreezes, collects everything once (a pause as long as the ones it prevents) and
freezes what is still alive. The versions a change retires together are settled
together (:class:`SettleSoon`): a reload that changed 20 models paused the loop 20
times back to back, every tenant's calls for over a second. Reference counting frees
everything that is not in a cycle at once, frozen or not.

Only the process that serves calls this (``mandant serve`` and its worker children),
never a library caller such as a test embedding :class:`~mandant.app.App`, whose heap
is not the server's to freeze.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson

logger = logging.getLogger(__name__)


def settle() -> int:
    """Collect everything (frozen objects included), then freeze every survivor; how
    many are frozen now."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "heap settled: %d objects out of the collector's way (%.0f ms)",
        frozen,
        (time.perf_counter() - start) * 1000,
    )
    return frozen


#: How long after a model version is retired the heap settles, for all the versions
#: retired meanwhile (the rest of a reload's changes).
SETTLE_AFTER_S = 0.2


class SettleSoon:
    """The hook run as retired model versions close: :func:`settle` once,
    :data:`SETTLE_AFTER_S` after the first call, for every call made meanwhile (on the
    running event loop)."""

    def __init__(
        self, settle: Callable[[], object] = settle, delay_s: float = SETTLE_AFTER_S
    ) -> None:
        self._settle = settle
        self._delay_s = delay_s
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self._delay_s, self._now)

    def _now(self) -> None:
        self._pending = None
        self._settle()


class _Pauses:
    """Who has the cyclic collector paused, from any thread: it is on again once the
    last of them is done, if it was on when the first began (each on its own, a pause
    that ended while another ran turned the collector on under it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._resume = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if not self._count:
                self._resume = gc.isenabled()
                gc.disable()
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if not self._count and self._resume:
                    gc.enable()


#: ``with collector_paused(): ...``
collector_paused = _Pauses()


def loads_untrusted(document: str | bytes, **hooks: Any) -> Any:
    """``json.loads`` of a client's document with the cyclic collector paused. The
    parser nests as deep as the document does, up to the recursion limit (then
    RecursionError, which callers answer as invalid input); a collection that ran down
    there ran the finalizers of unrelated garbage with no stack left, and they failed
    ("Exception ignored in ..."; seen in a test run as an unraisable RecursionError).

    Without ``hooks``, orjson reads it where it reads it as ``json`` does, about 20
    times faster for numbers (1.2 MB of floats: 3 ms against 61 on the dev machine):
    what orjson refuses (NaN and the infinities, numbers beyond a double, lone
    surrogates, encodings other than UTF-8, a byte-order mark, nesting deeper than
    1,024) goes to ``json``, which reads or refuses it as it always did, and so does a
    document that may hold an integer beyond 64 bits (orjson makes a float of it)."""
    with collector_paused():
        if not hooks and not _may_hold_a_long_integer(document):
            try:
                return orjson.loads(document)
            except orjson.JSONDecodeError:
                pass
        return json.loads(document, **hooks)


#: Digits as 9, every other byte as a space: runs of digits are found with ``find``.
_DIGITS_AS_NINES = bytes(57 if 48 <= byte <= 57 else 32 for byte in range(256))
#: As many digits as the shortest integers beyond 64 bits have (2**63: 19).
_LONG_RUN = b"9" * 19
_MARKS, _SIGNS = (b".", b"e", b"E"), (b"+", b"-")


def _may_hold_a_long_integer(document: str | bytes) -> bool:
    """Whether ``document`` has a run of 19 or more digits that may be an integer: not
    a float's fraction or exponent (``0.000123…`` makes such runs in floats sent as
    Python writes them). One in a string counts: it only sends the document to
    ``json``. (A regular expression took 58 ms over 1.2 MB of floats; this 1.)"""
    text = document.encode(errors="surrogatepass") if isinstance(document, str) else document
    runs = text.translate(_DIGITS_AS_NINES)
    start = runs.find(_LONG_RUN)
    while start >= 0:
        end = runs.find(b" ", start)
        end = len(runs) if end < 0 else end
        before, sign = text[start - 1 : start], text[start - 2 : start - 1]
        fraction_or_exponent = text[end : end + 1] in _MARKS or before in _MARKS
        if not fraction_or_exponent and not (before in _SIGNS and sign in _MARKS):
            return True
        start = runs.find(_LONG_RUN, end)
    return False
