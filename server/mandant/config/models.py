"""``models:``: one entry per model version as the file writes it: its tensors,
batching, Triton target, version policy (:data:`SERVE_ALL` by default), warm-up
requests and device placement (:func:`check_devices`, :func:`gpu_index`). Each entry is
checked on its own here; how entries resolve into what a backend gets is
:mod:`mandant.config.specs`."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from mandant.config._base import _NAME, _Frozen
from mandant.types import DATATYPES, TensorSpec

# Patterns a whole value must match (``fullmatch``, as in ``_base``).
_DIGITS = re.compile(r"^[0-9]{1,18}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda)$|^cuda:(\d+)$")
#: Bounds of what Triton's ModelConfig message (which Mandant answers with, and reads
#: from Triton) can hold: a dimension is an int64, ``max_batch_size`` and a preferred
#: size an int32. Beyond them a load succeeded and every tenant's ModelConfig of the
#: model failed INTERNAL.
MAX_DIMENSION = (1 << 63) - 1
MAX_BATCH_SIZE = (1 << 31) - 1
#: Longest ``max_queue_delay_ms``: an hour (Triton's field is microseconds in a uint64;
#: ``1e300`` passed and broke the model's ModelConfig).
MAX_QUEUE_DELAY_MS = 3_600_000.0
#: Most ``instances`` of a model on each device: each is a thread on the CPU, a copy
#: of the model on a GPU (10⁹ hung the load while memory grew).
MAX_INSTANCES = 256
#: ``version_policy``: ``latest`` is a uint32 in Triton's ModelConfig, a version an int64.
MAX_LATEST_VERSIONS = (1 << 32) - 1
MAX_VERSION = (1 << 63) - 1
#: Longest ``triton.timeout_s``, a day: a call's gRPC deadline is built from it (1e10 s
#: overflowed it: every call failed at once, and opened the breaker for every tenant).
MAX_TRITON_TIMEOUT_S = 86_400.0
#: Bounds of ``triton.health_interval_s``: 1e-300 polled Triton in a busy loop.
MIN_HEALTH_INTERVAL_S = 0.01
MAX_HEALTH_INTERVAL_S = 3_600.0


class TensorConfig(_Frozen):
    name: str
    datatype: str
    shape: tuple[int, ...]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value:
            raise ValueError("a tensor has a name")
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8, no protobuf string
            raise ValueError("a tensor's name is valid Unicode") from None
        return value

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}; one of {', '.join(DATATYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim < -1 or dim == 0 for dim in shape):
            raise ValueError("dimensions are positive, or -1 for any size")
        if any(dim > MAX_DIMENSION for dim in shape):
            raise ValueError(f"a dimension is at most {MAX_DIMENSION} (an int64)")
        return shape

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, self.shape)


class BatchingConfig(_Frozen):
    max_batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)] = 64
    max_queue_delay_ms: Annotated[float, Field(ge=0, le=MAX_QUEUE_DELAY_MS)] = 2.0
    preferred_batch_sizes: tuple[Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)], ...] = ()
    policy: Literal["fair", "fifo"] = "fair"
    #: adaptive: at once when alone, else gather the loop turn and hold while company
    #: is expected (never past max_queue_delay_ms); eager: whenever a slot is idle;
    #: delay: Triton's rule (wait up to max_queue_delay_ms for a full/preferred batch).
    dispatch: Literal["adaptive", "eager", "delay"] = "adaptive"
    #: Rows one tenant may have waiting for this model; more: RESOURCE_EXHAUSTED with a
    #: retry hint. Rows an idle execution slot is about to take do not wait.
    max_queue_rows: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> BatchingConfig:
        if self.max_queue_rows is not None and self.max_queue_rows < self.max_batch_size:
            raise ValueError(
                f"max_queue_rows ({self.max_queue_rows}) is below max_batch_size "
                f"({self.max_batch_size}): calls the model accepts could never be queued"
            )
        return self


class VersionPolicyConfig(_Frozen):
    """Which of a model's configured versions are served (Triton's names), exactly one
    of: ``latest: N`` (the N highest), ``specific: [1, 3]``, ``all: {}``. A model whose
    entries set none serves all of them (:data:`SERVE_ALL`)."""

    latest: Annotated[int, Field(gt=0, le=MAX_LATEST_VERSIONS)] | None = None
    specific: tuple[Annotated[int, Field(gt=0, le=MAX_VERSION)], ...] | None = None
    all: Mapping[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicyConfig:
        chosen = [name for name in ("latest", "specific", "all") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("set exactly one of 'latest: N', 'specific: [...]' or 'all: {}'")
        if self.all:
            raise ValueError("'all' takes no settings: write 'all: {}'")
        if self.specific is not None and not self.specific:
            raise ValueError("'specific' lists at least one version")
        return self

    def served(self, versions: Sequence[str]) -> set[str]:
        """The ``versions`` (configured ones) this policy serves."""
        if self.latest is not None:
            return set(sorted(versions, key=int, reverse=True)[: self.latest])
        if self.specific is not None:
            return {v for v in versions if int(v) in self.specific}
        return set(versions)


#: The default policy: every configured version is served.
SERVE_ALL = VersionPolicyConfig(all={})

#: Most elements of one warm-up request, all its inputs together (a typo in a shape
#: must not exhaust memory).
MAX_WARMUP_ELEMENTS = 1 << 24


class WarmupTensorConfig(_Frozen):
    """One input of a warm-up request: ``value`` repeated over ``shape`` (zeros when
    neither ``value`` nor ``random`` is set), or uniform random numbers in [0, 1)
    (integers: 0 or 1) with ``random: true``."""

    datatype: str
    shape: tuple[Annotated[int, Field(gt=0)], ...]
    value: bool | int | float | str | None = None
    random: bool = False

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        return TensorConfig._datatype(value)

    @field_validator("value", mode="before")
    @classmethod
    def _one_value(cls, value: object) -> object:
        """One element, said once for anything else (the union's members each said
        why not, with pydantic's tags in the field path)."""
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise ValueError("one element: a number, true or false, or text")

    @model_validator(mode="after")
    def _data(self) -> WarmupTensorConfig:
        if self.random and self.value is not None:
            raise ValueError("set 'value' or 'random', not both")
        if self.random and self.datatype == "BYTES":
            raise ValueError("'random' is for numeric datatypes; give BYTES a 'value'")
        elements = 1
        for dim in self.shape:
            elements *= dim
        if elements > MAX_WARMUP_ELEMENTS:
            raise ValueError(f"more than {MAX_WARMUP_ELEMENTS} elements")
        if self.value is not None and (problem := _unfit(self.datatype, self.value)):
            raise ValueError(f"'value' {self.value!r}: {problem}")
        return self


def _unfit(datatype: str, value: bool | int | float | str) -> str | None:
    """Why ``value`` is not a ``datatype`` element (None if it is one): numpy made 300
    a load failure for UINT8, "no" true for BOOL and 1e10 infinity for FP16."""
    if datatype == "BYTES":
        return None if isinstance(value, str) else "BYTES takes text"
    if datatype == "BOOL":
        return None if isinstance(value, bool) else "BOOL takes true or false"
    if isinstance(value, (bool, str)):
        return f"{datatype} takes a number"
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        if not isinstance(value, int):
            return f"{datatype} takes an integer"
        info: Any = np.iinfo(dtype)
        low: float = int(info.min)
        high: float = int(info.max)
    else:
        info = np.finfo(dtype)
        low, high = float(info.min), float(info.max)
    if not low <= value <= high:
        return f"out of {datatype}'s range [{low:g}, {high:g}]"
    return None


class WarmupConfig(_Frozen):
    """A warm-up request, run ``count`` times on the model version's backend before it
    is ready (Triton's ``model_warmup``); inputs by name."""

    inputs: Mapping[str, WarmupTensorConfig]
    count: Annotated[int, Field(gt=0, le=1000)] = 1

    @field_validator("inputs")
    @classmethod
    def _some(cls, inputs: Mapping[str, WarmupTensorConfig]) -> Mapping[str, WarmupTensorConfig]:
        if not inputs:
            raise ValueError("a warm-up request has at least one input")
        elements = sum(math.prod(tensor.shape) for tensor in inputs.values())
        if elements > MAX_WARMUP_ELEMENTS:  # each input within it, many inputs not
            raise ValueError(f"more than {MAX_WARMUP_ELEMENTS} elements in all")
        return inputs

    def unfit(self, model: str, declared: Sequence[TensorConfig]) -> list[tuple[str, str]]:
        """Where this request does not give model ``model`` its ``declared`` inputs (a
        call must give each, and no other, in its datatype and shape), each (field path
        under the request, reason): the load would fail with "missing input(s)", naming
        not the input misspelt, or with torch's words for a wrong dtype or shape."""
        names = [tensor.name for tensor in declared]
        has = f"model {model!r} has {', '.join(names)}"
        problems = [
            (f"inputs.{name[:64]}", f"no such input ({has})")
            for name in self.inputs
            if name not in names
        ]
        missing = [name for name in names if name not in self.inputs]
        if missing:
            problems.append(("inputs", f"missing input(s) {', '.join(missing)} ({has})"))
        for tensor in declared:
            given = self.inputs.get(tensor.name)
            if given is None:
                continue
            where = f"inputs.{tensor.name}"
            if given.datatype != tensor.datatype:
                why = f"{given.datatype} where model {model!r} declares {tensor.datatype}"
                problems.append((f"{where}.datatype", why))
            elif not tensor.spec().accepts(given.shape):
                why = f"{list(given.shape)} where model {model!r} declares {list(tensor.shape)}"
                problems.append((f"{where}.shape", f"{why} (-1: any size)"))
        return problems


class TritonModelConfig(_Frozen):
    """Where a ``backend: triton`` model runs. ``model``/``version`` name it on Triton
    (any Mandant name may map to any Triton model; "" is Triton's latest version)."""

    url: str
    model: str
    version: str = ""
    timeout_s: Annotated[float, Field(gt=0, le=MAX_TRITON_TIMEOUT_S)] = 30.0
    tls: bool = False
    #: Calls in flight to Triton at once for this model. Triton queues and batches
    #: them first come first served: tenants take turns in Mandant's queues only for
    #: the calls beyond it. ``auto``: twice what Triton's model config says it runs at
    #: once (``backends/triton.py``), 256 where the config does not say.
    max_in_flight: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    #: How often Triton's readiness and metadata are polled.
    health_interval_s: Annotated[
        float, Field(ge=MIN_HEALTH_INTERVAL_S, le=MAX_HEALTH_INTERVAL_S)
    ] = 1.0

    @field_validator("max_in_flight", mode="before")
    @classmethod
    def _max_in_flight(cls, value: object) -> object:
        """``auto`` or a whole number from 1, said once otherwise (the union's members
        each said why not)."""
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            return value
        raise ValueError("'auto', or a number of calls from 1")


class ModelConfig(_Frozen):
    """One model version. ``tenant`` makes it private to that tenant; with ``base``
    it is that tenant's tuned variant of a shared model and inherits what it does
    not set."""

    name: str | None = None
    version: str = "1"
    tenant: str | None = None
    base: str | None = None
    backend: Literal["torch", "triton"] | None = None
    path: Path | None = None
    factory: str | None = None
    factory_args: Mapping[str, Any] | None = None
    weights_init: str | None = None
    #: Where the model runs: ``auto`` (every visible GPU, else the CPU), ``cpu``,
    #: ``cuda`` (every visible GPU) or ``cuda:N``; ``devices`` lists GPUs instead.
    device: str | None = None
    devices: tuple[str, ...] | None = None
    #: Copies of the model on each device (threads sharing one copy on the CPU).
    instances: Annotated[int, Field(gt=0, le=MAX_INSTANCES)] | None = None
    #: ``auto``: an in-process model whose calls are measured cheap (under 150 µs) runs
    #: them on the event loop, without a thread hop; ``never``: always on its threads.
    #: Set ``never`` for a model whose cost may depend on input values (a loop until
    #: some value, a decode that stops at a token): one such call, cheap until then,
    #: holds every tenant's calls for as long as it runs (once per load: the model then
    #: leaves the loop for good).
    inline: Literal["auto", "never"] | None = None
    inputs: tuple[TensorConfig, ...] | None = None
    outputs: tuple[TensorConfig, ...] | None = None
    batching: BatchingConfig | None = None
    triton: TritonModelConfig | None = None
    #: Which versions of the model are served; entries of one model that set it agree.
    version_policy: VersionPolicyConfig | None = None
    #: Requests run before the version is ready (a failing one fails the load).
    warmup: tuple[WarmupConfig, ...] | None = None

    @field_validator("inputs", "outputs")
    @classmethod
    def _distinct_names(
        cls, tensors: tuple[TensorConfig, ...] | None
    ) -> tuple[TensorConfig, ...] | None:
        """Triton refuses a name given twice; served, every call failed, charged to its
        caller as its inputs' fault (two inputs) or UNAVAILABLE (two outputs)."""
        names = [tensor.name for tensor in tensors or ()]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"a tensor name is given twice: {', '.join(twice)}")
        return tensors

    @field_validator("name", "base")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(
                "must be 1-128 letters, digits, '_', '.', '-' (a model name is part of "
                "REST paths and of '<tenant>/<name>')"
            )
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> str:
        """One spelling per version (``01`` and ``1`` are version 1), so that a
        version defined twice is caught."""
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not _DIGITS.fullmatch(text) or int(text) < 1:
            raise ValueError("versions are positive integers (1, 2, …; at most 18 digits)")
        return str(int(text))

    @field_validator("factory", "weights_init")
    @classmethod
    def _callable_ref(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError("expected 'package.module:callable'")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return None if value is None else check_devices((value,))[0]

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if any(gpu_index(device) is None for device in value):
            raise ValueError("'devices' lists GPUs as cuda:N (for one device or all, use 'device')")
        return check_devices(value)

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.name is None and self.base is None:
            raise ValueError("a model needs a name (or a base, for a tuned variant)")
        if self.device is not None and self.devices is not None:
            raise ValueError("set 'device' or 'devices', not both")
        if self.base is not None and self.tenant is None:
            raise ValueError("a tuned variant (base) belongs to a tenant: set 'tenant'")
        return self

    @property
    def model_name(self) -> str:
        name = self.name or self.base
        assert name is not None
        return name


def check_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """``devices`` in their one spelling (``cuda:01`` is ``cuda:1``), or ValueError.
    Either one of ``auto``, ``cpu``, ``cuda`` (every visible GPU), ``cuda:N``; or
    several distinct ``cuda:N``."""
    if not devices:
        raise ValueError("expected at least one device")
    spelled = []
    for device in devices:
        match = _DEVICE.fullmatch(device)
        if match is None:
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        spelled.append(device if match.group(2) is None else f"cuda:{int(match.group(2))}")
    if len(spelled) > 1:
        if any(gpu_index(device) is None for device in spelled):
            raise ValueError("several devices are GPUs named cuda:N")
        if len(set(spelled)) != len(spelled):
            raise ValueError("a device is listed twice")
    return tuple(spelled)


def gpu_index(device: str) -> int | None:
    """``N`` of ``cuda:N``; None for any other device."""
    match = _DEVICE.fullmatch(device)
    return None if match is None or match.group(2) is None else int(match.group(2))
