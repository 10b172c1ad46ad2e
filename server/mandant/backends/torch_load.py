"""Loading a torch model's module from its spec: ``module:factory`` plus a state dict
(safetensors or ``torch.save``), with ``weights_init`` building a missing weights file.
TorchScript files are loaded by the backend itself (``torch.jit.load``)."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from mandant.backends.base import import_ref
from mandant.config import ModelSpec

logger = logging.getLogger(__name__)


def init_weights(spec: ModelSpec) -> None:
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
        import_ref(spec.weights_init)(partial, **spec.factory_args)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def build_module(spec: ModelSpec) -> torch.nn.Module:
    assert spec.factory is not None
    module = import_ref(spec.factory)(**spec.factory_args)
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
