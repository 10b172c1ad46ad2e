"""In-process PyTorch backend: a TorchScript file, or ``module:factory`` plus a state dict.

Placement (``placement.py``): ``spec.instances`` instances on each of the model's
devices. On CUDA every instance owns its copy of the module on its device, a CUDA
stream and pinned staging buffers (``staging.py``); on the CPU every instance is a
copy of one module that shares its parameters (the weights, read-only in inference)
and has its own buffers and other state (:func:`_sharing_weights`): a model that
writes its answer into a buffer it keeps, called by two instances at once, answered
one tenant with another's rows when the instances shared one module. Idle instances
wait in a FIFO, so the one idle longest runs the next batch, spreading batches over
the devices.

A batch runs on its instance's thread (a pool of as many threads as instances), so the
event loop never waits on a heavy model — unless calls are measured to be cheap: while
the moving average of a call's compute time (and of its time per input element, times
the call's elements) stays under ``inline_below_s``, the call runs on the event loop
itself with an idle instance, because for an identity or tiny model the thread hop
costs far more than the forward pass. Every call is timed and a slower sample replaces
the average at once, so a model that turns slow (or a batch or an input that turns
large: a wide one of one row once passed for cheap) moves back to the pool after one
call. On the CPU a call's time is its wall time where the thread that ran it waited (a
sleep, a lock, the model's own threads), its CPU time where it did not
(:func:`_call_time`): on a core busy with gRPC's threads, an identity model's calls
were preempted often enough that their wall time sent one in five to the pool, each
paying the hop the measure is there to save. On CUDA it is always the wall time (a
thread synchronising with the device may spin or yield rather than sleep). A model
whose call held the event loop :data:`HELD_LOOP_S` or more never runs there again
(until it is loaded again): its cost depends on what it is sent, and a tenant could
otherwise stall every other tenant's calls with one slow call after each few dozen
cheap ones. The first such call cannot be caught (nor one that never
returns): a model whose cost may depend on input values is configured
``inline: never`` (``spec.inline`` false), and never runs on the loop.

A model's answer is checked against its declared outputs (the names or count, the
rank and fixed dimensions, the rows of a batched model, a datatype numpy casts to the
declared one within its kind): one that does not match is the configuration's fault,
not the caller's, answered UNAVAILABLE and logged once per output and problem (a float
model declared INT32 answered zeros; one declared 10 wide answered 16 columns). On a
batch of several requests the same check raises :class:`BatchOutputMismatch` instead,
which the batcher splits on as on a model error: one request's data can make a model
answer the wrong rows or shape, and only a request that gets it alone is answered
UNAVAILABLE (its batch-mates were all refused with it).

The instance concatenates the requests of a batch itself (:meth:`TorchBackend.infer_batch`),
off the event loop. On the CPU inputs reach the model zero-copy (``torch.from_numpy``:
a lone request's are views of its own bytes, which a model may write to in place; a
one-byte input is copied, :func:`_host_input`). On CUDA they are concatenated
straight into the instance's pinned buffers, copied to the device with
``non_blocking`` on the instance's stream, the forward pass and the copies of the
outputs back to (pinned) host memory are queued on that stream, and only that stream
is synchronised — after which the staging buffers are free again, even when the model
raised.

A forward pass cannot be stopped once a thread runs it. A call of the scheduler
without batching (``hold_on_cancel``: it awaits the call in its caller's task and holds
a slot for it) cancelled then (its caller gone, a deadline passed) ends when the
forward pass does, so that the slot stays taken until the instance is free: freed at
once, the next calls went past the tenants' fair queue into the threads' queue, where
they were charged though they never ran and an unload could not answer them. A second
cancellation ends the wait. Other calls (a warm-up, whose load may time out; a batch,
cancelled only as its batcher closes) end at once. Cancelled before a thread took it,
a call never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import queue
import resource
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

from mandant.backends.cpu_quota import fit_threads_to_quota
from mandant.backends.placement import place
from mandant.backends.staging import StagingBuffers
from mandant.backends.threads import ModelThreads, in_own_thread, model_error
from mandant.backends.torch_load import build_module, init_weights
from mandant.config import ModelSpec
from mandant.errors import InvalidInput, Unavailable
from mandant.types import DATATYPES

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds  # type: ignore[attr-defined]

logger = logging.getLogger(__name__)

# A lone request's inputs are views of its own bytes, read-only to numpy, which torch
# warns about once: a model may still write to them in place, and what it writes stays
# in that request's bytes (:func:`_host_input` copies the one case where it would not).
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning
)


#: numpy dtype kinds torch cannot hold; such inputs reach the model as numpy arrays.
_NON_TENSOR_KINDS = frozenset("OSUV")

#: One input of a batch: that input's array from each request, in order.
Column = Sequence[np.ndarray]


class ModelLoadError(RuntimeError):
    """A model could not be loaded at start-up; the message names the model and why."""


#: Calls measured cheaper than this run on the event loop (see module doc).
DEFAULT_INLINE_BELOW_S = 150e-6
#: A call that held the event loop this long keeps its model off it (module doc).
HELD_LOOP_S = 0.01
#: Weight of the newest call in the cost averages.
_SMOOTHING = 0.2


@dataclass(eq=False, slots=True)
class _Instance:
    """One copy of the model (shared by the CPU's instances) and, on CUDA, what this
    instance alone uses: its stream and staging buffers. One thread at a time."""

    device: torch.device
    module: Callable[..., Any]
    stream: torch.cuda.Stream | None = None
    staging: StagingBuffers | None = None


class BatchOutputMismatch(RuntimeError):
    """A batch's outputs do not match the declared ones; which request's data caused
    it is unknown, so the batcher splits the batch as on a model error (not a
    MandantError: that would be a verdict for every request of the batch)."""


class OutputOutOfRange(RuntimeError):
    """An output holds values its declared type cannot: integers its (narrower) integer
    type cannot hold, which the codec's cast would wrap; finite numbers beyond its float
    type, which the cast would make infinities; text that is not Unicode (a lone
    surrogate, as ``bytes.decode(errors="surrogateescape")`` makes of bytes that are not
    UTF-8), which cannot be written. Only some inputs give such values: the model failed on
    this request's data, as when it raises (split on in a batch; charged, INVALID_ARGUMENT),
    not the configuration's fault for every call (UNAVAILABLE and refunded: a tenant could
    have run the model without end, uncharged, on inputs that overflow)."""


class TorchBackend:
    """Runs one model version in this process, on the CPU or CUDA devices.
    ``inline_below_s``: calls measured cheaper run on the event loop (0, or
    ``spec.inline`` false: never).
    ``compute_nice``: how much lower than the event loop the pool threads that run
    batches on the CPU are scheduled (a Linux nice increment; 0: the same, see
    ``server.compute_nice``); instances on CUDA keep the loop's priority."""

    def __init__(
        self,
        spec: ModelSpec,
        inline_below_s: float = DEFAULT_INLINE_BELOW_S,
        compute_nice: int = 0,
    ) -> None:
        fit_threads_to_quota()
        self._spec = spec
        self._compute_nice = compute_nice
        self._placement = place(spec.devices, spec.instances, _visible_gpus())
        self._input_names = tuple(t.name for t in spec.inputs)
        self._output_names = spec.output_names
        self._idle: queue.SimpleQueue[_Instance] | None = None
        self._loaded: tuple[_Instance, ...] = ()
        self._executor: ModelThreads | None = None
        self._inline_below_s = inline_below_s if spec.inline else 0.0
        self._call_s: float | None = None  # moving average of a call's compute time
        self._element_s = 0.0  # moving average of compute time per input element
        #: (output, problem) of the mismatched answers logged at ERROR already.
        self._mismatches: set[tuple[str, str]] = set()

    @property
    def ready(self) -> bool:
        return self._idle is not None and self._executor is not None

    @property
    def platform(self) -> str:
        return "pytorch" if self._spec.factory is not None else "pytorch_torchscript"

    @property
    def max_concurrency(self) -> int:
        return self._placement.size

    @property
    def devices(self) -> tuple[str, ...]:
        """Where the instances run: ``("cpu",)`` or GPUs ``("cuda:0", …)``."""
        return self._placement.devices

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes the instances keep to stage inputs (0 on the CPU); read
        while no batch runs, or as an approximation."""
        return sum(i.staging.held_bytes for i in self._loaded if i.staging is not None)

    async def start(self) -> None:
        if self._idle is not None:
            raise RuntimeError(f"model {self._spec.name!r} is already started")
        # Its own daemon thread, not the loop's executor: a load that never returns
        # (timed out by the registry) must not hold the process's exit.
        instances = await in_own_thread(self._load, f"load-{self._spec.name}")
        idle: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        for instance in instances:
            idle.put(instance)
        self._executor = ModelThreads(
            len(instances),
            f"torch-{self._spec.name}",
            # On a GPU the threads mostly wait for the device: they keep the loop's
            # priority, so that a busy host does not delay the next kernel launch.
            nice=0 if self._placement.on_cuda else self._compute_nice,
        )
        self._idle, self._loaded = idle, tuple(instances)
        logger.info(
            "loaded model %s version %s (%s) on %s with %d instance(s) each",
            self._spec.name,
            self._spec.version,
            self.platform,
            ", ".join(self._placement.devices),
            self._placement.per_device,
        )

    async def aclose(self) -> None:
        executor, self._executor, self._idle = self._executor, None, None
        self._loaded = ()
        if executor is not None:  # queued calls finish (a thread that may wait long)
            await in_own_thread(lambda: executor.shutdown(wait=True), "close-" + self._spec.name)
        if self._placement.on_cuda:
            torch.cuda.empty_cache()  # the instances are gone: give their memory back

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
        hold_on_cancel: bool = False,
    ) -> dict[str, np.ndarray]:
        """Runs the whole module (it computes every output anyway); ``outputs`` and
        ``deadline`` do not change an in-process forward pass. ``hold_on_cancel``:
        cancelled while a thread runs it, it ends with the forward pass (module doc)."""
        return await self._execute(self._columns((inputs,)), hold_on_cancel)

    async def infer_batch(
        self,
        parts: Sequence[Mapping[str, np.ndarray]],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`infer` on ``parts`` (several requests' inputs) concatenated along
        dimension 0 — by the instance that runs them, on CUDA straight into its
        pinned staging buffers (the dynamic batcher calls this)."""
        return await self._execute(self._columns(parts))

    def _columns(self, parts: Sequence[Mapping[str, np.ndarray]]) -> list[Column]:
        try:
            return [[part[name] for part in parts] for name in self._input_names]
        except KeyError:
            missing = [n for n in self._input_names if any(n not in part for part in parts)]
            raise InvalidInput(f"missing input(s): {', '.join(missing)}") from None

    async def _execute(
        self, columns: list[Column], hold_on_cancel: bool = False
    ) -> dict[str, np.ndarray]:
        idle, executor = self._idle, self._executor
        if idle is None or executor is None:
            raise Unavailable(f"model '{self._spec.name}' is not loaded")
        rows = sum(a.shape[0] if a.ndim else 1 for a in columns[0]) if columns else 1
        elements = sum(array.size for column in columns for array in column)
        outputs: dict[str, np.ndarray] | None = None
        if self._cheap(elements):
            try:
                instance = idle.get_nowait()
            except queue.Empty:  # every instance busy: wait for one in the pool
                pass
            else:
                outputs = self._run_on(instance, idle, columns, elements, inline=True)
        if outputs is None:
            work = executor.submit(self._run, idle, columns, elements)
            try:
                outputs = await asyncio.wrap_future(work)
            except asyncio.CancelledError:
                if hold_on_cancel and not work.cancel():  # a thread runs it (module doc)
                    with contextlib.suppress(BaseException):
                        await asyncio.wrap_future(work)
                raise
        self._check_outputs(outputs, rows, _parts(columns))
        return outputs

    def _check_outputs(self, outputs: Mapping[str, np.ndarray], rows: int, parts: int) -> None:
        """Refuse outputs unlike the declared ones: UNAVAILABLE for a lone request; for a
        batch of ``parts`` > 1 requests, :class:`BatchOutputMismatch` (split on)."""
        batched = self._spec.batching is not None
        for spec in self._spec.outputs:
            array = outputs[spec.name]
            shape = array.shape
            problem = None
            if not spec.accepts(shape):
                problem = ("shape", f"shape {list(shape)}", str(list(spec.shape)))
            elif batched and (not shape or shape[0] != rows):
                got = f"{shape[0]} rows" if shape else "no rows (a scalar)"
                problem = ("rows", got, f"{rows} (the batch's)")
            elif not _casts(array.dtype, spec.datatype):
                problem = ("datatype", str(array.dtype), spec.datatype)
            elif array.dtype.kind in "OU":  # text, declared BYTES (``_casts``)
                strays, garbled = _text_problems(array)
                if strays:
                    problem = ("datatype", f"objects of type {strays}", spec.datatype)
                elif garbled:
                    raise OutputOutOfRange(f"output {spec.name}: {garbled} where BYTES is declared")
            elif (values := _beyond(array, spec.datatype)) is not None:
                raise OutputOutOfRange(
                    f"output {spec.name}: {values} where {spec.datatype} is declared"
                )
            if problem is None:
                continue
            self._unlike(parts, spec.name, *problem)

    def _mismatch(self, output: str, problem: str, got: str, declared: str) -> NoReturn:
        """Refuse an answer that does not match the configuration (UNAVAILABLE), logged
        once per output and problem."""
        name = self._spec.name
        if (output, problem) not in self._mismatches:
            self._mismatches.add((output, problem))
            logger.error(
                "model %s: output %s does not match its configuration (%s: %s where %s is "
                "declared; check models[].outputs): its calls are refused UNAVAILABLE",
                name,
                output,
                problem,
                got,
                declared,
            )
        raise Unavailable(
            f"model '{name}' answered outputs its configuration does not declare "
            "(see the server log)"
        )

    def _cheap(self, elements: int) -> bool:
        """Whether a call of ``elements`` input elements is expected to cost less than
        the hop."""
        call_s = self._call_s
        if call_s is None:  # never measured: the pool, to be safe
            return False
        return max(call_s, self._element_s * elements) < self._inline_below_s

    def _run(
        self, idle: queue.SimpleQueue[_Instance], columns: list[Column], elements: int
    ) -> dict[str, np.ndarray]:
        # The batcher runs at most max_concurrency batches, one per instance, so an
        # instance is idle or about to be (one taken by an inline call).
        return self._run_on(idle.get(), idle, columns, elements)

    def _run_on(
        self,
        instance: _Instance,
        idle: queue.SimpleQueue[_Instance],
        columns: list[Column],
        elements: int,
        inline: bool = False,
    ) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        # CPU time where it tells (below); on CUDA, or never inline, the wall time.
        cpu = instance.stream is None and self._inline_below_s > 0
        usage = _thread_usage() if cpu else None
        try:
            if instance.stream is None:
                return self._forward_on_cpu(instance, columns)
            return self._forward_on_cuda(instance, columns)
        except Exception:
            raise
        except BaseException as exc:  # SystemExit on the loop would stop it (model_error)
            raise model_error(exc) from exc
        finally:
            elapsed = _call_time(time.perf_counter() - start, usage)
            idle.put(instance)
            # Races between pool threads only lose a sample; a float store is atomic.
            self._call_s = _cost(self._call_s, elapsed)
            self._element_s = _cost(self._element_s, elapsed / max(1, elements))
            if inline and elapsed >= HELD_LOOP_S and self._inline_below_s:
                self._inline_below_s = 0.0  # off the loop for good (module doc)
                logger.warning(
                    "model %s: a call held the event loop %.1f ms: its calls run on its "
                    "threads from now on",
                    self._spec.name,
                    elapsed * 1000,
                )

    def _forward_on_cpu(self, instance: _Instance, columns: list[Column]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = [_host_input(column) for column in columns]
            parts = _parts(columns)
            values = self._output_values(instance.module(*args), parts)
            return self._arrays(values, parts, args)

    def _arrays(
        self, values: list[object], parts: int, own: Sequence[object]
    ) -> dict[str, np.ndarray]:
        """The outputs as numpy arrays, by name, each in memory of this call's own
        (:func:`_owned`; ``own``: what is, the call's inputs and fresh copies); a value
        none can be made of (not a tensor or an array; a sparse, quantized, nested or
        meta tensor) is an answer unlike the declared outputs (:meth:`_unlike`), not a
        fault of the data."""
        arrays = {}
        extents = [extent for value in own if (extent := _extent(value)) is not None]
        for name, value in zip(self._output_names, values, strict=True):
            array = _to_numpy(value)
            if array is None:
                kind = f"{type(value).__name__}" + (
                    f" ({value.layout}, {value.device})" if isinstance(value, torch.Tensor) else ""
                )
                self._unlike(parts, name, "kind", kind, "a tensor or a numpy array")
            arrays[name] = _owned(array, extents)
        return arrays

    def _forward_on_cuda(self, instance: _Instance, columns: list[Column]) -> dict[str, np.ndarray]:
        stream, staging = instance.stream, instance.staging
        assert stream is not None and staging is not None
        parts = _parts(columns)
        with torch.cuda.device(instance.device), torch.cuda.stream(stream):
            try:
                with torch.inference_mode():
                    args = [_staged_input(staging, c, instance.device) for c in columns]
                    values = self._output_values(instance.module(*args), parts)
                    copies = [_copy_to_host(value) for value in values]
            finally:
                # This stream only: the copies from the staging buffers, the forward
                # pass and the copies back have all ended (or failed), so the buffers
                # may serve the next batch and the outputs may be read.
                stream.synchronize()
                staging.release()
        fresh = [  # copied from the device (a CPU tensor's "copy" is itself)
            copy
            for copy, value in zip(copies, values, strict=True)
            if isinstance(value, torch.Tensor) and not value.is_cpu and copy is not value
        ]
        return self._arrays(copies, parts, fresh)

    def _output_values(self, result: object, parts: int) -> list[object]:
        """The module's result as one value per declared output, in order; for a batch
        of ``parts`` > 1 requests, outputs missing or too many are a
        :class:`BatchOutputMismatch` (split on, as in :meth:`_check_outputs`)."""
        names = self._output_names
        if isinstance(result, torch.Tensor) and len(names) == 1:  # the common case
            return [result]
        if isinstance(result, Mapping):
            absent = [name for name in names if name not in result]
            if absent:
                self._unlike(parts, ", ".join(absent), "missing", "no such output", "one")
            values = [result[name] for name in names]
        elif isinstance(result, tuple | list):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(names):
            self._unlike(parts, "*", "count", f"{len(values)} output(s)", str(len(names)))
        return values

    def _unlike(self, parts: int, output: str, problem: str, got: str, declared: str) -> NoReturn:
        """An answer unlike the declared outputs: a lone request's is the
        configuration's fault (:meth:`_mismatch`); a batch's may be one request's data
        (a model whose outputs depend on it), so the batch is split."""
        if parts > 1:
            raise BatchOutputMismatch(
                f"output {output} of a batch of {parts} requests: {problem}: {got} "
                f"where {declared} is declared"
            )
        self._mismatch(output, problem, got, declared)

    def _load(self) -> list[_Instance]:
        spec = self._spec
        try:
            self._check_devices()
            if spec.weights_init is not None:
                init_weights(spec)
            return self._instances()
        except BaseException as exc:  # model code, on a thread of its own: its own error
            raise ModelLoadError(
                f"cannot load model {spec.name!r} version {spec.version}: {model_error(exc)}"
            ) from exc

    def _check_devices(self) -> None:
        if not self._placement.on_cuda:
            return
        if not torch.cuda.is_available():
            requested = ", ".join(self._spec.devices)
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
        visible = torch.cuda.device_count()
        missing = self._placement.missing(visible)
        if missing:
            raise RuntimeError(
                f"device(s) {', '.join(missing)} requested but {visible} GPU(s) are visible"
            )

    def _instances(self) -> list[_Instance]:
        """The placement's instances: on the CPU copies of one module sharing its
        weights (one built afresh where the module cannot be copied); on CUDA each with
        its own module (loaded afresh, as Triton loads each instance), stream and
        staging buffers."""
        places = self._placement.instances
        if not self._placement.on_cuda:
            cpu = torch.device("cpu")
            module = self._module(cpu)
            copies = [module]
            for _ in places[1:]:
                try:
                    copies.append(_sharing_weights(module))
                except Exception as exc:  # a lock, a file, an object that cannot be copied
                    logger.info(
                        "model %s: an instance is built afresh, then given the first's "
                        "weights (its module cannot be copied: %s)",
                        self._spec.name,
                        type(exc).__name__,
                    )
                    fresh = self._module(cpu)
                    # The same weights, shared: a factory without a seed built each
                    # instance its own, and answers depended on the instance.
                    fresh.load_state_dict(
                        dict(module.named_parameters()), strict=False, assign=True
                    )
                    copies.append(fresh)
            return [_Instance(cpu, copy) for copy in copies]
        instances = []
        for instance_place in places:
            device = torch.device(instance_place.device)
            stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            staging = StagingBuffers(pinned_array)
            instances.append(_Instance(device, self._module(device), stream, staging))
        for name in self._placement.devices:
            torch.cuda.synchronize(name)  # weights in place before another stream reads them
        return instances

    def _module(self, device: torch.device) -> torch.nn.Module:
        """A copy of the model, in eval mode, on ``device``."""
        spec = self._spec
        module: torch.nn.Module
        if spec.factory is not None:
            module = build_module(spec)
        elif spec.path is not None:
            # torch.jit.load has no annotations.
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(spec.path), map_location=device
            )
        else:
            raise RuntimeError("neither 'factory' nor 'path' is set")
        return module.to(device).eval()


def _sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters are the original's (a TorchScript
    module is copied whole: its copy takes no such hint)."""
    shared: dict[int, Any] = {id(parameter): parameter for parameter in module.parameters()}
    return copy.deepcopy(module, shared)


def _cost(average: float | None, sample: float) -> float:
    """A cautious moving average: a slower sample counts at once, faster ones slowly,
    so one slow call is enough to keep the next ones off the event loop."""
    if average is None or sample >= average:
        return sample
    return average + _SMOOTHING * (sample - average)


#: Where the system counts a thread's own CPU time and context switches (Linux).
_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)


def _thread_usage() -> tuple[float, int] | None:
    """This thread's CPU seconds and voluntary context switches so far (None where the
    system does not count switches per thread). The CPU time is the thread clock's:
    getrusage's advances a scheduler tick at a time for a running thread."""
    if _RUSAGE_THREAD is None:
        return None
    return time.thread_time(), resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


def _call_time(wall_s: float, before: tuple[float, int] | None) -> float:
    """What a call on the CPU that took ``wall_s`` cost its thread since ``before``
    (:func:`_thread_usage`; None: the wall time): the wall time if the thread waited on
    the way (a voluntary context switch: a sleep, a lock, the model's own threads: the
    event loop would have waited as long), else its CPU time, the rest being the core
    taken by other threads and processes, which the loop loses wherever the call runs."""
    after = _thread_usage()
    if before is None or after is None or after[1] != before[1]:
        return wall_s
    return min(wall_s, after[0] - before[0])


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _parts(columns: list[Column]) -> int:
    """How many requests a run's ``columns`` hold."""
    return len(columns[0]) if columns else 1


def pinned_array(dtype: np.dtype, elements: int) -> np.ndarray:
    """A page-locked host array of ``elements`` (the staging buffers' allocator on
    CUDA); it keeps its torch tensor, and so the memory, alive."""
    kind = torch.from_numpy(np.empty(0, dtype)).dtype
    return torch.empty(elements, dtype=kind, pin_memory=True).numpy()


#: Inputs this small are copied before a model sees them: CPython keeps one ``bytes``
#: object per byte value for the whole process (``b"\x05"`` is always the same
#: object), so a one-byte input decoded without a copy (INT8, UINT8, BOOL ``[1]``) is
#: a view of that shared object, and a model that wrote to it in place (``x.add_(1)``)
#: changed that byte for every later request of every tenant that held it.
_SHARED_BYTES_MAX = 1


def _host_input(column: Column) -> torch.Tensor | np.ndarray:
    """One input of a batch on the CPU: one request's array as it is, several
    concatenated; a tensor where torch can hold it (zero-copy, but for a one-byte
    input: :data:`_SHARED_BYTES_MAX`)."""
    array = column[0] if len(column) == 1 else np.concatenate(column)
    if array.dtype.kind in _NON_TENSOR_KINDS:
        return array  # BYTES: torch has no string tensor
    if array.nbytes <= _SHARED_BYTES_MAX and not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _staged_input(
    staging: StagingBuffers, column: Column, device: torch.device
) -> torch.Tensor | np.ndarray:
    """One input of a batch concatenated into a staging buffer and copied to
    ``device`` without blocking, on the current stream."""
    first = column[0]
    if first.dtype.kind in _NON_TENSOR_KINDS:
        return first if len(column) == 1 else np.concatenate(column)
    if len(column) == 1:
        host = staging.take(first.dtype, first.shape)
        np.copyto(host, first)
    else:
        rows = sum(array.shape[0] for array in column)
        host = staging.take(first.dtype, (rows, *first.shape[1:]))
        np.concatenate(column, out=host)
    return torch.from_numpy(host).to(device, non_blocking=True)


#: Float types numpy has none of: an output in one is widened to float32 (then cast to
#: the declared float type as any other), not refused.
_NUMPY_LACKS = frozenset(
    getattr(torch, name)
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def _copy_to_host(value: object) -> object:
    """Queue the copy of an output tensor to host memory on the current stream (a CUDA
    tensor lands in pinned memory); readable once the stream is synchronised. Anything
    else as it is: :func:`_to_numpy` judges it, and widens what numpy has no type for."""
    if not isinstance(value, torch.Tensor):
        return value
    try:
        return value.detach().to("cpu", non_blocking=True)
    except (RuntimeError, NotImplementedError):  # a meta tensor has no data to copy
        return value


def _extent(value: object) -> tuple[int, int] | None:
    """The addresses of the memory a tensor's storage or an array spans."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        start = storage.data_ptr()
        return start, start + storage.nbytes()
    if isinstance(value, np.ndarray):
        low, high = byte_bounds(value)
        return low, high
    return None


def _owned(array: np.ndarray, own: Sequence[tuple[int, int]]) -> np.ndarray:
    """``array``, or a copy of it where it may be memory the model keeps from call to
    call (a buffer it writes its answer into, a parameter, a cache): a batch's answers
    are read over later turns of the event loop (a large REST answer as its client
    takes it) while the instance runs the next batch, and that batch would write
    another tenant's rows into them. An output within ``own`` (the extents of this
    call's inputs, an echo's; of fresh copies) is the call's own, left as it is."""
    low, high = byte_bounds(array)
    if any(start <= low and high <= end for start, end in own):
        return array
    return array.copy()  # object arrays: their elements are immutable bytes and str


def _to_numpy(value: object) -> np.ndarray | None:
    """An output as a numpy array (zero-copy from a CPU tensor); None where it cannot
    be one: not a tensor or an array, or a tensor numpy cannot view (sparse,
    quantized, nested, on the meta device)."""
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, torch.Tensor):
        return None
    if value.dtype in _NUMPY_LACKS:
        value = value.float()
    try:
        if value.is_cpu:  # inference mode: even a parameter converts without a detach
            return value.numpy()
        return value.detach().cpu().numpy()
    except (TypeError, RuntimeError, NotImplementedError):
        return None


#: The kinds of numpy arrays each declared kind takes (the codec casts them): integers
#: and booleans as any integer or BOOL (an argmax's int64 as UINT8, a 0/1 mask as
#: BOOL), those and floats as a float; never a float as an integer (a float model
#: declared INT32 answered zeros), nor text as a number.
_TAKES = {"b": "biu", "i": "biu", "u": "biu", "f": "biuf"}


def _text_problems(array: np.ndarray) -> tuple[str, str | None]:
    """A BYTES output of objects or text: the types of its elements that are neither
    bytes nor str, named ("" where there are none: an int went out as that many NUL
    bytes, a None failed the call INTERNAL); and its first text element that UTF-8
    cannot encode (a lone surrogate: encoding it failed the call INTERNAL, a traceback
    logged for every call), said as the failure's message says it. Text that is ASCII
    (a flag of the string's, no pass over it) is not encoded to find out."""
    values = array.reshape(-1).tolist()
    types = set(map(type, values))
    strays = ", ".join(sorted(t.__name__ for t in types if not issubclass(t, (bytes, str))))
    if strays or str not in types:
        return strays, None
    texts = values if types == {str} else [v for v in values if type(v) is str]
    if all(map(str.isascii, texts)):
        return "", None
    for index, value in enumerate(values):
        if type(value) is str and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                return "", f"element {index} is text that is not Unicode ({exc.reason})"
    return "", None


def _beyond(array: np.ndarray, datatype: str) -> str | None:
    """What of a numeric output its declared type cannot carry
    (:class:`OutputOutOfRange`), said as the failure's message does; None where it can
    carry it all."""
    if array.size == 0:
        return None
    if DATATYPES[datatype].kind == "f":
        return _beyond_float(array, datatype)
    return _out_of_range(array, datatype)


def _beyond_float(array: np.ndarray, datatype: str) -> str | None:
    """For numbers declared a narrower float type (a float64 1e300 as FP32, an int64
    100000 as FP16), the span of finite values the declared type cannot hold, which
    numpy's cast would make infinities without a word."""
    target = DATATYPES[datatype]
    if np.can_cast(array.dtype, target) or array.dtype.kind not in "biuf":
        return None
    highest = float(np.finfo(target.name).max)
    if -highest <= array.min() and array.max() <= highest:  # NaN or an infinity: False
        return None  # two passes, no copy: a float64 model's usual answer
    with np.errstate(over="ignore"):
        cast = array.astype(target)
    overflowed = array[np.isinf(cast) & ~np.isinf(array)]
    if overflowed.size == 0:
        return None
    return f"values from {overflowed.min()} to {overflowed.max()}"


def _out_of_range(array: np.ndarray, datatype: str) -> str | None:
    """For integers declared a narrower integer type (an argmax's int64 as UINT8), the
    span of values the declared type cannot hold ("values from -200 to 300"), which
    numpy's cast would wrap without a word (300 went out as INT8 44); None where all
    fit, or the declared type holds every value of the array's."""
    target = DATATYPES[datatype]
    if target.kind not in "iu" or array.dtype.kind not in "iu":
        return None
    if np.can_cast(array.dtype, target):
        return None
    info = np.iinfo(target.name)
    low, high = int(array.min()), int(array.max())
    if info.min <= low and high <= info.max:
        return None
    return f"values from {low} to {high}"


def _casts(dtype: np.dtype, datatype: str) -> bool:
    """Whether an output of ``dtype`` may go out as ``datatype``."""
    if datatype == "BYTES":
        return dtype.kind in "OSU"
    return dtype.kind in _TAKES[DATATYPES[datatype].kind]
