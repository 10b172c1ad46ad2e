"""The threads models run on, apart from the event loop.

A model's calls run on :class:`ModelThreads`, one daemon thread per instance; loads and
closes on a thread of their own (:func:`in_own_thread`). Daemon threads, because a model
that never returns (a forward pass stuck on a lock, a device that hangs) must not keep
the process from exiting once the graceful stop has waited its time: the interpreter
joins ``ThreadPoolExecutor``'s threads (and the loop's default executor's) at exit, so
one stuck call kept a stopped server running for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What a thread is given to run: a future and the call that settles it.
_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ModelThreads(Executor):
    """``count`` daemon threads named ``name``, each ``nice`` steps below the event loop
    (:func:`lower_priority`), taking calls in order (``loop.run_in_executor``)."""

    def __init__(self, count: int, name: str, nice: int = 0) -> None:
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._nice = nice
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}_{index}", daemon=True)
            for index in range(count)
        ]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("the model's threads are closed")
        future: Future[T] = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Calls submitted already still run (``cancel_futures``: those not started are
        cancelled instead); ``wait``: until they have."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
        for _ in self._threads:
            self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self) -> None:
        lower_priority(self._nice)
        while (work := self._work.get()) is not None:
            future, fn, args, kwargs = work
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the awaiting task
                future.set_exception(model_error(exc))
            else:
                future.set_result(result)
            del work, future, fn, args, kwargs  # no reference kept while waiting


class ModelExit(RuntimeError):
    """Model code raised a BaseException that is not an Exception: SystemExit or
    KeyboardInterrupt (a factory that calls ``sys.exit``, argparse in a builder, a
    training script's ``main()`` as ``weights_init``), or asyncio's CancelledError,
    GeneratorExit, one of its own. Like any other exception of a model's code it fails
    that load or call alone. Handed on as it was, SystemExit stopped the event loop (the
    whole server exited, and with ``workers: N`` an engine restarted on the same
    configuration died again); CancelledError read as the caller gone (no status was
    ever sent) or, in a batch, as the batcher closing (every tenant's request in it
    answered "shutting down", none split off)."""


def model_error(exc: BaseException) -> BaseException:
    """``exc``, raised by model code, as its caller gets it (:class:`ModelExit`)."""
    if not isinstance(exc, Exception):
        error = ModelExit(f"model code raised {type(exc).__name__}({exc})")
        error.__cause__ = exc
        return error
    return exc


async def in_own_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` on a new daemon thread, awaited. A caller that stops waiting (a load
    timed out, a shutdown) leaves the thread to finish on its own, its result dropped;
    unlike the loop's executor threads (``asyncio.to_thread``), which the interpreter
    joins at exit, it never keeps the process from exiting."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, model_error(exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


def lower_priority(nice: int) -> None:
    """Schedule the calling thread ``nice`` steps below the others (Linux gives each
    thread its own nice value); nothing for 0 or where the OS refuses."""
    if not nice:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(
            os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice)
        )
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        logger.warning("model threads keep the event loop's priority: %s", exc)
