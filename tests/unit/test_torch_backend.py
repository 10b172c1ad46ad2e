from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mandant.backends.base import Backend
from mandant.backends.threads import ModelExit
from mandant.backends.torch import ModelLoadError, OutputOutOfRange, TorchBackend
from mandant.config import BatchingConfig, ModelSpec
from mandant.demo import models
from mandant.errors import DeadlineExceeded, InvalidInput, Unavailable
from mandant.scheduling.direct import DirectScheduler
from mandant.types import DATATYPES, TensorSpec, datatype_of
from tests.fakes import request
from tests.unit.torch_models import kept_after_the_next_call

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning"),
    # The backend silences this at import; pytest resets warning filters for each test.
    pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning"),
]

HELPERS = "tests.unit.torch_models"
CLASSIFIER_IN = (TensorSpec("INPUT0", "FP32", (-1, 256)),)
CLASSIFIER_OUT = (TensorSpec("OUTPUT0", "FP32", (-1, 16)),)


def make_spec(
    *,
    factory: str | None = None,
    path: Path | None = None,
    weights_init: str | None = None,
    factory_args: Mapping[str, Any] | None = None,
    inputs: tuple[TensorSpec, ...] = CLASSIFIER_IN,
    outputs: tuple[TensorSpec, ...] = CLASSIFIER_OUT,
    instances: int = 1,
    device: str = "auto",
) -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        tenant=None,
        backend="torch",
        path=path,
        factory=factory,
        factory_args=dict(factory_args or {}),
        weights_init=weights_init,
        devices=(device,),
        instances=instances,
        inputs=inputs,
        outputs=outputs,
        batching=None,
        triton=None,
    )


async def run_once(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    backend = TorchBackend(spec)
    await backend.start()
    try:
        return await backend.infer(inputs)
    finally:
        await backend.aclose()


def features(rows: int, width: int = 256, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)


def expected(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out: np.ndarray = module(torch.from_numpy(x.copy())).numpy()
    return out


def test_satisfies_backend_protocol() -> None:
    backend: Backend = TorchBackend(make_spec(factory="mandant.demo.models:echo"))
    assert backend.max_concurrency == 1


async def test_factory_with_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "classifier.safetensors"
    models.build_classifier_weights(path, seed=3)
    x = features(4)
    spec = make_spec(factory="mandant.demo.models:classifier", path=path)
    backend = TorchBackend(spec)
    assert not backend.ready
    assert backend.platform == "pytorch"
    await backend.start()
    assert backend.ready
    out = await backend.infer({"INPUT0": x})
    await backend.aclose()
    assert not backend.ready
    assert list(out) == ["OUTPUT0"]
    assert out["OUTPUT0"].dtype == np.float32
    np.testing.assert_array_equal(out["OUTPUT0"], expected(models.classifier(3), x))


async def test_factory_with_torch_save_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "classifier.pt"
    torch.save(models.classifier(5).state_dict(), path)
    x = features(3)
    spec = make_spec(factory="mandant.demo.models:classifier", path=path)
    out = await run_once(spec, {"INPUT0": x})
    np.testing.assert_array_equal(out["OUTPUT0"], expected(models.classifier(5), x))


async def test_factory_without_path_uses_factory_weights() -> None:
    x = features(2)
    spec = make_spec(factory="mandant.demo.models:classifier", factory_args={"seed": 9})
    out = await run_once(spec, {"INPUT0": x})
    np.testing.assert_array_equal(out["OUTPUT0"], expected(models.classifier(9), x))


async def test_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "fraud.pt"
    models.build_fraud_torchscript(path, seed=2)
    x = features(6, width=32)
    spec = make_spec(
        path=path,
        inputs=(TensorSpec("INPUT0", "FP32", (-1, 32)),),
        outputs=(TensorSpec("SCORE", "FP32", (-1, 1)),),
    )
    backend = TorchBackend(spec)
    assert backend.platform == "pytorch_torchscript"
    await backend.start()
    out = await backend.infer({"INPUT0": x})
    await backend.aclose()
    np.testing.assert_allclose(out["SCORE"], expected(models.fraud(2), x), rtol=1e-6)


async def test_weights_init_creates_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "classifier.safetensors"
    spec = make_spec(
        factory="mandant.demo.models:classifier",
        path=path,
        weights_init="mandant.demo.models:build_classifier_weights",
        factory_args={"seed": 1},
    )
    x = features(2)
    out = await run_once(spec, {"INPUT0": x})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["classifier.safetensors"]
    np.testing.assert_array_equal(out["OUTPUT0"], expected(models.classifier(1), x))

    again = tmp_path / "again.safetensors"
    await run_once(spec.model_copy(update={"path": again}), {"INPUT0": x})
    assert again.read_bytes() == path.read_bytes()

    other = tmp_path / "other.safetensors"
    spec_other = spec.model_copy(update={"path": other, "factory_args": {"seed": 2}})
    out_other = await run_once(spec_other, {"INPUT0": x})
    assert other.read_bytes() != path.read_bytes()
    assert not np.array_equal(out_other["OUTPUT0"], out["OUTPUT0"])


async def test_weights_init_leaves_existing_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "classifier.safetensors"
    models.build_classifier_weights(path, seed=4)
    spec = make_spec(
        factory="mandant.demo.models:classifier",
        path=path,
        weights_init="mandant.demo.models:build_classifier_weights",
        factory_args={"seed": 0},
    )
    x = features(2)
    out = await run_once(spec, {"INPUT0": x})
    np.testing.assert_array_equal(out["OUTPUT0"], expected(models.classifier(4), x))


async def test_weights_init_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "models" / "fraud.pt"
    spec = make_spec(
        path=path,
        weights_init="mandant.demo.models:build_fraud_torchscript",
        factory_args={"seed": 2},
        inputs=(TensorSpec("INPUT0", "FP32", (-1, 32)),),
        outputs=(TensorSpec("SCORE", "FP32", (-1, 1)),),
    )
    x = features(3, width=32)
    out = await run_once(spec, {"INPUT0": x})
    np.testing.assert_allclose(out["SCORE"], expected(models.fraud(2), x), rtol=1e-6)


PAIR_IN = (TensorSpec("A", "FP32", (-1,)), TensorSpec("B", "FP32", (-1,)))


@pytest.mark.parametrize("factory", ["pair", "pair_dict"])
async def test_multiple_outputs_map_to_declared_names(factory: str) -> None:
    spec = make_spec(
        factory=f"{HELPERS}:{factory}",
        inputs=PAIR_IN,
        outputs=(TensorSpec("SUM", "FP32", (-1,)), TensorSpec("PRODUCT", "FP32", (-1,))),
    )
    a = np.array([1, 2, 3], dtype=np.float32)
    b = np.array([10, 20, 30], dtype=np.float32)
    out = await run_once(spec, {"B": b, "A": a})  # mapping order must not matter
    assert list(out) == ["SUM", "PRODUCT"]
    np.testing.assert_array_equal(out["SUM"], a + b)
    np.testing.assert_array_equal(out["PRODUCT"], a * b)


async def test_outputs_that_require_grad_or_view_the_input_come_back_as_arrays() -> None:
    """CPU outputs become arrays without a copy: a computed tensor, a parameter (it
    requires grad, which converts in inference mode only) and the input itself."""
    vector = (TensorSpec("X", "FP32", (3,)),)
    spec = make_spec(
        factory=f"{HELPERS}:scaled",
        inputs=vector,
        outputs=(TensorSpec("SCALED", "FP32", (3,)), TensorSpec("WEIGHT", "FP32", (3,))),
    )
    out = await run_once(spec, {"X": np.array([1, 2, 3], dtype=np.float32)})
    np.testing.assert_array_equal(out["SCALED"], [2, 4, 6])
    np.testing.assert_array_equal(out["WEIGHT"], [2, 2, 2])
    echo = make_spec(factory="mandant.demo.models:echo", inputs=vector, outputs=vector)
    sent = np.array([7, 8, 9], dtype=np.float32)
    np.testing.assert_array_equal((await run_once(echo, {"X": sent}))["X"], sent)


# An answer that does not match the declared outputs is the configuration's fault, not
# the caller's: UNAVAILABLE (refunded), the detail in the server's log, once.
MISMATCH = "answered outputs its configuration does not declare"


async def _mismatched(
    spec: ModelSpec, inputs: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> str:
    with pytest.raises(Unavailable, match=MISMATCH):
        await run_once(spec, inputs)
    (record,) = [r for r in caplog.records if "does not match its configuration" in r.message]
    return record.message


async def test_wrong_output_count_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    spec = make_spec(factory=f"{HELPERS}:pair", inputs=PAIR_IN, outputs=CLASSIFIER_OUT)
    one = np.ones(2, dtype=np.float32)
    assert "2 output(s) where 1 is declared" in await _mismatched(
        spec, {"A": one, "B": one}, caplog
    )


async def test_one_tensor_for_two_declared_outputs_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = make_spec(
        factory="mandant.demo.models:classifier",
        outputs=(*CLASSIFIER_OUT, TensorSpec("OUTPUT1", "FP32", (-1, 16))),
    )
    message = await _mismatched(spec, {"INPUT0": features(2)}, caplog)
    assert "1 output(s) where 2 is declared" in message


async def test_missing_named_output_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    spec = make_spec(
        factory=f"{HELPERS}:pair_dict",
        inputs=PAIR_IN,
        outputs=(TensorSpec("SUM", "FP32", (-1,)), TensorSpec("RATIO", "FP32", (-1,))),
    )
    one = np.ones(2, dtype=np.float32)
    assert "output RATIO" in await _mismatched(spec, {"A": one, "B": one}, caplog)


async def test_a_float_output_declared_as_an_integer_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It went out as zeros (a float cast to INT32) with status OK."""
    spec = make_spec(
        factory="mandant.demo.models:classifier",
        outputs=(TensorSpec("OUTPUT0", "INT32", (-1, 16)),),
    )
    message = await _mismatched(spec, {"INPUT0": features(2)}, caplog)
    assert "float32 where INT32 is declared" in message


async def test_a_bytes_output_of_other_objects_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An int went out as that many NUL bytes over one path and failed the call
    INTERNAL over another."""
    spec = make_spec(
        factory=f"{HELPERS}:objects",
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("S", "BYTES", (-1,)),),
    )
    message = await _mismatched(spec, {"X": np.ones(2, np.float32)}, caplog)
    assert "objects of type int where BYTES is declared" in message


async def test_an_output_in_memory_the_model_keeps_is_answered_as_a_copy() -> None:
    """A model that answers a view of a buffer it writes each call (``reuses``) wrote
    the next batch's rows, another tenant's, into answers still being written (a large
    REST answer is written as its client reads it). An echo's output, its caller's own
    input, is not copied."""
    vector = (TensorSpec("X", "FP32", (-1,)),)
    backend = TorchBackend(make_spec(factory=f"{HELPERS}:reuses", inputs=vector, outputs=vector))
    first = await kept_after_the_next_call(backend, "X")
    np.testing.assert_array_equal(first, np.full(4, 2, np.float32))
    echo = make_spec(factory="mandant.demo.models:echo", inputs=vector, outputs=vector)
    sent = np.arange(1024, dtype=np.float32)
    assert np.shares_memory((await run_once(echo, {"X": sent}))["X"], sent)


async def test_an_output_of_another_shape_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    """16 columns declared 10 went out as they came, with status OK."""
    out = TensorSpec("OUTPUT0", "FP32", (-1, 10))
    spec = make_spec(factory="mandant.demo.models:classifier", outputs=(out,))
    message = await _mismatched(spec, {"INPUT0": features(2)}, caplog)
    assert "shape [2, 16] where [-1, 10] is declared" in message


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64"])
async def test_a_bfloat16_output_goes_out_as_its_declared_float(datatype: str) -> None:
    """numpy has no bfloat16: every call of a bf16 model was answered INVALID_ARGUMENT,
    its caller's data blamed for the conversion's TypeError."""
    spec = make_spec(
        factory=f"{HELPERS}:bfloat16",
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("HALF", datatype, (-1,)),),
    )
    out = await run_once(spec, {"X": np.array([1.5, -2.0], np.float32)})
    assert out["HALF"].tolist() == [1.5, -2.0]


async def test_an_output_that_is_not_a_tensor_is_the_configuration_s_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A list where a tensor is declared was ModelFailed (INVALID_ARGUMENT, the
    caller's data blamed): like any answer unlike its declaration, it is UNAVAILABLE."""
    spec = make_spec(
        factory=f"{HELPERS}:listed",
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("SAME", "FP32", (-1,)), TensorSpec("LIST", "FP32", (-1,))),
    )
    message = await _mismatched(spec, {"X": np.ones(2, np.float32)}, caplog)
    assert "output LIST" in message and "list where a tensor or a numpy array" in message


async def test_integer_labels_and_masks_go_out_as_any_integer_or_bool() -> None:
    """An argmax's int64 declared UINT8 and a uint8 mask declared BOOL are served, as
    they were (a same-kind cast rule refused signed as unsigned)."""
    spec = make_spec(
        factory=f"{HELPERS}:labels",
        inputs=(TensorSpec("X", "FP32", (-1, 3)),),
        outputs=(
            TensorSpec("LABEL", "UINT8", (-1,)),
            TensorSpec("MASK", "BOOL", (-1,)),
            TensorSpec("TOTAL", "FP32", ()),
        ),
    )
    x = np.array([[0.0, 2.0, 1.0], [-1.0, 0.0, 5.0]], np.float32)
    out = await run_once(spec, {"X": x})
    assert out["LABEL"].tolist() == [1, 2] and out["MASK"].tolist() == [0, 0]


async def test_integers_the_declared_type_cannot_hold_fail_the_call_not_wrapped() -> None:
    """An int64 output declared INT8 went out wrapped (300 as 44, -200 as 56) with OK
    and nothing logged; values that fit still go out. Values out of range fail the call
    as a model error does (the data's doing: charged, split on in a batch)."""
    spec = make_spec(
        factory="mandant.demo.models:echo",
        inputs=(TensorSpec("INPUT0", "INT64", (-1,)),),
        outputs=(TensorSpec("OUTPUT0", "INT8", (-1,)),),
    )
    fits = await run_once(spec, {"INPUT0": np.array([23, -128, 127], np.int64)})
    assert fits["OUTPUT0"].tolist() == [23, -128, 127]
    with pytest.raises(OutputOutOfRange, match="OUTPUT0: values from -200 to 300 where INT8"):
        await run_once(spec, {"INPUT0": np.array([23, 300, -200], np.int64)})


@pytest.mark.parametrize(
    ("given", "declared", "refused"),
    [
        (np.array([1.5, 1e300, -1e301]), "FP32", "values from -1e+301 to 1e+300 where FP32"),
        (np.array([1.5, 1e6]), "FP16", "values from 1000000.0 to 1000000.0 where FP16"),
        (np.array([3, 100000], np.int64), "FP16", "values from 100000 to 100000 where FP16"),
    ],
)
async def test_numbers_the_declared_float_type_cannot_hold_fail_the_call(
    given: np.ndarray, declared: str, refused: str
) -> None:
    """A float64 1e300 declared FP32 (or an int64 100000 declared FP16) went out as an
    infinity with OK: it fails as integers out of range do. Infinities and NaN the model
    answered are values like any other; numbers that fit go out, rounded to the type."""
    spec = make_spec(
        factory="mandant.demo.models:echo",
        inputs=(TensorSpec("INPUT0", datatype_of(given), (-1,)),),
        outputs=(TensorSpec("OUTPUT0", declared, (-1,)),),
    )
    with pytest.raises(OutputOutOfRange, match=f"OUTPUT0: {re.escape(refused)}"):
        await run_once(spec, {"INPUT0": given})
    fits = given.astype(np.float64)[:1]
    if given.dtype.kind == "f":
        fits = np.array([fits[0], np.inf, -np.inf, np.nan], given.dtype)
    out = await run_once(spec, {"INPUT0": fits.astype(given.dtype)})
    np.testing.assert_array_equal(out["OUTPUT0"].astype(DATATYPES[declared]),
                                  fits.astype(DATATYPES[declared]))  # fmt: skip


async def test_text_that_is_not_unicode_fails_the_call_not_internal() -> None:
    """A model that decodes its bytes with ``surrogateescape`` answers bytes that are
    not UTF-8 as lone surrogates: encoding them failed every such call INTERNAL (a
    traceback logged each time). It fails as a model's error on its data does; text
    that encodes goes out."""
    spec = make_spec(
        factory=f"{HELPERS}:decoded",
        inputs=(TensorSpec("X", "BYTES", (-1,)),),
        outputs=(TensorSpec("S", "BYTES", (-1,)),),
    )
    out = await run_once(spec, {"X": np.array([b"ok", "é".encode()], dtype=object)})
    assert out["S"].tolist() == ["ok", "é"]
    with pytest.raises(OutputOutOfRange, match="S: element 1 is text that is not Unicode"):
        await run_once(spec, {"X": np.array([b"ok", b"\xff", b"fine"], dtype=object)})


async def test_a_batched_model_s_scalar_output_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batched model's output must have rows; a scalar was an IndexError."""
    spec = make_spec(
        factory=f"{HELPERS}:labels",
        inputs=(TensorSpec("X", "FP32", (-1, 3)),),
        outputs=(
            TensorSpec("LABEL", "INT64", (-1,)),
            TensorSpec("MASK", "UINT8", (-1,)),
            TensorSpec("TOTAL", "FP32", ()),
        ),
    ).model_copy(update={"batching": BatchingConfig(max_batch_size=8)})
    message = await _mismatched(spec, {"X": np.ones((2, 3), np.float32)}, caplog)
    assert "no rows (a scalar)" in message


async def test_an_output_that_widens_to_its_datatype_is_sent() -> None:
    """Within its kind, or to a wider kind, the codec casts it: FP32 declared FP64."""
    out = TensorSpec("OUTPUT0", "FP64", (-1, 16))
    spec = make_spec(factory="mandant.demo.models:classifier", outputs=(out,))
    assert (await run_once(spec, {"INPUT0": features(2)}))["OUTPUT0"].shape == (2, 16)


async def test_missing_input_is_invalid() -> None:
    spec = make_spec(factory=f"{HELPERS}:pair", inputs=PAIR_IN)
    with pytest.raises(InvalidInput, match="B"):
        await run_once(spec, {"A": np.ones(2, dtype=np.float32)})


async def test_bytes_pass_through_echo() -> None:
    spec = make_spec(
        factory="mandant.demo.models:echo",
        inputs=(TensorSpec("INPUT0", "BYTES", (-1,)),),
        outputs=(TensorSpec("OUTPUT0", "BYTES", (-1,)),),
    )
    value = np.array([b"hello", b"", b"\x00\xff"], dtype=object)
    out = await run_once(spec, {"INPUT0": value})
    assert out["OUTPUT0"] is value


async def test_echo_all_every_datatype_from_read_only_buffers() -> None:
    inputs: dict[str, np.ndarray] = {}
    for name, dtype in DATATYPES.items():
        if name == "BYTES":
            inputs[name] = np.array([[b"a", b"bc"], [b"", b"\x00"]], dtype=object)
        else:
            # Read-only views of immutable bytes, as the codec hands them over.
            raw = np.arange(4).astype(dtype).tobytes()
            inputs[name] = np.frombuffer(raw, dtype=dtype).reshape(2, 2)
    specs = tuple(TensorSpec(n, n, (2, 2)) for n in DATATYPES)
    spec = make_spec(factory="mandant.demo.models:echo_all", inputs=specs, outputs=specs)
    out = await run_once(spec, inputs)
    assert list(out) == list(DATATYPES)
    for name, value in inputs.items():
        assert out[name].dtype == value.dtype, name
        np.testing.assert_array_equal(out[name], value)


@pytest.mark.parametrize("datatype", ["UINT8", "INT8", "BOOL"])
async def test_a_model_writing_to_a_one_byte_input_changes_nothing_beyond_its_call(
    datatype: str,
) -> None:
    """A model that wrote to a one-byte input in place wrote into the one bytes object
    CPython keeps for that value: b"\\x01" read as 0xfe everywhere in the process after
    one call (every tenant's later one-byte inputs). The write reaches the call alone."""
    dtype = DATATYPES[datatype]
    spec = make_spec(
        factory=f"{HELPERS}:inverts_in_place",
        inputs=(TensorSpec("INPUT0", datatype, (-1,)),),
        outputs=(TensorSpec("OUTPUT0", datatype, (-1,)),),
    )
    raw = np.ones(1, dtype).tobytes()  # as the codec decodes a request's raw contents
    out = await run_once(spec, {"INPUT0": np.frombuffer(raw, dtype)})
    np.testing.assert_array_equal(out["OUTPUT0"], np.invert(np.ones(1, dtype)))
    assert raw == bytes([1]) and bytes([1])[0] == 1  # the shared object of that byte


async def test_instances_run_concurrently() -> None:
    barrier = threading.Barrier(2, timeout=10)
    spec = make_spec(
        factory=f"{HELPERS}:rendezvous",
        factory_args={"barrier": barrier},
        inputs=(TensorSpec("X", "INT32", (-1,)),),
        outputs=(TensorSpec("Y", "INT32", (-1,)),),
        instances=2,
    )
    backend = TorchBackend(spec)
    assert backend.max_concurrency == 2
    await backend.start()
    try:
        # Each call waits inside forward until the other arrives: both must run at once.
        first, second = await asyncio.gather(
            backend.infer({"X": np.array([1], dtype=np.int32)}),
            backend.infer({"X": np.array([2], dtype=np.int32)}),
        )
    finally:
        await backend.aclose()
    assert first["Y"].tolist() == [1]
    assert second["Y"].tolist() == [2]


def gate_spec(entered: threading.Event, release: threading.Event) -> ModelSpec:
    """A model whose forward pass signals ``entered``, then waits for ``release`` (at
    most 10 s); ``X`` → ``Y`` = 2 ``X``, FP32 ``[-1]``."""
    return make_spec(
        factory=f"{HELPERS}:gate",
        factory_args={"entered": entered, "release": release},
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("Y", "FP32", (-1,)),),
    )


async def test_infer_does_not_block_the_event_loop() -> None:
    entered, release = threading.Event(), threading.Event()
    backend = TorchBackend(gate_spec(entered, release))
    await backend.start()
    try:
        task = asyncio.create_task(backend.infer({"X": np.array([1.5], dtype=np.float32)}))
        assert await asyncio.to_thread(entered.wait, 10)
        # The model is mid-forward; the loop still runs this coroutine, which frees it.
        assert not task.done()
        release.set()
        out = await task
    finally:
        await backend.aclose()
    assert out["Y"].tolist() == [3.0]


async def test_a_call_whose_caller_leaves_mid_forward_holds_its_slot_until_it_ends() -> None:
    """Without batching, a caller that left (a deadline) while a thread ran its forward
    pass gave its slot back at once: the next calls went past the fair queue into the
    threads' queue, marked as run (charged) though they waited there, and no unload
    could answer them. Now the cancelled call ends with its forward pass: the next
    call waits for a slot (DEADLINE_EXCEEDED there, never run), then runs once the
    instance is free."""
    entered, release = threading.Event(), threading.Event()
    spec = make_spec(
        factory=f"{HELPERS}:gate",
        factory_args={"entered": entered, "release": release},
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("OUT0", "FP32", (-1, 4)),),
    )
    backend = TorchBackend(spec)
    await backend.start()
    scheduler = DirectScheduler(backend, "m")
    try:
        left = asyncio.create_task(scheduler.submit(request(value=1)))
        assert await asyncio.to_thread(entered.wait, 10)
        left.cancel()
        await asyncio.sleep(0.05)
        assert not left.done()  # still ends with its forward pass
        late = request(value=2, deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceeded, match="while queued"):
            await scheduler.submit(late)
        assert not late.ran
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await left
        out = await scheduler.submit(request(value=3))  # the slot is free again
        assert out["OUT0"][0, 0] == 6.0
    finally:
        release.set()
        await scheduler.aclose()
        await backend.aclose()


async def test_a_call_without_a_slot_to_hold_ends_at_once_when_cancelled() -> None:
    """A warm-up (or any call but the unbatched scheduler's) waited for its forward
    pass when cancelled: a hung warm-up outlived ``model_load_timeout_s`` and held a
    stop for ever. Only ``hold_on_cancel`` waits."""
    entered, release = threading.Event(), threading.Event()
    backend = TorchBackend(gate_spec(entered, release))
    await backend.start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(backend.infer({"X": np.ones(1, np.float32)}), 0.3)
        assert time.monotonic() - started < 2  # the pass runs on, for 10 s
    finally:
        release.set()
        await backend.aclose()


@pytest.mark.parametrize("nice", [0, 5])
async def test_batches_run_compute_nice_below_the_event_loop(nice: int) -> None:
    backend = TorchBackend(make_spec(factory="mandant.demo.models:classifier"), compute_nice=nice)
    await backend.start()
    try:
        await backend.infer({"INPUT0": features(2)})  # never measured: runs in the pool
        [worker] = [t for t in threading.enumerate() if t.name.startswith("torch-m")]
        assert worker.native_id is not None
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == min(19, loop_nice + nice)
    finally:
        await backend.aclose()


async def test_device_auto() -> None:
    backend = TorchBackend(make_spec(factory="mandant.demo.models:echo"))
    gpus = tuple(f"cuda:{n}" for n in range(torch.cuda.device_count()))
    assert backend.devices == (gpus or ("cpu",))
    assert TorchBackend(make_spec(factory="mandant.demo.models:echo", device="cpu")).devices == (
        "cpu",
    )


async def test_infer_before_start_and_after_close_is_unavailable() -> None:
    backend = TorchBackend(make_spec(factory="mandant.demo.models:echo"))
    x = {"INPUT0": features(1)}
    with pytest.raises(Unavailable):
        await backend.infer(x)
    await backend.start()
    await backend.aclose()
    with pytest.raises(Unavailable):
        await backend.infer(x)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"factory": "mandant.demo.models:nope"}, "nope"),
        ({"factory": "no_such_module_xyz:f"}, "no_such_module_xyz"),
        ({"factory": f"{HELPERS}:not_a_module"}, "not a Module"),
        ({"path": Path("missing.pt")}, "missing.pt"),
        ({"factory": "mandant.demo.models:fraud", "path": "CLASSIFIER"}, "size mismatch"),
        ({"weights_init": "mandant.demo.models:build_fraud_torchscript"}, "needs a 'path'"),
    ],
)
async def test_load_errors_name_the_model(
    tmp_path: Path, overrides: dict[str, Any], reason: str
) -> None:
    if overrides.get("path") == "CLASSIFIER":
        overrides["path"] = tmp_path / "classifier.safetensors"
        models.build_classifier_weights(overrides["path"])
    elif "path" in overrides:
        overrides["path"] = tmp_path / overrides["path"]
    spec = make_spec(**overrides)
    backend = TorchBackend(spec)
    with pytest.raises(ModelLoadError, match=reason) as info:
        await backend.start()
    assert "'m'" in str(info.value)
    assert not backend.ready


async def test_cuda_requested_without_cuda_fails_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    backend = TorchBackend(make_spec(factory="mandant.demo.models:echo", device="cuda"))
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        await backend.start()


def recorder_spec(threads: list[int], delay: dict[str, float]) -> ModelSpec:
    return make_spec(
        factory=f"{HELPERS}:recorder",
        factory_args={"threads": threads, "delay": delay},
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("Y", "FP32", (-1,)),),
    )


async def test_cheap_calls_run_on_the_event_loop_and_slow_ones_move_back() -> None:
    threads: list[int] = []
    delay = {"s": 0.0}
    backend = TorchBackend(recorder_spec(threads, delay), inline_below_s=0.05)
    loop_thread = threading.get_ident()
    x = {"X": np.ones(1, np.float32)}
    await backend.start()
    try:
        for _ in range(5):
            await backend.infer(x)
        assert threads[0] != loop_thread  # unmeasured: the pool
        assert threads[-1] == loop_thread  # measured cheap: no thread hop
        delay["s"] = 0.2  # the model turns slow: one call shows it
        await backend.infer(x)
        await backend.infer(x)
        assert threads[-1] != loop_thread
    finally:
        await backend.aclose()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
async def test_a_cheap_call_preempted_on_a_busy_core_stays_on_the_loop() -> None:
    """A call is timed in its thread's CPU time unless the thread waited: on a core
    shared with another busy process (gRPC's threads, on a loaded server), a cheap
    model's calls took twice their time in wall time and all went to the pool, each
    paying the thread hop the measure is there to save."""
    threads: list[int] = []
    spec = make_spec(
        factory=f"{HELPERS}:spinner",
        factory_args={"threads": threads, "cpu_s": 0.003},
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("Y", "FP32", (-1,)),),
    )
    backend = TorchBackend(spec, inline_below_s=0.0045)
    cpus = os.sched_getaffinity(0)
    core = {min(cpus)}
    hog = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "while True: pass", preexec_fn=lambda: os.sched_setaffinity(0, core)
    )
    os.sched_setaffinity(0, core)  # this thread (the event loop's) shares the hog's core
    # Another thread of this process asking for the GIL would make a call wait for it
    # (a voluntary switch: its wall time counts, rightly); none may ask meanwhile.
    switch_s = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        await backend.start()
        x = {"X": np.ones(1, np.float32)}
        for _ in range(60):  # the first, unmeasured, ran long: the average comes down
            await backend.infer(x)
    finally:
        sys.setswitchinterval(switch_s)
        os.sched_setaffinity(0, cpus)
        hog.kill()
        await hog.wait()
        await backend.aclose()
    # Before, none: each took twice its CPU time in wall time. A call slowed otherwise
    # (a page fault on a loaded machine) sends a few of the next to the pool.
    assert threads[-30:].count(threading.get_ident()) >= 20


async def test_a_wide_input_of_one_row_is_not_taken_for_cheap() -> None:
    """The cost is estimated per input element: by rows, one row a million wide passed
    for as cheap as one row of one (a sequence length a tenant chooses)."""
    threads: list[int] = []
    spec = recorder_spec(threads, {"s": 0.0}).model_copy(
        update={
            "inputs": (TensorSpec("X", "FP32", (-1, -1)),),
            "outputs": (TensorSpec("Y", "FP32", (-1, -1)),),
        }
    )
    backend = TorchBackend(spec, inline_below_s=0.05)
    await backend.start()
    try:
        for _ in range(5):
            await backend.infer({"X": np.ones((1, 1), np.float32)})
        assert threads[-1] == threading.get_ident()  # measured cheap: on the loop
        await backend.infer({"X": np.ones((1, 1_000_000), np.float32)})
        assert threads[-1] != threading.get_ident()
    finally:
        await backend.aclose()


async def test_a_call_that_held_the_loop_keeps_its_model_off_it() -> None:
    """One call whose cost its data decided held the event loop (every tenant's calls
    with it); cheap calls after it brought the model back, and the next slow one held
    it again: a tenant could stall the others at will."""
    threads: list[int] = []
    delay = {"s": 0.0}
    backend = TorchBackend(recorder_spec(threads, delay), inline_below_s=0.05)
    x = {"X": np.ones(1, np.float32)}
    await backend.start()
    try:
        for _ in range(5):
            await backend.infer(x)
        delay["s"] = 0.02  # past HELD_LOOP_S, though under this threshold
        await backend.infer(x)
        assert threads[-1] == threading.get_ident()  # it was run on the loop
        delay["s"] = 0.0
        for _ in range(50):
            await backend.infer(x)
        assert threading.get_ident() not in threads[-50:]
    finally:
        await backend.aclose()


@pytest.mark.parametrize("setting", ["threshold 0", "inline: never"])
async def test_inline_threshold_zero_or_never_always_uses_the_pool(setting: str) -> None:
    """``models[].inline: never``: a model whose cost may depend on input values never
    runs on the event loop, however cheap its calls were."""
    threads: list[int] = []
    spec = recorder_spec(threads, {"s": 0.0})
    if setting == "threshold 0":
        backend = TorchBackend(spec, inline_below_s=0.0)
    else:
        backend = TorchBackend(spec.model_copy(update={"inline": False}), inline_below_s=0.05)
    await backend.start()
    try:
        for _ in range(5):
            await backend.infer({"X": np.ones(1, np.float32)})
    finally:
        await backend.aclose()
    assert threading.get_ident() not in threads


async def _at_once(
    spec: ModelSpec, calls: list[dict[str, np.ndarray]]
) -> tuple[list[dict[str, np.ndarray]], list[torch.nn.Module]]:
    """``calls`` made at once to a backend of ``spec``: their answers, and the modules
    of its instances."""
    backend = TorchBackend(spec)
    await backend.start()
    try:
        outs = await asyncio.gather(*(backend.infer(inputs) for inputs in calls))
        return list(outs), [instance.module for instance in backend._loaded]
    finally:
        await backend.aclose()


async def test_cpu_instances_each_keep_their_own_state_and_share_the_weights() -> None:
    """Two CPU instances in one forward pass at once, each writing its answer into a
    buffer the model keeps: they shared one module, and answered each call with the
    other's rows (one tenant's answer holding another's data). Each is now a copy with
    buffers of its own, the weights shared."""
    spec = make_spec(
        factory=f"{HELPERS}:workspace",
        factory_args={"parties": 2},
        inputs=(TensorSpec("X", "FP32", (-1, 4)),),
        outputs=(TensorSpec("Y", "FP32", (-1, 4)),),
        instances=2,
        device="cpu",
    )
    (first, second), modules = await _at_once(
        spec, [{"X": np.full((2, 4), 1, np.float32)}, {"X": np.full((3, 4), 1000, np.float32)}]
    )
    assert first["Y"].tolist() == [[2.0] * 4] * 2
    assert second["Y"].tolist() == [[2000.0] * 4] * 3
    assert modules[0] is not modules[1]
    assert modules[0].weight is modules[1].weight  # type: ignore[union-attr]
    assert modules[0].out is not modules[1].out  # type: ignore[union-attr]


async def test_cpu_instances_of_a_module_that_cannot_be_copied_share_its_weights() -> None:
    """Where the module cannot be copied (a lock), each other instance is built afresh:
    built so, a factory without a seed gave each instance weights of its own, and the
    answer to one input depended on the instance that ran it. Each is given the first
    one's weights."""
    built: list[int] = []
    spec = make_spec(
        factory=f"{HELPERS}:locked",
        factory_args={"built": built},
        inputs=(TensorSpec("X", "FP32", (-1, 4)),),
        outputs=(TensorSpec("Y", "FP32", (-1, 3)),),
        instances=3,
        device="cpu",
    )
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    outs, modules = await _at_once(spec, [{"X": x}] * 9)
    assert built == [0, 1, 2]
    assert len({id(module) for module in modules}) == 3
    assert all(m.layer.weight is modules[0].layer.weight for m in modules)  # type: ignore[union-attr]
    assert all(np.array_equal(out["Y"], outs[0]["Y"]) for out in outs)


async def test_cpu_instances_are_built_once_and_each_may_run_a_batch() -> None:
    built: list[int] = []
    spec = make_spec(
        factory=f"{HELPERS}:counted",
        factory_args={"built": built},
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("Y", "FP32", (-1,)),),
        instances=3,
        device="cpu",
    )
    backend = TorchBackend(spec)
    assert backend.devices == ("cpu",)
    assert backend.max_concurrency == 3
    await backend.start()
    try:
        outs = await asyncio.gather(
            *(backend.infer({"X": np.full(2, n, np.float32)}) for n in range(6))
        )
    finally:
        await backend.aclose()
    assert built == [0]
    assert [out["Y"].tolist() for out in outs] == [[2 * n, 2 * n] for n in range(6)]


async def test_infer_batch_runs_the_parts_concatenated_in_order() -> None:
    spec = make_spec(
        factory="mandant.demo.models:echo_all",
        inputs=(TensorSpec("A", "FP32", (-1, 3)), TensorSpec("B", "BYTES", (-1,))),
        outputs=(TensorSpec("A2", "FP32", (-1, 3)), TensorSpec("B2", "BYTES", (-1,))),
    )
    a = [features(rows, width=3, seed=rows) for rows in (2, 1, 4)]
    b = [
        np.array([f"{rows}-{n}".encode() for n in range(rows)], dtype=object) for rows in (2, 1, 4)
    ]
    backend = TorchBackend(spec)
    await backend.start()
    try:
        out = await backend.infer_batch([{"A": x, "B": y} for x, y in zip(a, b, strict=True)])
        with pytest.raises(InvalidInput, match="missing input"):
            await backend.infer_batch([{"A": a[0], "B": b[0]}, {"A": a[1]}])
    finally:
        await backend.aclose()
    np.testing.assert_array_equal(out["A2"], np.concatenate(a))
    assert out["B2"].tolist() == np.concatenate(b).tolist()


@pytest.mark.parametrize(
    ("kind", "raised"),
    [
        ("CancelledError", "CancelledError"),
        ("GeneratorExit", "GeneratorExit"),
        ("SystemExit", r"SystemExit\(4\)"),
        ("its own", r"_Interrupt\(stop\)"),
    ],
)
async def test_a_base_exception_of_a_model_fails_that_call_alone(kind: str, raised: str) -> None:
    """A BaseException that is not an Exception, raised by a forward pass: a
    CancelledError read as the caller gone (no status ever sent) or, in a batch, as the
    batcher closing (every request in it answered "shutting down"). Now the call's own
    error, ModelExit, on the model's threads and on the event loop."""
    spec = make_spec(
        factory=f"{HELPERS}:raises_base",
        factory_args={"kind": kind},
        inputs=(TensorSpec("X", "FP32", (-1,)),),
        outputs=(TensorSpec("Y", "FP32", (-1,)),),
    )
    backend = TorchBackend(spec)
    await backend.start()
    try:
        for _ in range(3):  # the first on its thread, then cheap: on the loop
            assert (await backend.infer({"X": np.ones(2, np.float32)}))["Y"].tolist() == [1, 1]
            with pytest.raises(ModelExit, match=raised):
                await backend.infer({"X": -np.ones(2, np.float32)})
    finally:
        await backend.aclose()


async def test_model_code_that_calls_sys_exit_fails_that_model_alone() -> None:
    """SystemExit from a builder (here) or a forward pass (above) went through the
    threads to the event loop and stopped it: the whole server exited (with
    ``workers``, an engine started again on the same configuration died again). Now it
    is the model's error."""
    with pytest.raises(ModelLoadError, match="SystemExit"):
        await TorchBackend(make_spec(factory=f"{HELPERS}:exits")).start()
