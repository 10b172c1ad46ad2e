"""gRPC health checking and server reflection: open (no key, so that Kubernetes probes,
grpc_health_probe, grpcurl and Postman work), but bounded in what a caller without a
key can make the server hold.

grpc's stock servicers do the work (their semantics stay); each method is registered
here with ``request_deserializer=None``, so its handler gets the message's raw bytes,
refuses one over the method's bound INVALID_ARGUMENT (:data:`HEALTH_REQUEST_MAX_BYTES`,
:data:`REFLECTION_REQUEST_MAX_BYTES`) before it is parsed, and only then hands the
parsed message to the stock servicer. Unbounded, a Watch kept its service name for as
long as the client kept the stream open (32 streams naming 8 MiB services held 1 GiB
of RSS), and each reflection answer repeats its whole request (``original_request``:
16 streams of one unread 8 MiB request held 338 MiB). Watch streams open at once are
capped, from one client address (:data:`WATCH_STREAMS_PER_ADDRESS`) and server-wide
(:data:`WATCH_STREAMS_MAX`); beyond it UNIMPLEMENTED, which gRPC clients' health
checking takes as "no health checking here": they serve on, as from a healthy server.
RESOURCE_EXHAUSTED (it was) failed every call of a channel whose Watch it refused: one
client without a key holding 1,024 streams failed every other tenant's health-checked
channels.

Each message is read by :class:`~mandant.transport.grpc.reads.MessageReads`, as one
of a call without a key: health checks and reflection apart, at most
``PEER_OPEN_READS_MAX`` of them at once from one client address and ``OPEN_READS_MAX``
in all, each in at most ``OPEN_READ_TIMEOUT_S`` (gRPC holds what has come of a message
until the rest does: unread by a handler of its own, four health checks sending 30 of
a declared 40 MiB each held 125 MB, for as long as their connection lived). So a
reflection stream left idle that long ends DEADLINE_EXCEEDED; its client opens
another.

None of these calls passes the gate or takes a place under ``max_concurrent_rpcs``
(a full server still answers its probes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mandant.errors import InvalidInput, MandantError
from mandant.transport.grpc.gateway import NO_MESSAGE, Context, abort, parse
from mandant.transport.grpc.reads import MessageReads, keyless_pools, peer_address

T = TypeVar("T")

#: A HealthCheckRequest's bytes: its service name, a fully qualified proto service name
#: (``inference.GRPCInferenceService`` is 30 bytes), plus 3 bytes of framing; as long
#: as a request ``id`` may be (``gateway.MAX_LOGGED_ID``). Over it: INVALID_ARGUMENT.
HEALTH_REQUEST_MAX_BYTES = 256
#: A ServerReflectionRequest's bytes: it names one symbol, file or extension (ours are
#: under 100 bytes), and each answer repeats it. Over it: INVALID_ARGUMENT.
REFLECTION_REQUEST_MAX_BYTES = 4096
#: Health Watch streams open at once, server-wide and from one client address: gRPC
#: clients' own health checking (``healthCheckConfig``) opens one per channel to this
#: replica; beyond either, UNIMPLEMENTED (module doc).
WATCH_STREAMS_MAX = 1024
WATCH_STREAMS_PER_ADDRESS = 64
#: The services whose reads are counted apart (``reads.keyless_pools``): a reflection
#: stream waits for its next message as long as its client likes, a health check's
#: comes at once.
HEALTH = "health"
REFLECTION = "reflection"


async def read_bounded(
    reads: MessageReads,
    service: str,
    message_type: type[Message],
    max_bytes: int,
    context: Context,
) -> Any:
    """The call's next message (None: the client sent no more), read as one of a call
    without a key; the call is refused where the read is (too many at once, too slow),
    and INVALID_ARGUMENT if the message is over ``max_bytes`` (not parsed) or not one
    (neither is repeated to the client)."""
    try:
        pools = keyless_pools(service, context.peer())
        raw = await reads.read(context, reads.open_timeout_s, pools)
        if not isinstance(raw, bytes):
            return None
        if len(raw) > max_bytes:
            raise InvalidInput(
                f"a {message_type.DESCRIPTOR.full_name} message is at most {max_bytes} bytes"
            )
        return parse(message_type, raw)
    except MandantError as exc:
        await abort(context, exc)
        raise  # not reached: abort ends the call


def bounded(
    reads: MessageReads,
    service: str,
    message_type: type[Message],
    max_bytes: int,
    behavior: Callable[[Any, Context], Awaitable[T]],
) -> Callable[[object, Context], Awaitable[T]]:
    """A handler of a call with one message: read (``reads``), size-checked, parsed,
    then ``behavior``'s."""

    async def handle(messages: object, context: Context) -> T:
        request = await read_bounded(reads, service, message_type, max_bytes, context)
        if request is None:
            await abort(context, InvalidInput(NO_MESSAGE))
        return await behavior(request, context)

    return handle


async def bounded_stream(
    reads: MessageReads,
    service: str,
    message_type: type[Message],
    max_bytes: int,
    context: Context,
) -> AsyncIterator[Any]:
    """A stream's messages, each read, size-checked, then parsed."""
    while (
        request := await read_bounded(reads, service, message_type, max_bytes, context)
    ) is not None:
        yield request


class WatchCap:
    """Watch streams open at once, at most ``max_streams`` (``watching`` now) and
    ``per_address`` from one client address; and their end when the server stops
    (:meth:`end`)."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        max_streams: int,
        per_address: int = WATCH_STREAMS_PER_ADDRESS,
    ) -> None:
        self._servicer = servicer
        self._max_streams = max_streams
        self._per_address = per_address
        self.watching = 0
        self._by_address: dict[str, int] = {}
        self._ending = asyncio.Event()

    def end(self) -> None:
        """The server stops taking calls (its statuses were set NOT_SERVING before):
        each Watch stream ends, status OK, once the last status it wrote is NOT_SERVING
        (at most :data:`WATCH_END_WAIT_S` later). Open, a stream held the stop for its
        whole grace: gRPC waits for every call, and the stock servicer's Watch never
        ends. Called as gRPC stops taking calls, not before: a client's health checking
        opens a new Watch at once when one ends after an answer, and a server still
        taking calls would be asked again and again."""
        self._ending.set()

    async def watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        address = peer_address(context.peer())
        from_address = self._by_address.get(address, 0)
        if self.watching >= self._max_streams or from_address >= self._per_address:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"health Watch streams are at most {self._max_streams} open "
                f"({self._per_address} from one address): no health checking on this one",
            )
            return
        self.watching += 1
        self._by_address[address] = from_address + 1
        told = _Told(context)
        watching = asyncio.ensure_future(self._servicer.Watch(request, cast(Context, told)))
        try:
            await _first(watching, self._ending.wait())
            if not watching.done():  # the server stops: NOT_SERVING last, then the end
                await _first(watching, told.not_serving.wait(), WATCH_END_WAIT_S)
            if watching.done():
                watching.result()  # the stock Watch ended (or failed: its write) by itself
        finally:
            watching.cancel()
            self.watching -= 1
            left = self._by_address.pop(address) - 1
            if left:
                self._by_address[address] = left


async def _first(
    task: asyncio.Future[None], waiting: Awaitable[object], timeout_s: float | None = None
) -> None:
    """Until ``task`` ends or ``waiting`` returns (at most ``timeout_s``)."""
    other = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait((task, other), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        other.cancel()


#: How long a Watch stream is given to tell its client NOT_SERVING once the server stops.
WATCH_END_WAIT_S = 1.0


class _Told:
    """A Watch stream's context; ``not_serving`` is set while the last status written
    to it is NOT_SERVING (a later SERVING clears it)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.not_serving = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if message.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.not_serving.set()
        else:
            self.not_serving.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def add_health(
    server: grpc.aio.Server,
    servicer: health.aio.HealthServicer,
    reads: MessageReads,
    max_watch_streams: int = WATCH_STREAMS_MAX,
) -> WatchCap:
    """Serve ``grpc.health.v1.Health`` from ``servicer`` (whose ``set`` says what it
    answers), bounded, its messages read by ``reads``; returns the Watch cap."""
    cap = WatchCap(servicer, max_watch_streams)
    request = health_pb2.HealthCheckRequest
    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.stream_unary_rpc_method_handler(
            bounded(reads, HEALTH, request, HEALTH_REQUEST_MAX_BYTES, servicer.Check),
            request_deserializer=None,
            response_serializer=serialize,
        ),
        "Watch": grpc.stream_stream_rpc_method_handler(
            bounded(reads, HEALTH, request, HEALTH_REQUEST_MAX_BYTES, cap.watch),
            request_deserializer=None,
            response_serializer=serialize,
        ),
    }
    name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    server.add_registered_method_handlers(name, handlers)
    return cap


def add_reflection(
    server: grpc.aio.Server, servicer: reflection.aio.ReflectionServicer, reads: MessageReads
) -> None:
    """Serve ``grpc.reflection.v1alpha.ServerReflection`` from ``servicer``, each
    request bounded, read by ``reads``."""
    request = reflection_pb2.ServerReflectionRequest

    async def info(messages: object, context: Context) -> AsyncIterator[Any]:
        requests = bounded_stream(reads, REFLECTION, request, REFLECTION_REQUEST_MAX_BYTES, context)
        async for answer in servicer.ServerReflectionInfo(requests, context):
            yield answer

    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=None,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_registered_method_handlers(
        reflection.SERVICE_NAME, {"ServerReflectionInfo": handler}
    )
