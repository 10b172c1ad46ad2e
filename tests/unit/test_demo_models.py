from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mandant.demo import models

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_classifier_shapes_and_dtype() -> None:
    out = models.classifier()(torch.randn(5, 256))
    assert out.shape == (5, 16)
    assert out.dtype == torch.float32


def test_classifier_is_deterministic_per_seed() -> None:
    assert _same_weights(models.classifier(0), models.classifier(0))
    assert not _same_weights(models.classifier(0), models.classifier(1))


def test_models_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.classifier(0)
    models.fraud(2)
    assert torch.equal(torch.rand(3), expected)


def test_classifier_weights_file_is_reproducible(tmp_path: Path) -> None:
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        models.build_classifier_weights(tmp_path / f"{name}.safetensors", seed=seed)
    a, b, c = ((tmp_path / f"{n}.safetensors").read_bytes() for n in "abc")
    assert a == b
    assert a != c
    state = load_file(str(tmp_path / "a.safetensors"))
    module = models.classifier(5)
    module.load_state_dict(state, strict=True)
    assert _same_weights(module, models.classifier(0))


def test_fraud_scores_between_zero_and_one() -> None:
    out = models.fraud()(torch.randn(7, 32) * 10)
    assert out.shape == (7, 1)
    assert bool(((out >= 0) & (out <= 1)).all())


def test_fraud_torchscript_matches_eager(tmp_path: Path) -> None:
    path = tmp_path / "fraud.pt"
    models.build_fraud_torchscript(path, seed=4)
    scripted = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    x = torch.randn(4, 32)
    torch.testing.assert_close(scripted(x), models.fraud(4)(x))
    assert not torch.equal(models.fraud(4)(x), models.fraud(2)(x))


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(6, dtype=torch.int16).reshape(2, 3),
        np.array([b"a", b"", b"\x00\xff"], dtype=object),
    ],
)
def test_echo_returns_its_input(value: object) -> None:
    assert models.echo()(value) is value


def test_echo_all_returns_every_input() -> None:
    a, b = torch.zeros(1), np.array([b"x"], dtype=object)
    out = models.echo_all()(a, b)
    assert isinstance(out, tuple)
    assert out[0] is a and out[1] is b
    assert models.echo_all()() == ()
