"""KServe v2 REST bodies ⇄ numpy arrays, with Triton's binary-data extension.

A request body is a JSON object, optionally followed by tensor bytes: then the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input
sent as bytes says how many in ``parameters.binary_data_size`` (inputs take their
bytes in order). Fixed-size binary inputs decode with ``numpy.frombuffer`` and view
the request body (read-only, no copy); JSON ``data`` (nested or flat lists) is
checked for count and element type. Outputs go back as JSON ``data``, or as bytes
after the JSON where the request asks for ``binary_data`` (per output, or for all
with the ``binary_data_output`` parameter), as ``tritonclient.http`` expects.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import itertools
import json
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import orjson

from mandant.config import DEFAULT_MAX_BYTES_ELEMENTS, DEFAULT_MAX_JSON_BYTES
from mandant.errors import InvalidInput, shown
from mandant.heap import loads_untrusted
from mandant.types import DATATYPES, InferResponse, TensorHeader, datatype_of
from mandant.validation import (
    MAX_RANK,
    NO_CLASSIFICATION,
    NO_SHARED_MEMORY,
    SHARED_MEMORY,
    check_bytes_count,
    check_counts,
    check_parameter_count,
    check_rank,
    check_raw_size,
    check_shape,
)
from mandant.wire import bytes_pieces, raw_view, split_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
Parameters = Mapping[str, bool | int | float | str]
#: JSON element kinds (numpy's ``dtype.kind`` after ``np.array(data)``) each target
#: kind accepts: integers take integers only, floats take integers and floats.
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_NO_PARAMETERS: Parameters = {}


class BodyTooLarge(InvalidInput):
    """A request body over ``server.max_message_bytes``, or its JSON over
    ``server.max_json_bytes`` (HTTP 413)."""


#: JSON output values written per turn of the event loop: a large JSON answer is
#: written a piece at a time, other calls served in between (16,384 FP32 values take
#: about 0.5 ms to write on one core of the dev machine; 12.7 ms as ``json`` writes
#: them, as a piece with a NaN is still written).
JSON_VALUES_PER_TURN = 16384
#: The same for BYTES outputs, counted in characters (and a few for each element): one
#: element of 48 MiB held other tenants' calls 4 s while it was decoded and escaped
#: whole. A JSON string may be cut anywhere between characters, so it is written a piece
#: at a time too (1 MiB of control characters, each escaped to six, about 10 ms).
JSON_CHARS_PER_TURN = 1 << 20
_ELEMENT_CHARS = 16

_dumps = functools.partial(json.dumps, separators=(",", ":"))
#: Waits for the turn of the event loop in which an answer writes its next piece of JSON.
Turn = Callable[[], Awaitable[None]]


async def next_turn() -> None:
    """The next turn of the event loop, whoever else writes JSON (one answer alone)."""
    await asyncio.sleep(0)


class JsonTurns:
    """The turns of the event loop in which large JSON answers write their pieces: one
    piece a turn in all, the answers being written taking turns by tenant (round
    robin), each tenant's in the order they came. Each answer yielded a turn between
    its own pieces, so N answers at once wrote N pieces in every turn: one tenant's 16
    concurrent REST calls answered in JSON held every other tenant's calls 1.9 s
    (``workers: N``: the engine's loop, every front end's calls)."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._tenants: deque[str] = deque()  # those waiting, in the order they go
        self._scheduled = False

    def turn(self, tenant: str) -> Turn:
        """What ``tenant``'s answer awaits before each piece."""
        return functools.partial(self._take, tenant)

    async def _take(self, tenant: str) -> None:
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        queue = self._waiting.get(tenant)
        if queue is None:
            queue = self._waiting[tenant] = deque()
            self._tenants.append(tenant)
        queue.append(mine)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._give)
        await mine  # cancelled (its caller left): :meth:`_give` passes it over

    def _give(self) -> None:
        """Let one waiting answer write its piece in the next turn."""
        self._scheduled = False
        while self._tenants:
            tenant = self._tenants.popleft()
            queue = self._waiting[tenant]
            waiter = queue.popleft()
            if queue:
                self._tenants.append(tenant)
            else:
                del self._waiting[tenant]
            if not waiter.done():
                waiter.set_result(None)
                break
        else:  # none waits: the next to come goes at once
            return
        # Again right after the piece just let go (it may wait for its next at once): a
        # lone answer gets a piece every turn, not every other one.
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._give)


#: BYTES characters written as JSON that cost what one value does (the two budgets).
CHARS_PER_VALUE = JSON_CHARS_PER_TURN / JSON_VALUES_PER_TURN


class _Pace:
    """An answer's JSON written in this turn of the event loop, in values (BYTES
    characters counted at :data:`CHARS_PER_VALUE`), whatever output they are of: a
    turn is taken before a piece that would pass :data:`JSON_VALUES_PER_TURN` (an
    answer of many outputs, each under it, was written in one turn: 32 of 16,384
    values held the loop 0.5 s). ``large``: the first piece waits for a turn too (each
    of N answers at once wrote its first at once)."""

    __slots__ = ("_turn", "_written")

    def __init__(self, turn: Turn, large: bool) -> None:
        self._turn = turn
        self._written = float(JSON_VALUES_PER_TURN) if large else 0.0

    async def room(self, values: float) -> None:
        """Before a piece of ``values``: the next turn, if this one has had its share."""
        if self._written and self._written + values > JSON_VALUES_PER_TURN:
            await self._turn()
            self._written = 0.0
        self._written += values

    def fits(self, values: float) -> bool:
        """Whether a piece of ``values`` fits in what this turn has left."""
        return self._written + values <= JSON_VALUES_PER_TURN

    def spend(self, values: float) -> None:
        """A piece that :meth:`fits`, written in this turn."""
        self._written += values


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidInput(f"{what} must be a JSON {_JSON_NAMES.get(names, names)}")
    return value


_JSON_NAMES = {"dict": "object", "list": "array", "str": "string", "int": "integer"}


def _parameters(value: object, holder: str, what: str) -> Parameters:
    """``holder``'s parameters (``what``: one of them, as a message names it)."""
    if value is None:
        return _NO_PARAMETERS
    params: dict[str, Any] = _expect(value, dict, what)
    check_parameter_count(len(params), holder)  # before any is read
    for key, item in params.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidInput(f"{what} '{shown(key)}' must be a boolean, number or string")
    return params


def _shape(value: object, name: str) -> tuple[int, ...]:
    dims: list[Any] = _expect(value, list, f"input '{shown(name)}': shape")
    if len(dims) > MAX_RANK:  # before any is read
        check_rank(len(dims), name)
    for dim in dims:
        _expect(dim, int, f"input '{shown(name)}': each dimension of shape")
        if dim not in _INT64:  # JSON's integers have no bound; the protocol's are int64
            raise InvalidInput(
                f"input '{shown(name)}': each dimension of shape is a 64-bit integer"
            )
    return tuple(dims)


#: The values of the protocol's int64 fields (JSON numbers are not bounded).
_INT64 = range(-(2**63), 2**63)


class _Input:
    __slots__ = ("binary", "binary_size", "data", "header")

    def __init__(self, header: TensorHeader, data: object, binary_size: int | None) -> None:
        self.header = header
        self.data = data
        self.binary_size = binary_size
        self.binary: memoryview | None = None


class JsonInferRequest:
    """A v2 REST inference request seen through :class:`mandant.types.EncodedRequest`.

    The JSON is parsed (and its structure checked) on construction; tensor data is
    only counted by :meth:`check_payload` and converted by :meth:`decode_inputs`."""

    __slots__ = (
        "_binary_all",
        "_id",
        "_inputs",
        "_json",
        "_max_bytes_elements",
        "_outputs",
        "_overflows",
        "_parameters",
        "model_name",
        "model_version",
    )

    def __init__(
        self,
        model_name: str,
        model_version: str,
        body: bytes | memoryview,
        header_length: str | None,
        max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    ) -> None:
        """``max_bytes_elements``: ``server.max_bytes_elements``, for every BYTES input,
        binary or JSON. ``max_json_bytes``: ``server.max_json_bytes``."""
        self.model_name = model_name
        self._max_bytes_elements = max_bytes_elements
        self.model_version = model_version
        view = memoryview(body).toreadonly()  # binary inputs: read-only arrays over it
        json_end = len(body) if header_length is None else _json_length(header_length, len(body))
        if json_end == 0 and header_length is not None:
            raise InvalidInput(
                "Inference-Header-Content-Length: 0 (a body of one input's raw bytes, no "
                "JSON header) is not supported: send the JSON header, with binary_data_size"
            )
        if json_end > max_json_bytes:
            raise BodyTooLarge(
                f"the request's JSON is larger than {max_json_bytes} bytes: send large "
                "tensors as binary data (binary_data_size, Inference-Header-Content-Length)"
            )
        self._json = view[:json_end].tobytes()  # at most max_json_bytes
        self._overflows: list[Any] | None = None
        try:
            doc = loads_untrusted(self._json)
        except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, too deep
            # With the header, a body of valid JSON may be cut short by it: say so.
            where = (
                "the request body is"
                if header_length is None
                else f"the first {json_end} bytes of the body ({HEADER_LENGTH}) are"
            )
            raise InvalidInput(f"{where} not a valid JSON inference request") from None
        doc = _expect(doc, dict, "the inference request")
        request_id = doc.get("id", "")
        self._id: str = _expect(request_id, str, "'id'")
        try:
            request_id.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no UTF-8 for it
            raise InvalidInput("'id' is not valid Unicode (a lone UTF-16 surrogate)") from None
        inputs: list[Any] = _expect(doc.get("inputs", []), list, "'inputs'")
        outputs: list[Any] = _expect(doc.get("outputs", []), list, "'outputs'")
        parameters = doc.get("parameters")
        # Counted before any item is read: 2 MiB of JSON can list 10⁵ outputs.
        check_counts(
            len(inputs), len(outputs), len(parameters) if isinstance(parameters, dict) else 0
        )
        self._parameters = _parameters(parameters, "the request", "request parameter")
        binary_all = self._parameters.get("binary_data_output", False)
        self._binary_all: bool = _expect(binary_all, bool, "parameter 'binary_data_output'")
        self._inputs = [_parse_input(item) for item in inputs]
        self._outputs = [_parse_output(item) for item in outputs]
        _assign_binary(self._inputs, view[json_end:])

    @property
    def request_id(self) -> str:
        return self._id

    def input_headers(self) -> Sequence[TensorHeader]:
        return [item.header for item in self._inputs]

    def requested_outputs(self) -> Sequence[str]:
        return [name for name, _ in self._outputs]

    def parameters(self) -> Parameters:
        return self._parameters

    def binary_outputs(self) -> frozenset[str] | bool:
        """Outputs to send as bytes: a set of names, or True for all of them. An output's
        own ``binary_data`` decides for it; where it has none, ``binary_data_output``
        (Triton's binary-data extension: it was ignored once outputs were named)."""
        if not self._outputs:
            return self._binary_all
        return frozenset(
            name
            for name, binary in self._outputs
            if (self._binary_all if binary is None else binary)
        )

    def check_payload(self) -> None:
        for item in self._inputs:
            if item.binary is not None:
                check_raw_size(item.binary, item.header, self._max_bytes_elements)
            elif item.header.datatype == "BYTES":
                check_bytes_count(
                    prod(item.header.shape), item.header.name, self._max_bytes_elements
                )

    def decode_inputs(self) -> dict[str, np.ndarray]:
        return {
            item.header.name: _decode(
                item, self._max_bytes_elements, functools.partial(self._overflowed, index)
            )
            for index, item in enumerate(self._inputs)
        }

    def _overflowed(self, index: int) -> bool:
        """Whether input ``index``'s JSON ``data`` holds a number beyond a double's range
        (``1e400``), which ``json`` reads as infinity: asked only of a tensor that holds
        an infinity (the literal ``Infinity`` is a client's to send), so the common case
        pays nothing. Its own data only: one elsewhere in the document (a parameter)
        made a tensor's ``Infinity`` out of range."""
        if self._overflows is None:
            doc = loads_untrusted(self._json, parse_float=_marked_float)
            self._overflows = doc["inputs"]
        return _holds(self._overflows[index].get("data"), _OVERFLOW)

    def raw_inputs(self) -> None:
        """None: REST is served where the models are (no front end hands it on)."""
        return None

    def typed_inputs(self) -> None:
        """None, as :meth:`raw_inputs`."""
        return None


def _json_length(header_length: str, body_length: int) -> int:
    digits = header_length.removeprefix("-")
    if not digits.isascii() or not digits.isdigit():  # int() takes "1_0" and " +9 "
        raise InvalidInput(f"{HEADER_LENGTH} is not an integer")
    # int() refuses more than 4,300 digits (a ValueError); no body has 20
    if len(digits) > 20 or not 0 <= (length := int(header_length)) <= body_length:
        raise InvalidInput(
            f"{HEADER_LENGTH} {shown(header_length)} is outside the body's {body_length} bytes"
        )
    return length


def _parse_input(item: object) -> _Input:
    tensor: dict[str, Any] = _expect(item, dict, "each input")
    name: str = _expect(tensor.get("name"), str, "an input's name")
    datatype: str = _expect(tensor.get("datatype"), str, f"input '{shown(name)}': datatype")
    shape = _shape(tensor.get("shape"), name)
    where = f"input '{shown(name)}'"
    params = _parameters(tensor.get("parameters"), where, f"{where}: parameter")
    if SHARED_MEMORY in params:
        raise InvalidInput(f"{where}: {NO_SHARED_MEMORY}")
    raw_size = params.get("binary_data_size")
    data = tensor.get("data")
    size: int | None = None
    if raw_size is not None:
        size = _expect(raw_size, int, f"input '{shown(name)}': binary_data_size")
        if size not in _INT64:
            raise InvalidInput(f"input '{shown(name)}': binary_data_size is a 64-bit integer")
        if size < 0:
            raise InvalidInput(f"input '{shown(name)}': binary_data_size is negative")
        if data is not None:
            raise InvalidInput(f"input '{shown(name)}': both data and binary_data_size given")
    elif data is None:
        raise InvalidInput(f"input '{shown(name)}' has neither data nor binary_data_size")
    return _Input(TensorHeader(name, datatype, shape), data, size)


def _parse_output(item: object) -> tuple[str, bool | None]:
    tensor: dict[str, Any] = _expect(item, dict, "each requested output")
    name: str = _expect(tensor.get("name"), str, "a requested output's name")
    where = f"output '{shown(name)}'"
    params = _parameters(tensor.get("parameters"), where, f"{where}: parameter")
    if params.get("classification", 0):
        raise InvalidInput(NO_CLASSIFICATION)
    if SHARED_MEMORY in params:
        raise InvalidInput(f"{where}: {NO_SHARED_MEMORY}")
    binary = params.get("binary_data")  # None: as binary_data_output says
    return name, None if binary is None else _expect(binary, bool, "parameter 'binary_data'")


def _assign_binary(inputs: list[_Input], binary: memoryview) -> None:
    """Give each binary input its slice of the bytes after the JSON, in order."""
    offset = 0
    for item in inputs:
        if item.binary_size is not None:
            end = offset + item.binary_size
            if end > len(binary):
                raise InvalidInput(
                    f"input '{shown(item.header.name)}': binary_data_size {item.binary_size} "
                    f"runs past the {len(binary)} bytes of binary data"
                )
            item.binary = binary[offset:end]
            offset = end
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data belong to no input "
            "(binary_data_size, or Inference-Header-Content-Length, is wrong)"
        )


#: What :func:`_marked_float` reads a number beyond a double's range as.
_OVERFLOW = object()


def _marked_float(text: str) -> object:
    value = float(text)
    return _OVERFLOW if math.isinf(value) else value


def _holds(data: object, marker: object) -> bool:
    """Whether the nested lists of ``data`` hold ``marker``."""
    if isinstance(data, list):
        return any(_holds(value, marker) for value in data)
    return data is marker


def _decode(
    item: _Input, max_bytes_elements: int, overflowed: Callable[[], bool] | None = None
) -> np.ndarray:
    header = item.header
    if item.binary is not None:
        check_raw_size(item.binary, header, max_bytes_elements)
        if header.datatype == "BYTES":
            try:
                array = split_bytes(item.binary, prod(header.shape))  # type: ignore[arg-type]
            except ValueError as exc:
                raise InvalidInput(f"input '{header.name}': {exc}") from None
            return array.reshape(header.shape)
        return np.frombuffer(item.binary, dtype=DATATYPES[header.datatype]).reshape(header.shape)
    return decode_json_data(item.data, header, max_bytes_elements, overflowed)


def decode_json_data(
    data: object,
    header: TensorHeader,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
    overflowed: Callable[[], bool] | None = None,
) -> np.ndarray:
    """A JSON ``data`` value (nested or flat lists) as an array of ``header``'s type and
    shape; a wrong count or an element of the wrong type is InvalidInput.
    ``overflowed``: whether the document held a number beyond a double's range (an
    infinity in a float tensor is then refused as out of range)."""
    count = check_shape(header)
    if header.datatype == "BYTES":
        check_bytes_count(count, header.name, max_bytes_elements)
    wrong_type = InvalidInput(
        f"input '{header.name}': data holds values that are not {header.datatype}"
    )
    try:
        values = np.array(data, dtype=np.object_ if header.datatype == "BYTES" else None)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged, too deep, huge
        raise wrong_type from None
    if values.size != count:
        raise InvalidInput(
            f"input '{header.name}': shape {list(header.shape)} needs {count} values "
            f"in data, got {values.size}"
        )
    if header.datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        for index, value in enumerate(values.reshape(-1)):
            if not isinstance(value, str):
                raise wrong_type
            try:
                out[index] = value.encode()
            except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no UTF-8 for it
                raise InvalidInput(
                    f"input '{header.name}': data holds a string that is not valid Unicode"
                ) from None
        return out.reshape(header.shape)
    dtype = DATATYPES[header.datatype]
    if dtype.kind in "iu" and values.dtype.kind not in "iu":
        return _exact_integers(data, header, wrong_type).reshape(header.shape)
    if dtype.kind == "f" and values.dtype.kind == "O":
        values = _large_integers(data, header, wrong_type)
    if values.size and values.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
        raise wrong_type
    if dtype.kind != "b" and _holds_booleans(data):  # numpy read them as 1 and 0
        raise wrong_type
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)  # type: ignore[type-var]
        if values.min() < info.min or values.max() > info.max:
            raise _out_of_range(header)
    with np.errstate(over="ignore"):  # a float too large for the datatype: refused below
        cast = values.astype(dtype)
    if (
        dtype.kind == "f"
        and cast.size
        and (infinite := np.isinf(cast)).any()
        and ((infinite & np.isfinite(values)).any() or (overflowed and overflowed()))
    ):
        raise _out_of_range(header)
    return cast.reshape(header.shape)


def _holds_booleans(data: object) -> bool:
    """Whether JSON ``data`` (nested lists, as numpy accepted them: rectangular) holds a
    true or a false anywhere: among numbers numpy reads them as 1 and 0, and a client's
    ``[true, 2]`` for FP32 ran as ``[1.0, 2.0]`` (Triton refuses it). One pass over the
    elements' types, a level at a time (a call per row took 251 ms for [10⁶, 1])."""
    level: list[Any] = data if isinstance(data, list) else [data]
    while level:
        types = set(map(type, level))
        if bool in types:
            return True
        if list not in types:
            return False
        level = list(itertools.chain.from_iterable(level))
    return False


def _large_integers(data: object, header: TensorHeader, wrong_type: InvalidInput) -> np.ndarray:
    """``data`` for a float datatype where numpy made objects of it: integers beyond 64
    bits among the numbers (a JavaScript client's ``2**64`` is ``18446744073709552000``;
    they were refused as not numbers), as doubles; anything else InvalidInput. Each
    element is checked as a Python object: slow, and only on this path."""
    items = np.array(data, dtype=np.object_).reshape(-1).tolist()
    if not all(type(item) is int or type(item) is float for item in items):
        raise wrong_type
    try:
        return np.array([float(item) for item in items], dtype=np.float64)
    except OverflowError:  # an integer beyond a double's range
        raise _out_of_range(header) from None


def _exact_integers(data: object, header: TensorHeader, wrong_type: InvalidInput) -> np.ndarray:
    """``data`` for an integer datatype where numpy did not read it as integers: beyond
    int64 (UINT64's upper half, which numpy turns into floats), or not integers at all
    (floats, booleans, strings: InvalidInput). Each element is checked as a Python
    object: slow, and only on this path."""
    items = np.array(data, dtype=np.object_).reshape(-1).tolist()
    if not all(type(item) is int for item in items):
        raise wrong_type
    info = np.iinfo(DATATYPES[header.datatype])  # type: ignore[type-var]
    if any(item < info.min or item > info.max for item in items):
        raise _out_of_range(header)
    return np.array(items, dtype=DATATYPES[header.datatype])


def _out_of_range(header: TensorHeader) -> InvalidInput:
    return InvalidInput(f"input '{header.name}': a value is out of range for {header.datatype}")


@dataclass(frozen=True)
class AnswerBody:
    """A response body in the pieces it was made of (the JSON's, then tensor bytes as
    views of the outputs), ``size`` bytes in all; ``header_length``: the JSON's length
    where tensor bytes follow it (the ``Inference-Header-Content-Length`` header), None
    for a JSON-only body."""

    pieces: Sequence[bytes | memoryview]
    size: int
    header_length: int | None

    def joined(self) -> bytes:
        return b"".join(self.pieces)


async def encode_infer_response(
    response: InferResponse, binary: frozenset[str] | bool
) -> tuple[bytes, int | None]:
    """:func:`encode_answer`'s body in one piece, and its JSON's length (None for a
    JSON-only body)."""
    answer = await encode_answer(response, binary)
    return answer.joined(), answer.header_length


async def encode_answer(
    response: InferResponse, binary: frozenset[str] | bool, turn: Turn = next_turn
) -> AnswerBody:
    """The response body. Outputs sent as JSON are written :data:`JSON_VALUES_PER_TURN`
    values (BYTES: :data:`JSON_CHARS_PER_TURN` characters) a turn of the event loop,
    however many outputs they are of, each turn after ``turn`` (a server's:
    :meth:`JsonTurns.turn`)."""
    declared = {spec.name: spec.datatype for spec in response.output_specs}
    json_values = sum(
        array.size for name, array in response.outputs.items() if not _binary(name, binary)
    )
    pace = _Pace(turn, json_values > JSON_VALUES_PER_TURN)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.request_id:
        doc["id"] = response.request_id
    head = [_dumps(doc)[:-1].encode(), b',"outputs":[']  # the JSON, in pieces
    chunks: list[bytes | memoryview] = []
    for index, (name, array) in enumerate(response.outputs.items()):
        datatype = declared.get(name) or datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if index:
            head.append(b",")
        if _binary(name, binary):
            pieces: Sequence[bytes | memoryview] = (
                bytes_pieces(array)
                if datatype == "BYTES"
                else [raw_view(array, DATATYPES[datatype])]
            )
            entry["parameters"] = {"binary_data_size": sum(map(len, pieces))}
            chunks += pieces
            head.append(_dumps(entry).encode())
        else:
            head += (_dumps(entry)[:-1].encode(), b',"data":[')
            await _json_data(head, name, array.reshape(-1), datatype, pace)
            head.append(b"]}")
    head.append(b"]}")
    length = sum(map(len, head))
    if not chunks:
        return AnswerBody(list(head), length, None)
    return AnswerBody([*head, *chunks], length + sum(map(len, chunks)), length)


def _binary(name: str, binary: frozenset[str] | bool) -> bool:
    """Whether output ``name`` goes as binary data (``binary``: every output, none, or
    those named)."""
    return binary is True or (binary is not False and name in binary)


async def _json_data(
    into: list[bytes], name: str, flat: np.ndarray, datatype: str, pace: _Pace
) -> None:
    """Append the JSON of a flat output's values, without brackets, to ``into``, a piece
    of at most :data:`JSON_VALUES_PER_TURN` values at a time, as ``pace`` lets it."""
    if datatype == "BYTES":
        await _json_strings(into, name, flat, pace)
        return
    for start in range(0, flat.size, JSON_VALUES_PER_TURN):
        piece = flat[start : start + JSON_VALUES_PER_TURN]
        await pace.room(piece.size)  # let the calls waiting meanwhile be served
        if start:
            into.append(b",")
        into.append(_json_numbers(piece, datatype))


def _json_numbers(flat: np.ndarray, datatype: str) -> bytes:
    """A flat numeric output's values as JSON, without brackets. Floats are written
    as the doubles they are (as Triton writes them: an FP32 value 0.1 is
    ``0.10000000149011612``), by orjson, whose float formatting is about 25 times
    faster than ``json``'s (16,384 values: 0.5 ms against 12.7 on the dev machine);
    a piece holding NaN or an infinity by ``json``, which writes them as the literals
    ``NaN`` and ``Infinity`` (orjson writes ``null``)."""
    values = np.ascontiguousarray(flat.astype(DATATYPES[datatype], copy=False))
    if values.dtype.kind == "f":
        values = values.astype(np.float64, copy=False)
        if not np.isfinite(values).all():
            return _dumps(values.tolist())[1:-1].encode()
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]


async def _json_strings(into: list[bytes], name: str, flat: np.ndarray, pace: _Pace) -> None:
    """BYTES values as JSON strings, as ``pace`` lets them be written (characters count
    at :data:`CHARS_PER_VALUE`), however they are spread over the elements. Elements
    that fit in what is left of a turn are decoded and escaped together; a larger one
    alone, :data:`JSON_CHARS_PER_TURN` characters at a time (a JSON string may be cut
    between any characters)."""
    together: list[str] = []
    separator = b""

    def flush() -> None:
        nonlocal separator
        if together:
            into.append(separator + _dumps(together)[1:-1].encode())
            separator = b","
            together.clear()

    for value in flat:
        data = value.encode() if isinstance(value, str) else value
        cost = (len(data) + _ELEMENT_CHARS) / CHARS_PER_VALUE
        if cost <= JSON_VALUES_PER_TURN:
            if pace.fits(cost):
                pace.spend(cost)  # no await an element: a million of them cost 0.3 s
            else:
                flush()  # what this turn had room for
                await pace.room(cost)  # let the calls waiting meanwhile be served
            together.append(_utf8(name, data))
            continue
        flush()
        into.append(separator + b'"')
        separator = b","
        decoder = codecs.getincrementaldecoder("utf-8")()
        view = memoryview(data).cast("B")
        for start in range(0, len(view), JSON_CHARS_PER_TURN):
            piece = view[start : start + JSON_CHARS_PER_TURN]
            await pace.room(len(piece) / CHARS_PER_VALUE)
            final = start + len(piece) >= len(view)
            into.append(_dumps(_utf8(name, piece, decoder, final))[1:-1].encode())
        into.append(b'"')
    flush()


def _utf8(
    name: str,
    data: bytes | memoryview,
    decoder: codecs.IncrementalDecoder | None = None,
    final: bool = True,
) -> str:
    """A BYTES output's element (or a piece of one, through ``decoder``) as text."""
    try:
        return bytes(data).decode() if decoder is None else decoder.decode(data, final)
    except UnicodeDecodeError:
        raise InvalidInput(
            f"output '{name}' holds bytes that are not UTF-8: request it with binary_data"
        ) from None
