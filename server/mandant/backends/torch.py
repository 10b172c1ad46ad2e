"""In-process PyTorch backend: a TorchScript file, or ``module:factory`` plus a state dict.

Loading happens in :meth:`TorchBackend.start` on a worker thread. A call runs on a
dedicated pool of ``spec.instances`` threads, so the event loop never waits on a heavy
model — unless calls are measured to be cheap: while the moving average of a call's
compute time (and of its time per row, times the call's rows) stays under
``inline_below_s``, the call runs on the event loop itself, because for an identity or
tiny model the thread hop costs far more than the forward pass. Every call is timed and
a slower sample replaces the average at once, so a model that turns slow (or a batch
that turns large) moves back to the pool after one call.
Inputs reach the model zero-copy (``torch.from_numpy``); they may view a request's
read-only bytes, so models must not modify their inputs in place.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mandant.config import ModelSpec
from mandant.errors import InvalidInput, Unavailable

logger = logging.getLogger(__name__)

# Inputs are read-only views of request bytes; torch warns once about that. We never
# write to them, and copying would defeat the zero-copy path.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning
)

#: numpy dtype kinds torch cannot hold; such inputs reach the model as numpy arrays.
_NON_TENSOR_KINDS = frozenset("OSUV")


class ModelLoadError(RuntimeError):
    """A model could not be loaded at start-up; the message names the model and why."""


#: Calls measured cheaper than this run on the event loop (see module doc).
DEFAULT_INLINE_BELOW_S = 150e-6
#: Weight of the newest call in the cost averages.
_SMOOTHING = 0.2


class TorchBackend:
    """Runs one model version in this process, on CPU or a CUDA device.
    ``inline_below_s``: calls measured cheaper run on the event loop (0: never)."""

    def __init__(self, spec: ModelSpec, inline_below_s: float = DEFAULT_INLINE_BELOW_S) -> None:
        self._spec = spec
        self._device = torch.device(_pick_device(spec.device))
        self._on_cuda = self._device.type == "cuda"
        self._input_names = tuple(t.name for t in spec.inputs)
        self._output_names = spec.output_names
        self._module: Callable[..., Any] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inline_below_s = inline_below_s
        self._call_s: float | None = None  # moving average of a call's compute time
        self._row_s = 0.0  # moving average of compute time per row

    @property
    def ready(self) -> bool:
        return self._module is not None and self._executor is not None

    @property
    def platform(self) -> str:
        return "pytorch" if self._spec.factory is not None else "pytorch_torchscript"

    @property
    def max_concurrency(self) -> int:
        return self._spec.instances

    @property
    def device(self) -> str:
        return str(self._device)

    async def start(self) -> None:
        if self._module is not None:
            raise RuntimeError(f"model {self._spec.name!r} is already started")
        module = await asyncio.to_thread(self._load)
        self._executor = ThreadPoolExecutor(
            max_workers=self._spec.instances, thread_name_prefix=f"torch-{self._spec.name}"
        )
        self._module = module
        logger.info(
            "loaded model %s version %s (%s) on %s with %d instance(s)",
            self._spec.name,
            self._spec.version,
            self.platform,
            self._device,
            self._spec.instances,
        )

    async def aclose(self) -> None:
        executor, self._executor, self._module = self._executor, None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)  # queued calls finish
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def stack_inputs(self, parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Concatenate requests' inputs along dimension 0 for one batch (the dynamic
        batcher calls this). On CUDA the batch lands in pinned host memory, so the
        ``non_blocking`` copy to the device is truly asynchronous; the returned arrays
        view that memory and keep it alive until the batch's tensors are gone."""
        stacked: dict[str, np.ndarray] = {}
        for name in parts[0]:
            arrays = [part[name] for part in parts]
            first = arrays[0]
            if self._device.type != "cuda" or first.dtype.kind in _NON_TENSOR_KINDS:
                stacked[name] = np.concatenate(arrays)
                continue
            rows = sum(array.shape[0] for array in arrays)
            pinned = torch.empty(
                (rows, *first.shape[1:]),
                dtype=torch.from_numpy(first[:0]).dtype,
                pin_memory=True,
            )
            stacked[name] = np.concatenate(arrays, out=pinned.numpy())
        return stacked

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs the whole module (it computes every output anyway); ``outputs`` and
        ``deadline`` do not change an in-process forward pass."""
        module, executor = self._module, self._executor
        if module is None or executor is None:
            raise Unavailable(f"model '{self._spec.name}' is not loaded")
        try:
            arrays = [inputs[name] for name in self._input_names]
        except KeyError:
            missing = [name for name in self._input_names if name not in inputs]
            raise InvalidInput(f"missing input(s): {', '.join(missing)}") from None
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        if self._cheap(rows):
            return self._run(module, arrays, rows)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._run, module, arrays, rows)

    def _cheap(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows is expected to cost less than the hop."""
        call_s = self._call_s
        if call_s is None:  # never measured: the pool, to be safe
            return False
        return max(call_s, self._row_s * rows) < self._inline_below_s

    def _run(
        self, module: Callable[..., Any], arrays: list[np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                args = [self._to_tensor(array) for array in arrays]
                result = module(*args)
                return self._outputs(result)
        finally:
            # Wall time, not CPU time: a model that waits (a GPU synchronising, a
            # sleep) blocks the event loop as much as one that computes. A preempted
            # call on a busy core counts as slow too, which errs on the safe side.
            # Races between pool threads only lose a sample; a float store is atomic.
            elapsed = time.perf_counter() - start
            self._call_s = _cost(self._call_s, elapsed)
            self._row_s = _cost(self._row_s, elapsed / max(1, rows))

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor | np.ndarray:
        if array.dtype.kind in _NON_TENSOR_KINDS:
            return array  # BYTES: torch has no string tensor
        tensor = torch.from_numpy(array)
        if self._on_cuda:
            tensor = tensor.to(self._device, non_blocking=True)
        return tensor

    def _outputs(self, result: object) -> dict[str, np.ndarray]:
        names = self._output_names
        if isinstance(result, torch.Tensor) and len(names) == 1:  # the common case
            return {names[0]: _to_numpy(self._spec.name, names[0], result)}
        if isinstance(result, Mapping):
            absent = [name for name in names if name not in result]
            if absent:
                raise RuntimeError(
                    f"model {self._spec.name!r} returned no output named {', '.join(absent)}"
                )
            values = [result[name] for name in names]
        elif isinstance(result, tuple | list):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(names):
            raise RuntimeError(
                f"model {self._spec.name!r} returned {len(values)} output(s), "
                f"its configuration declares {len(names)}"
            )
        model = self._spec.name
        return {name: _to_numpy(model, name, v) for name, v in zip(names, values, strict=True)}

    def _load(self) -> Callable[..., Any]:
        spec = self._spec
        try:
            if self._device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(f"device {spec.device!r} requested but CUDA is not available")
            if spec.weights_init is not None:
                _init_weights(spec)
            module: torch.nn.Module
            if spec.factory is not None:
                module = _build(spec)
            elif spec.path is not None:
                # torch.jit.load has no annotations.
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(spec.path), map_location=self._device
                )
            else:
                raise RuntimeError("neither 'factory' nor 'path' is set")
            return module.to(self._device).eval()
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {spec.name!r} version {spec.version}: {exc}"
            ) from exc


def _cost(average: float | None, sample: float) -> float:
    """A cautious moving average: a slower sample counts at once, faster ones slowly,
    so one slow call is enough to keep the next ones off the event loop."""
    if average is None or sample >= average:
        return sample
    return average + _SMOOTHING * (sample - average)


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _import_ref(ref: str) -> Callable[..., Any]:
    module_name, _, attr_path = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    target = functools.reduce(getattr, attr_path.split("."), target)
    if not callable(target):
        raise TypeError(f"{ref!r} is not callable")
    return target  # type: ignore[no-any-return]


def _init_weights(spec: ModelSpec) -> None:
    """Create the weights file with ``weights_init`` if it is missing; written under a
    temporary name and renamed, so an interrupted build leaves no half file."""
    assert spec.weights_init is not None
    if spec.path is None:
        raise RuntimeError("'weights_init' needs a 'path' to write to")
    path = Path(spec.path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per call: models sharing one weights path may build it at the same time;
    # each writes its own file and the last rename wins (same seed, same bytes).
    partial = path.with_name(f"{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex}{path.suffix}")
    logger.info("creating weights for model %s at %s", spec.name, path)
    try:
        _import_ref(spec.weights_init)(partial, **spec.factory_args)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _build(spec: ModelSpec) -> torch.nn.Module:
    assert spec.factory is not None
    module = _import_ref(spec.factory)(**spec.factory_args)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"factory {spec.factory!r} returned {type(module).__name__}, not a Module")
    if spec.path is not None:
        path = Path(spec.path)
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    return module


def _to_numpy(model: str, name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise RuntimeError(
        f"model {model!r} returned {type(value).__name__} for output {name!r}, "
        "expected a tensor or a numpy array"
    )
