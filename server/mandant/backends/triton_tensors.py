"""A Triton model's tensors (its ModelMetadata) against the ones a model entry
configures: a configured tensor that Triton's model does not have, or whose datatype or
shape contradicts Triton's, would load "ready", publish the configured tensors in
Mandant's ModelMetadata, and then fail every call that follows them, each blamed on
its caller. Found at load (the model fails to load, with the reason) and on every
metadata poll (the model goes unready until they agree again).

A shape contradicts Triton's where the ranks differ or a dimension fixed on both sides
differs; a dimension variable (-1) on either side agrees with any: a configuration
looser than Triton's leaves Triton's own INVALID_ARGUMENT to the caller that breaks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tritonclient.grpc import service_pb2 as pb

from mandant.types import DATATYPES, TensorSpec


class TensorMismatch(RuntimeError):
    """The configured tensors contradict Triton's model (the message says how): the
    operator's mistake, shown in the load's answer and the log, never to tenants."""


def tensor_spec(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(tensor.name, tensor.datatype, tuple(int(d) for d in tensor.shape))


def mismatches(
    model: str,
    metadata: pb.ModelMetadataResponse,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> list[str]:
    """How the configured ``inputs`` and ``outputs`` contradict Triton's ``model``'s
    ``metadata`` (empty where they agree)."""
    problems = []
    for kind, configured, reported in (
        ("input", inputs, metadata.inputs),
        ("output", outputs, metadata.outputs),
    ):
        theirs = {tensor.name: tensor_spec(tensor) for tensor in reported}
        for mine in configured:
            other = theirs.get(mine.name)
            if other is None:
                names = ", ".join(sorted(theirs)) or "none"
                problems.append(
                    f"{kind} {mine.name} is configured, but Triton's model {model!r} has "
                    f"no such {kind} (its {kind}s: {names})"
                )
            elif other.datatype != mine.datatype:
                problems.append(
                    f"{kind} {mine.name} is {mine.datatype} in the configuration, "
                    f"{other.datatype} on Triton's model {model!r}"
                )
            elif not _shapes_agree(mine.shape, other.shape):
                problems.append(
                    f"{kind} {mine.name} has shape {list(mine.shape)} in the configuration, "
                    f"{list(other.shape)} on Triton's model {model!r}"
                )
    return problems


def unknown_datatypes(model: str, metadata: pb.ModelMetadataResponse) -> list[str]:
    """Triton's ``model``'s tensors whose datatype Mandant does not carry (BF16), each
    said as a problem (empty: none)."""
    return [
        f"{kind} {tensor.name} is {tensor.datatype} on Triton's model {model!r}, a "
        f"datatype Mandant does not carry ({', '.join(DATATYPES)})"
        for kind, tensors in (("input", metadata.inputs), ("output", metadata.outputs))
        for tensor in tensors
        if tensor.datatype not in DATATYPES
    ]


def _shapes_agree(mine: Sequence[int], theirs: Sequence[int]) -> bool:
    return len(mine) == len(theirs) and all(
        a < 0 or b < 0 or a == b for a, b in zip(mine, theirs, strict=True)
    )
