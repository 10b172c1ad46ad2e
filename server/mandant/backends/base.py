"""The contract every execution backend fulfils."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mandant.config import ModelSpec


class Backend(Protocol):
    """Runs one model version. ``infer`` takes a batch (rows along dimension 0 of
    every input) and returns every declared output for the whole batch.

    Lifecycle is explicit: ``start()`` loads the model, ``aclose()`` frees it.
    ``infer`` must not block the event loop for long (a call measured to be cheap may
    run on it). A :class:`mandant.errors.MandantError` is the backend's verdict on the
    whole call (Unavailable, DeadlineExceeded, …) and reaches every request of the
    batch; anything else means the model raised on the data: the scheduler reruns the
    batch's requests apart and answers ModelFailed to those it fails on alone.
    """

    @property
    def ready(self) -> bool: ...

    @property
    def platform(self) -> str:
        """Shown as ``platform`` in ModelMetadata (``pytorch_torchscript`` …)."""
        ...

    @property
    def max_concurrency(self) -> int:
        """How many ``infer`` calls may run at once (the model's ``instances``)."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
        hold_on_cancel: bool = False,
    ) -> dict[str, np.ndarray]:
        """``outputs``: the names wanted (None: all); a backend may return more.
        ``deadline``: the ``time.monotonic()`` after which nobody waits for the answer;
        a remote backend passes it on as its call's timeout. ``hold_on_cancel``:
        cancelled, end only once the backend no longer works on the call (the caller
        holds an execution slot for it): at once where the work stops (a remote call
        cancelled), else when it ends (a forward pass on a thread; a second
        cancellation ends the wait). Without it, a cancelled call ends at once."""
        ...


@runtime_checkable
class DescribesModel(Protocol):
    """A backend that learns its model's inputs and outputs from where it runs (Triton's
    ModelMetadata) instead of configuration: ``spec`` is the configured spec with those
    filled in, and may change while it runs (the model reloaded with new tensors). The
    registry validates requests and answers ModelMetadata with it."""

    @property
    def spec(self) -> ModelSpec: ...


@runtime_checkable
class HasCircuit(Protocol):
    """A remote backend with a circuit breaker (Triton's): ``circuit_open`` while it
    refuses every call at once, taking its server for failing."""

    @property
    def circuit_open(self) -> bool: ...


def circuit_open(backend: object) -> bool:
    """Whether ``backend``'s circuit breaker refuses its calls now (False without one)."""
    return isinstance(backend, HasCircuit) and backend.circuit_open


@runtime_checkable
class HasServer(Protocol):
    """A backend whose model runs on a server of its own (Triton's): ``server_silent``
    while that server gave its last health poll no answer (unreachable, or no answer
    within the poll's timeout)."""

    @property
    def server_silent(self) -> bool: ...


def server_silent(backend: object) -> bool:
    """Whether ``backend``'s server does not answer now (False without one)."""
    return isinstance(backend, HasServer) and backend.server_silent


def import_ref(ref: str) -> Callable[..., Any]:
    """The callable a ``module:attribute`` reference names (a model's ``factory`` or
    ``weights_init``); ImportError, AttributeError or TypeError (not callable)."""
    module_name, _, attr_path = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    target = functools.reduce(getattr, attr_path.split("."), target)
    if not callable(target):
        raise TypeError(f"{ref!r} is not callable")
    return target  # type: ignore[no-any-return]
