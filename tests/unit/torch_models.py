"""Small nn.Modules for the TorchBackend tests, referenced as ``tests.unit.torch_models:…``."""

from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn


class _Pair(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class _PairDict(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"PRODUCT": a * b, "SUM": a + b, "EXTRA": a - b}


class _Rendezvous(nn.Module):
    """Blocks until ``barrier.parties`` calls are inside forward at the same time."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self._barrier = barrier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._barrier.wait()
        return x


class _Gate(nn.Module):
    """Signals ``entered``, then waits for ``release`` (raising if it never comes)."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self._entered = entered
        self._release = release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._entered.set()
        if not self._release.wait(timeout=10):
            raise TimeoutError("never released: the event loop was blocked")
        return x * 2


def pair() -> nn.Module:
    """Two inputs, two outputs as a tuple: (a + b, a * b)."""
    return _Pair()


def pair_dict() -> nn.Module:
    """Two inputs, outputs by name (plus one undeclared extra)."""
    return _PairDict()


class _Scaled(nn.Module):
    """Returns its input times a weight, and the weight itself: a parameter, which
    still requires grad under inference mode (it was made outside it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.weight, self.weight


def scaled() -> nn.Module:
    return _Scaled()


def rendezvous(barrier: threading.Barrier) -> nn.Module:
    return _Rendezvous(barrier)


def gate(entered: threading.Event, release: threading.Event) -> nn.Module:
    return _Gate(entered, release)


def not_a_module() -> object:
    return object()


class _Recorder(nn.Module):
    """Records the thread of every call; sleeps ``delay['s']`` seconds (changeable)."""

    def __init__(self, threads: list[int], delay: dict[str, float]) -> None:
        super().__init__()
        self._threads = threads
        self._delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._threads.append(threading.get_ident())
        if self._delay["s"]:
            time.sleep(self._delay["s"])
        return x


def recorder(threads: list[int], delay: dict[str, float]) -> nn.Module:
    return _Recorder(threads, delay)


class _Spinner(nn.Module):
    """Records the thread of every call; computes for ``cpu_s`` seconds of its
    thread's CPU time (never waiting), then returns its input."""

    def __init__(self, threads: list[int], cpu_s: float) -> None:
        super().__init__()
        self._threads = threads
        self._cpu_s = cpu_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._threads.append(threading.get_ident())
        end = time.thread_time() + self._cpu_s
        while time.thread_time() < end:
            pass
        return x


def spinner(threads: list[int], cpu_s: float) -> nn.Module:
    return _Spinner(threads, cpu_s)


def counted(built: list[int]) -> nn.Module:
    """Doubles its input; appends to ``built`` each time one is constructed."""
    built.append(len(built))
    return _Double()


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class _StreamRendezvous(nn.Module):
    """Records (CUDA stream handle, device) of every call, then waits at ``barrier``
    until ``barrier.parties`` calls are inside forward at once; doubles its input."""

    def __init__(self, barrier: threading.Barrier, seen: list[tuple[int, str]]) -> None:
        super().__init__()
        self._barrier = barrier
        self._seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._seen.append((torch.cuda.current_stream(x.device).cuda_stream, str(x.device)))
        self._barrier.wait()
        return x * 2


def stream_rendezvous(barrier: threading.Barrier, seen: list[tuple[int, str]]) -> nn.Module:
    return _StreamRendezvous(barrier, seen)


class _NoNegatives(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x + 1


def no_negatives() -> nn.Module:
    """``x + 1``; raises on a negative element (the data's fault)."""
    return _NoNegatives()


class _Cyclic(nn.Module):
    """Identity whose module refers to itself: freed only by the cyclic collector."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1024))
        self.itself = [self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def cyclic(made: list[weakref.ref[nn.Module]]) -> nn.Module:
    """A :class:`_Cyclic`; appends a weak reference to it to ``made``."""
    module = _Cyclic()
    made.append(weakref.ref(module))
    return module


class Labels(nn.Module):
    """An argmax (int64 labels) and a 0/1 mask (uint8) per row; and a scalar."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x.argmax(dim=1), (x[:, 0] > 0).to(torch.uint8), x.sum()


def labels() -> nn.Module:
    return Labels()


class _InvertsInPlace(nn.Module):
    """Inverts its input's bits in place and returns it (an in-place op in a model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.bitwise_not_()


def inverts_in_place() -> nn.Module:
    return _InvertsInPlace()


class _BFloat16(nn.Module):
    """Its input in bfloat16, a float type numpy has none of."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)


def bfloat16() -> nn.Module:
    return _BFloat16()


class _Listed(nn.Module):
    """Its input, and a list of its values (not a tensor)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        return x, x.tolist()


def listed() -> nn.Module:
    return _Listed()


def exits() -> nn.Module:
    """A builder that ends the program (a missing import's ``sys.exit(1)``, argparse)."""
    sys.exit(3)


class _Reuses(nn.Module):
    """Writes twice its input into a buffer it keeps and answers a view of it (a
    static output buffer, as models written for CUDA graphs keep)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("out", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.out[:rows] = x * 2
        return self.out[:rows]


def reuses() -> nn.Module:
    return _Reuses()


class _Objects(nn.Module):
    """A numpy array of ints as objects: not text, whatever its dtype says."""

    def forward(self, x: torch.Tensor) -> np.ndarray:
        return np.array([3] * x.shape[0], dtype=np.object_)


def objects() -> nn.Module:
    return _Objects()


class _KeepsOnHost(nn.Module):
    """On a GPU: twice its input, answered as a view of a host buffer it keeps (not
    a parameter or a buffer of the module: a plain attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.host = torch.zeros(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        self.host[:rows] = (x * 2).cpu()
        return self.host[:rows]


def keeps_on_host() -> nn.Module:
    return _KeepsOnHost()


async def kept_after_the_next_call(backend: Any, name: str) -> np.ndarray:
    """Output ``name`` of a call of ``X = 1``, once a second call (``X = 5``) has run
    on ``backend`` (started here, closed after): a model that writes its answers into
    memory it keeps would have overwritten the first."""
    await backend.start()
    try:
        first = await backend.infer({"X": np.full(4, 1, np.float32)})
        await backend.infer({"X": np.full(4, 5, np.float32)})
    finally:
        await backend.aclose()
    answer: np.ndarray = first[name]
    return answer


#: The rendezvous of :func:`workspace`'s instances: a module global, so that copies of
#: the module (one per CPU instance) meet at the same one.
_workspace_meeting: list[threading.Barrier] = []


class _Workspace(nn.Module):
    """Writes ``W x`` (``W`` = 2 I, a parameter) into a buffer it keeps, waits until
    ``parties`` calls have written theirs, and answers a view of the buffer: as
    preallocated-workspace inference code does."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(2 * torch.eye(width), requires_grad=False)
        self.register_buffer("out", torch.zeros(64, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        torch.matmul(x, self.weight, out=self.out[:rows])
        _workspace_meeting[0].wait()
        return self.out[:rows]


def workspace(parties: int, width: int = 4) -> nn.Module:
    _workspace_meeting[:] = [threading.Barrier(parties, timeout=10)]
    return _Workspace(width)


class _Interrupt(BaseException):
    """A BaseException of a model's own."""


def _base_exception(kind: str) -> BaseException:
    import asyncio

    kinds: dict[str, BaseException] = {
        "CancelledError": asyncio.CancelledError(),
        "GeneratorExit": GeneratorExit(),
        "SystemExit": SystemExit(4),
        "its own": _Interrupt("stop"),
    }
    return kinds[kind]


class _RaisesBase(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self._kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise _base_exception(self._kind)
        return x


def raises_base(kind: str) -> nn.Module:
    """Raises BaseException ``kind`` on an input with a negative value."""
    return _RaisesBase(kind)


class _Locked(nn.Module):
    """A layer of random weights (no seed) and a lock: a module ``copy.deepcopy``
    cannot copy."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.layer(x)


def locked(built: list[int]) -> nn.Module:
    built.append(len(built))
    return _Locked()


class _Decoded(nn.Module):
    """Its BYTES input as text, bytes that are not UTF-8 kept as lone surrogates (the
    usual ``surrogateescape``)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        texts = [value.decode(errors="surrogateescape") for value in x.reshape(-1).tolist()]
        return np.array(texts, dtype=np.object_)


def decoded() -> nn.Module:
    return _Decoded()
