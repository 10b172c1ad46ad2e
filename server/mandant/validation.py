"""Checks a request's declared tensors against a model's declared inputs and outputs,
before any tensor byte is read. Messages name the tensor and what was expected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

from mandant.config import DEFAULT_MAX_BYTES_ELEMENTS, ModelSpec
from mandant.errors import InvalidInput, shown
from mandant.types import DATATYPES, TensorHeader, TensorSpec
from mandant.wire import min_bytes_size

#: The most bytes one array can span: numpy indexes with a signed 64-bit integer.
MAX_ARRAY_BYTES = 2**63 - 1
#: The most rows (dimension 0) one request may have: Triton's largest batch size (an
#: int32). Only an empty tensor can hold more (any other's bytes would have to come
#: with it), and it was charged them: ``[2**61 - 1, 0]`` a few times pushed a tenant's
#: counts past every integer type that holds them (Redis' fleet sums, the uint64
#: fields of GetUsage and ModelStatistics, which then failed for every tenant).
MAX_ROWS = 2**31 - 1


def _shape(shape: Sequence[int]) -> str:
    """A shape as a message shows it (a client's may have any number of dimensions)."""
    dims = ", ".join(str(d) for d in shape[:8])
    return f"[{dims}{', …' if len(shape) > 8 else ''}]"


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(spec.name for spec in specs) or "no inputs"


def check_inputs(spec: ModelSpec, headers: Sequence[TensorHeader]) -> int:
    """Validate names, datatypes and shapes; return the request's rows (its size
    along dimension 0, 1 for scalar inputs): the largest input's, whatever order the
    client sent them in (a batched model's inputs must all have that many rows; an
    unbatched model's may differ, and the first input the client chose to send
    decided what its quota was charged)."""
    if not headers:
        raise InvalidInput(
            f"request has no inputs; model '{spec.name}' takes {_names(spec.inputs)}"
        )
    declared = spec.inputs_by_name
    seen: set[str] = set()
    rows = 0
    for header in headers:
        want = declared.get(header.name)
        if want is None:
            raise InvalidInput(
                f"unexpected input '{shown(header.name)}'; "
                f"model '{spec.name}' takes {_names(spec.inputs)}"
            )
        if header.name in seen:
            raise InvalidInput(f"input '{shown(header.name)}' appears twice")
        seen.add(header.name)
        if header.datatype != want.datatype:
            raise InvalidInput(
                f"input '{header.name}': expected datatype {want.datatype}, "
                f"got {shown(header.datatype) or '(none)'}"
            )
        check_shape(header)
        shape = header.shape
        size = shape[0] if shape else 1
        if size > rows:
            rows = size
            if rows > MAX_ROWS:
                raise InvalidInput(
                    f"input '{header.name}': {rows} rows, at most {MAX_ROWS} are accepted"
                )
        if not want.accepts(shape):
            raise InvalidInput(
                f"input '{header.name}': expected shape {_shape(want.shape)}, "
                f"got {_shape(header.shape)}"
            )
    if len(seen) < len(declared):  # every name seen is declared
        missing = [name for name in declared if name not in seen]
        raise InvalidInput(f"missing input(s) {', '.join(missing)} for model '{spec.name}'")
    return rows


def check_outputs(spec: ModelSpec, requested: Sequence[str]) -> tuple[str, ...]:
    """The output names to return: the requested ones (validated), else all."""
    if not requested:
        return spec.output_names
    declared = spec.output_names
    for name in requested:
        if name not in declared:
            raise InvalidInput(
                f"unknown output '{shown(name)}'; model '{spec.name}' has {_names(spec.outputs)}"
            )
    return tuple(dict.fromkeys(requested))


def check_batch_rows(model: str, rows: int, max_batch_size: int) -> None:
    """A request larger than the model's batches can never run."""
    if rows > max_batch_size:
        raise InvalidInput(
            f"request has {rows} rows; model '{model}' takes at most "
            f"{max_batch_size} per request (max_batch_size)"
        )


#: A requested output's ``classification`` parameter (Triton's classification
#: extension, not served here), on every transport.
NO_CLASSIFICATION = "the classification extension is not supported"
#: The parameter by which a Triton client puts a tensor in a shared-memory region.
SHARED_MEMORY = "shared_memory_region"
NO_SHARED_MEMORY = "shared memory is not supported: send the tensor in the request"

#: Triton's sequence parameters: a stateful model's correlation id and the first and
#: last request of a sequence. Mandant has no sequence batcher: a stateful model's
#: requests served as unrelated ones would be wrong answers given without a word
#: (they were: accepted and ignored). An id of 0 or "" and false flags say "none", as
#: ``tritonclient`` sends no sequence parameter at all for those.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def check_no_sequence(parameters: Mapping[str, object]) -> None:
    """Refuse a request that belongs to a sequence (:data:`SEQUENCE_PARAMETERS`)."""
    for name in SEQUENCE_PARAMETERS:
        if parameters.get(name) not in (None, 0, ""):  # (False == 0)
            raise InvalidInput(
                f"parameter '{name}': sequences are not supported (no model here keeps "
                "state from one request to the next)"
            )


#: The most dimensions a tensor may have: numpy's limit (``numpy.ndarray`` of more
#: cannot be made).
MAX_RANK = 64

# What one request may list, whatever its transport. A transport's decoder builds a
# Python object per listed tensor and parameter (and a front end of ``workers: N``
# packs them for the engine) before any model's spec is looked at, on the event loop
# that serves every tenant: a 2 MiB message of 10⁶ empty ``inputs {}`` held it for
# seconds. So each count is compared first (a ``len()``, before anything is built)
# with these bounds, far above what a real model declares (the widest seen are
# recommenders with an input per feature, in the hundreds; Triton's own parameters
# are a handful, an LLM backend's sampling parameters a few dozen), and low enough
# that building that many costs about a millisecond.

#: Most inputs one request may carry (``inputs``; raw contents are one per input).
MAX_INPUTS = 1024
#: Most outputs one request may ask for (``outputs``).
MAX_OUTPUTS = 1024
#: Most parameters one request, or one of its tensors, may carry (``parameters``).
MAX_PARAMETERS = 256


def check_counts(inputs: int, outputs: int, parameters: int) -> None:
    """A request that lists more inputs, requested outputs or request parameters than
    :data:`MAX_INPUTS`, :data:`MAX_OUTPUTS`, :data:`MAX_PARAMETERS` is refused: each
    transport asks this with the lengths of its lists before it reads any entry."""
    if inputs <= MAX_INPUTS and outputs <= MAX_OUTPUTS and parameters <= MAX_PARAMETERS:
        return  # every call passes here: one comparison each
    for count, bound, what in (
        (inputs, MAX_INPUTS, "inputs"),
        (outputs, MAX_OUTPUTS, "requested outputs"),
        (parameters, MAX_PARAMETERS, "parameters"),
    ):
        if count > bound:
            raise InvalidInput(f"request has {count} {what}, at most {bound} are accepted")


def check_parameter_count(count: int, what: str) -> None:
    """``what`` (a tensor, as a message names it) carries at most
    :data:`MAX_PARAMETERS` parameters."""
    if count > MAX_PARAMETERS:
        raise InvalidInput(f"{what} has {count} parameters, at most {MAX_PARAMETERS} are accepted")


def check_rank(rank: int, name: str) -> None:
    """At most :data:`MAX_RANK` dimensions: asked with a shape's length before the
    shape is copied (``name``: the input's, as the client sent it)."""
    if rank > MAX_RANK:
        raise InvalidInput(
            f"input '{shown(name)}': shape has {rank} dimensions, at most {MAX_RANK} are accepted"
        )


def check_shape(header: TensorHeader) -> int:
    """The element count of ``header``'s shape (of a known datatype), once an array can
    take that shape: no negative size; and an empty tensor's other dimensions not so
    large that no array could index them (``[2**62, 0]`` holds nothing, yet numpy
    cannot make it); at most :data:`MAX_RANK` dimensions (numpy's). Every path that
    shapes a client's tensor asks this first."""
    shape = header.shape
    check_rank(len(shape), header.name)
    if shape and min(shape) < 0:
        raise InvalidInput(f"input '{header.name}': shape {_shape(shape)} has a negative size")
    count = prod(shape)
    if not count and len(shape) > 1:
        dtype = DATATYPES.get(header.datatype)  # unknown: refused where it is checked
        spanned = prod(d for d in shape if d) * (dtype.itemsize if dtype is not None else 1)
        if spanned > MAX_ARRAY_BYTES:
            raise InvalidInput(f"input '{header.name}': shape {_shape(shape)} is too large")
    return count


def check_bytes_count(count: int, name: str, max_elements: int) -> None:
    """BYTES decode element by element: refuse more than ``max_elements`` up front
    (``server.max_bytes_elements``), whichever transport and encoding they came in."""
    if count > max_elements:
        raise InvalidInput(
            f"input '{name}': {count} BYTES elements, at most {max_elements} are accepted"
        )


def check_raw_size(
    raw: bytes | memoryview,
    header: TensorHeader,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
) -> None:
    """Whether ``raw`` (a tensor in the v2 raw layout, from gRPC's raw contents or
    REST's binary data) can hold the tensor ``header`` declares: exactly, for
    fixed-size datatypes; at least its length prefixes, and at most
    ``max_bytes_elements`` elements, for BYTES. Reads none of its bytes."""
    count = check_shape(header)
    if header.datatype == "BYTES":
        if min_bytes_size(count) > len(raw):
            raise InvalidInput(
                f"input '{header.name}': {count} BYTES elements need at least "
                f"{min_bytes_size(count)} bytes of length prefixes, got {len(raw)}"
            )
        check_bytes_count(count, header.name, max_bytes_elements)
        return
    dtype = DATATYPES[header.datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input '{header.name}': {header.datatype} {list(header.shape)} needs "
            f"{count * dtype.itemsize} bytes, got {len(raw)}"
        )
