"""Counts a ``ModelInferRequest``'s entries on the wire, before protobuf parses it.

protobuf (upb) builds every entry a message lists while it parses, on the event loop
that serves every tenant, before any count can be asked: a 61 MiB message (under
``max_message_bytes``) of request ``parameters`` entries held it for 7.4 s, of empty
``inputs {}`` for 3.2 s (and 2.6 GiB). :func:`check_infer_request` reads the message's
tags, varints and lengths (and skips every length-delimited value it does not count)
and refuses it, with the bounds of ``mandant.validation``, at the first entry over
one, having read at most :data:`MAX_FIELDS` fields, whatever the message's size:

- top level: ``inputs``, ``outputs``, ``raw_input_contents`` (one per input) and
  ``parameters`` entries;
- in each input: its ``shape``'s dimensions (packed or not) and its ``parameters``;
  in each requested output: its ``parameters``;
- at most :data:`MAX_FIELDS` fields in all, and one per :data:`BYTES_PER_FIELD` bytes
  of the message: what a request within every count bound has, with room to spare;
- at most :data:`MAX_UNNEEDED_FIELDS` fields no request needs (unknown numbers, a
  wire type other than the field's, a single field sent again: protobuf keeps the
  last), which protobuf skips far faster than a walk in Python reads them.

So the walk costs at most about 1 µs per 8 bytes (about what protobuf's costliest
entries, map entries, cost it to build), 16 ms per message at most, and stops at the
first entry over a bound.

Tensor data is not read: ``contents`` (typed values, bounded after the parse by
``max_bytes_elements`` for BYTES) and each ``raw_input_contents`` entry are skipped
by their length. Bytes that are not the wire format (a varint or a length that runs
past the end, wire types 6 and 7, field number 0) are refused as the parser refuses
them; so are groups (wire types 3 and 4), which no proto3 message has and which upb
would skip field by field. Field numbers come from the generated descriptors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from mandant.errors import InvalidInput
from mandant.service import MAX_LOAD_CONFIG_CHARS
from mandant.validation import MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS, MAX_RANK
from mandant_client._proto import grpc_service_pb2 as pb

#: Messages up to this size are parsed unchecked: the worst parse of one (64 KiB of
#: empty ``inputs {}``, the costliest entry per byte) takes about 1.6 ms, and the
#: count checks after the parse still refuse it.
PRE_PARSE_ABOVE_BYTES = 64 * 1024

#: Most fields the walk reads, at every level together (each a tag, and a varint or a
#: skipped length), about 10 ms of walking at worst; past it the request is refused.
#: A request at every count bound (packed shapes, no tensor parameters) has 7,427;
#: the rest is room for tensor parameters (Mandant reads none but to refuse shared
#: memory and classification) and for what a client never needs, such as unknown
#: fields or a singular field sent again (protobuf keeps the last), which would
#: otherwise make the walk read the whole message.
MAX_FIELDS = 16384
#: A message is read at most one field per this many of its bytes (and
#: :data:`MAX_FIELDS` at most): a legitimate request over
#: :data:`PRE_PARSE_ABOVE_BYTES` has fewer (its bytes are mostly tensors), while 82 KB
#: of 16,000 tiny fields, which protobuf skips in 0.1 ms, took the walk 10 ms each.
BYTES_PER_FIELD = 8
#: Fields no request needs that the walk reads before refusing the message.
MAX_UNNEEDED_FIELDS = 64

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
#: A shape's packed dimensions take 1 to 10 bytes each: more bytes than this are more
#: than :data:`MAX_RANK` dimensions.
_MAX_PACKED_SHAPE_BYTES = MAX_RANK * 10
#: Every byte but the last of a varint has its high bit set: deleting those leaves
#: one byte per varint.
_CONTINUATION_BYTES = bytes(range(0x80, 0x100))

_REQUEST = pb.ModelInferRequest.DESCRIPTOR
_INPUT = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR
_OUTPUT = pb.ModelInferRequest.InferRequestedOutputTensor.DESCRIPTOR
_INPUTS = _REQUEST.fields_by_name["inputs"].number
_OUTPUTS = _REQUEST.fields_by_name["outputs"].number
_RAW_CONTENTS = _REQUEST.fields_by_name["raw_input_contents"].number
_PARAMETERS = _REQUEST.fields_by_name["parameters"].number
_INPUT_SHAPE = _INPUT.fields_by_name["shape"].number
_INPUT_PARAMETERS = _INPUT.fields_by_name["parameters"].number
_OUTPUT_PARAMETERS = _OUTPUT.fields_by_name["parameters"].number


#: The request's repeated fields: each one's bound and how a refusal names its entries.
_REQUEST_BOUNDS: dict[int, tuple[int, str]] = {
    _INPUTS: (MAX_INPUTS, "inputs"),
    _RAW_CONTENTS: (MAX_INPUTS, "raw_input_contents entries"),
    _OUTPUTS: (MAX_OUTPUTS, "requested outputs"),
    _PARAMETERS: (MAX_PARAMETERS, "parameters"),
}


class MalformedWire(Exception):
    """The bytes are not the protobuf wire format (or use groups)."""


class _Budget:
    """What the walk of one message may still read: fields in all, and fields no
    request needs (module doc)."""

    __slots__ = ("fields", "unneeded")

    def __init__(self, size: int) -> None:
        self.fields = min(MAX_FIELDS, size // BYTES_PER_FIELD)
        self.unneeded = MAX_UNNEEDED_FIELDS

    def read(self) -> None:
        self.fields -= 1
        if self.fields < 0:
            raise InvalidInput(
                "request has more fields than its size allows (one per "
                f"{BYTES_PER_FIELD} bytes, at most {MAX_FIELDS})"
            )

    def unneeded_field(self) -> None:
        self.unneeded -= 1
        if self.unneeded < 0:
            raise _over("request", MAX_UNNEEDED_FIELDS, "fields no request needs")


def _single_fields(descriptor: Any) -> frozenset[int]:
    """The numbers of ``descriptor``'s fields that are not repeated."""
    return frozenset(f.number for f in descriptor.fields if not f.is_repeated)


_REQUEST_SINGLE = _single_fields(_REQUEST)
_INPUT_SINGLE = _single_fields(_INPUT)
_OUTPUT_SINGLE = _single_fields(_OUTPUT)
_REQUEST_FIELDS = frozenset(f.number for f in _REQUEST.fields)
_INPUT_FIELDS = frozenset(f.number for f in _INPUT.fields)
_OUTPUT_FIELDS = frozenset(f.number for f in _OUTPUT.fields)


def _needed(number: int, wire: int, fields: frozenset[int], single: frozenset[int],
            seen: set[int]) -> bool:  # fmt: skip
    """Whether a field of ``number`` and ``wire`` type is one a request needs: a
    known field, length-delimited (every field of these messages is, but a shape's
    unpacked dimensions, checked by the caller), a single one seen once."""
    if number not in fields or wire != _LEN:
        return False
    if number in single:
        if number in seen:
            return False
        seen.add(number)
    return True


def check_infer_request(raw: bytes) -> None:
    """Refuse ``raw`` (a ``ModelInferRequest``'s bytes) if it lists more entries than
    ``mandant.validation`` accepts, or more fields than :class:`_Budget` allows
    (InvalidInput), or is not the wire format (:class:`MalformedWire`), having read at
    most that many fields."""
    counts = dict.fromkeys(_REQUEST_BOUNDS, 0)
    budget = _Budget(len(raw))
    seen: set[int] = set()
    pos, end = 0, len(raw)
    while pos < end:
        budget.read()
        number, wire, pos = _tag(raw, pos, end)
        if not _needed(number, wire, _REQUEST_FIELDS, _REQUEST_SINGLE, seen):
            budget.unneeded_field()
            pos = _skip(raw, pos, end, wire)
            continue
        length, pos = _varint(raw, pos, end)
        start, pos = pos, pos + length
        if pos > end:
            raise MalformedWire
        if number in counts:
            counts[number] += 1
            bound, entries = _REQUEST_BOUNDS[number]
            if counts[number] > bound:
                raise _over("request", bound, entries)
        if number == _INPUTS:
            _check_input(raw, start, pos, budget)
        elif number == _OUTPUTS:
            _check_output(raw, start, pos, budget)


def _check_input(raw: bytes, pos: int, end: int, budget: _Budget) -> None:
    """Walk one input's fields (``raw[pos:end]``)."""
    rank = parameters = 0
    seen: set[int] = set()
    while pos < end:
        budget.read()
        number, wire, pos = _tag(raw, pos, end)
        if number == _INPUT_SHAPE and wire == _VARINT:  # one dimension, unpacked
            pos = _skip(raw, pos, end, wire)
            rank += 1
        elif not _needed(number, wire, _INPUT_FIELDS, _INPUT_SINGLE, seen):
            budget.unneeded_field()
            pos = _skip(raw, pos, end, wire)
        elif number == _INPUT_SHAPE:  # packed: one varint a dimension
            length, pos = _varint(raw, pos, end)
            if pos + length > end:
                raise MalformedWire
            if length > _MAX_PACKED_SHAPE_BYTES:
                raise _over("an input's shape", MAX_RANK, "dimensions")
            rank += len(raw[pos : pos + length].translate(None, _CONTINUATION_BYTES))
            pos += length
        else:
            pos = _skip(raw, pos, end, wire)
            if number == _INPUT_PARAMETERS:
                parameters += 1
                if parameters > MAX_PARAMETERS:
                    raise _over("an input", MAX_PARAMETERS, "parameters")
        if rank > MAX_RANK:
            raise _over("an input's shape", MAX_RANK, "dimensions")


def _check_output(raw: bytes, pos: int, end: int, budget: _Budget) -> None:
    """Walk one requested output's fields."""
    parameters = 0
    seen: set[int] = set()
    while pos < end:
        budget.read()
        number, wire, pos = _tag(raw, pos, end)
        if not _needed(number, wire, _OUTPUT_FIELDS, _OUTPUT_SINGLE, seen):
            budget.unneeded_field()
        elif number == _OUTPUT_PARAMETERS:
            parameters += 1
            if parameters > MAX_PARAMETERS:
                raise _over("a requested output", MAX_PARAMETERS, "parameters")
        pos = _skip(raw, pos, end, wire)


def _over(subject: str, bound: int, entries: str) -> InvalidInput:
    """The refusal of ``subject``'s ``entries``: the walk stops at the first one over
    ``bound``, so it knows no more than that there are more."""
    return InvalidInput(f"{subject} has more than {bound} {entries}, at most {bound} are accepted")


def _tag(raw: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The field number and wire type of the tag at ``pos``, and where its value
    starts."""
    tag = raw[pos]
    if tag < 0x80:
        pos += 1
    else:
        tag, pos = _varint(raw, pos, end)
        if tag > 0xFFFFFFFF:
            raise MalformedWire
    if tag < 8:  # field number 0
        raise MalformedWire
    return tag >> 3, tag & 7, pos


def _varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` (at most 10 bytes) and where it ends."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise MalformedWire


def _skip(raw: bytes, pos: int, end: int, wire: int) -> int:
    """Where the value of wire type ``wire`` at ``pos`` ends."""
    if wire == _VARINT:
        return _varint(raw, pos, end)[1]
    if wire == _LEN:
        length, pos = _varint(raw, pos, end)
        pos += length
    elif wire == _I64:
        pos += 8
    elif wire == _I32:
        pos += 4
    else:  # groups (3, 4) and wire types 6, 7
        raise MalformedWire
    if pos > end:
        raise MalformedWire
    return pos


#: The fields a stream's error answer repeats (``stream.py``): they come first, as
#: serializers write fields in the order of their numbers.
_NAMING = frozenset(
    _REQUEST.fields_by_name[name].number for name in ("model_name", "model_version", "id")
)
#: Fields :func:`naming_prefix` reads at most before it stops.
_NAMING_FIELDS = 8


def naming_prefix(raw: bytes) -> bytes:
    """The leading part of ``raw`` (a ``ModelInferRequest``'s bytes) that holds its
    first fields as long as they are ``model_name``, ``model_version`` or ``id``: a
    message of its own, cheap to parse whatever the rest is, from which a refused
    stream message is answered with its id: the fields read whole before the bytes
    stop being the wire format (they were all dropped: a message whose names parsed
    and whose later bytes did not was answered without its id). Every standard
    serializer (tritonclient's, mandant_client's) writes fields in the order of their
    numbers, so these come first; a message that sends them after another field is
    answered without them."""
    pos, end = 0, len(raw)
    try:
        for _ in range(_NAMING_FIELDS):
            if pos >= end:
                break
            number, wire, after = _tag(raw, pos, end)
            if number not in _NAMING or wire != _LEN:
                break
            pos = _skip(raw, after, end, wire)
    except MalformedWire:
        pass  # ``pos`` ends the last field read whole
    return raw[:pos]


#: The largest message of a call other than an inference call: its fields are names
#: and flags, but for RepositoryModelLoad's ``config`` parameter (admin keys only),
#: of at most ``MAX_LOAD_CONFIG_CHARS`` characters, 4 bytes at most each in UTF-8;
#: 64 KiB more for the names and keys beside it.
MAX_SMALL_MESSAGE_BYTES = 4 * MAX_LOAD_CONFIG_CHARS + 64 * 1024


def check_small_message(raw: bytes) -> None:
    """Refuse ``raw``, the message of a call other than an inference call, before it
    is parsed (or, in a front end of ``workers: N``, handed on) if it is larger than
    any such message needs to be: parsing 61 MiB of unknown fields held the event
    loop for 0.3 s (and map entries, in an admin call's, cost 14 ms a MiB)."""
    if len(raw) > MAX_SMALL_MESSAGE_BYTES:
        raise InvalidInput(
            f"the request message has {len(raw)} bytes, at most {MAX_SMALL_MESSAGE_BYTES} "
            "are accepted for this call"
        )


#: The pre-parse check of each request message type; other types are small by nature.
PRE_PARSE: dict[type[Message], Callable[[bytes], None]] = {
    pb.ModelInferRequest: check_infer_request,
}
