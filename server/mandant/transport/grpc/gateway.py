"""The one gate every RPC passes, built into the method handlers themselves (no
generic server interceptor on the hot path).

For each method the gate

1. authenticates the caller on the call's metadata (tenant key, admin key, or none
   for the open probes) **before the message is read**: a unary method is served by a
   streaming handler that reads its one message only once the key is accepted (and the
   call has its places), so an unauthenticated 60 MiB call costs a hash and no memory
   (a unary handler is called once gRPC holds the whole message: a client without a
   key sending large messages slowly held gigabytes);
2. parses the message, a large one checked on the wire first (``wire_bounds.py``:
   an inference request's counts, any other message's size); bytes that are not one
   answer INVALID_ARGUMENT;
3. awaits the servicer's behaviour with a :class:`Call` (the tenant, and the model the
   data plane resolved, for metrics);
4. maps every exception to a status through ``status.py``'s one table; unknown ones
   become INTERNAL with a generic message and a logged request id;
5. reports the answer once to the :class:`~mandant.events.Observer`: a refusal
   before it is sent, with the call's places already given back, so that what a
   client has seen is counted in ``/metrics`` and the statistics. A call whose client
   deadline had passed is reported DEADLINE_EXCEEDED however it ended (the client saw
   that), so SLOs count it as bad.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeAlias

import grpc
from google.protobuf.message import DecodeError, Message

from mandant.config.server import DEFAULT_MESSAGE_READ_TIMEOUT_S
from mandant.context import current_request_id, current_tenant
from mandant.errors import InvalidInput, MandantError, ServerBusy, Unauthenticated, encodable
from mandant.events import NullObserver, Observer
from mandant.scheduling.door import CallCap, FrontDoor, count_if_busy
from mandant.scheduling.gather import CallGather
from mandant.transport.grpc.reads import (
    MessageReads,
    MessageTimedOut,
    Reading,
    ReadsFull,
    tenant_pool,
)
from mandant.transport.grpc.status import INTERNAL_MESSAGE, status_for, trailers_for
from mandant.transport.grpc.wire_bounds import (
    PRE_PARSE,
    PRE_PARSE_ABOVE_BYTES,
    MalformedWire,
    check_small_message,
)
from mandant.transport.unread import UnreadAnswers
from mandant.types import Call, Tenant

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext
Authenticator = Callable[[str | None], Tenant]
AdminAuthenticator = Callable[[str | None], None]
PeerAuthenticator = Callable[[Context], Tenant]


class Access(enum.Enum):
    OPEN = "open"  # probes: no key, like Triton's
    TENANT = "tenant"  # a tenant's API key
    ADMIN = "admin"  # an operator's admin key
    #: a tenant key (the call's tenant is set) or an admin key (its tenant is None)
    TENANT_OR_ADMIN = "tenant_or_admin"


class Unary(Protocol):
    def __call__(self, request: Any, call: Call, context: Context) -> Awaitable[Any]: ...


#: What a front end of ``workers: N`` does with a call the engine serves: hand its
#: message's bytes on and return the engine's answer's (``forward.py``).
Forward = Callable[[bytes, Context], Awaitable[bytes]]


class Streaming(Protocol):
    def __call__(
        self,
        call: Call,
        context: Context,
        caller: Callable[[], Tenant | None],
        release: Callable[[], None],
    ) -> Awaitable[None]:
        """``caller``: the stream's caller authenticated again, as of now (a reload may
        have revoked its key: :class:`~mandant.errors.Unauthenticated`). ``release``:
        gives back the stream's place under ``server.max_tenant_streams`` before it
        ends (once; the gate gives it back at the end otherwise)."""
        ...


def authorization(context: Context) -> str | None:
    return metadata_value(context, "authorization")


def metadata_value(context: Context, name: str) -> str | None:
    """The first text value of request metadata ``name`` (lower case), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


def parse(message_type: type[Message], raw: bytes) -> Any:
    """The message in ``raw``; INVALID_ARGUMENT (a plain message) if it is not one.
    One larger than :data:`PRE_PARSE_ABOVE_BYTES` is checked first, before protobuf
    builds its entries (``wire_bounds.py``): an inference request's counts on the
    wire, any other message's size."""
    try:
        if len(raw) > PRE_PARSE_ABOVE_BYTES:
            PRE_PARSE.get(message_type, check_small_message)(raw)
        return message_type.FromString(raw)
    except (DecodeError, MalformedWire):
        raise InvalidInput(
            f"the request is not a valid {message_type.DESCRIPTOR.name} message"
        ) from None


NO_MESSAGE = "the call has no request message"

#: What a client got from gRPC itself when gRPC ended its call while the message came
#: in: a message over ``grpc.max_receive_message_length`` (``max_message_bytes``).
REFUSED_BY_GRPC = "RESOURCE_EXHAUSTED"


class CallEnded(Exception):
    """gRPC ended the call while its message came in (:func:`no_message`): nothing
    can be sent on it any more."""


async def no_message(context: Context) -> NoReturn:
    """Why :meth:`context.read` gave no message (EOF): InvalidInput if the client sent
    none.

    grpc.aio reads a message that gRPC refused as the end of the client's messages
    (EOF), as it reads a client that sent none: gRPC refuses one over the server's
    ``max_message_bytes`` itself and ends the call, its client gets
    RESOURCE_EXHAUSTED, and a figure that says INVALID_ARGUMENT (no message) is not
    what the client saw. Only a call that gRPC still holds open takes initial
    metadata: :class:`CallEnded` where it does not (counted as :data:`REFUSED_BY_GRPC`;
    a client that cancels while its message is on its way ends the call alike, and is
    counted so too: grpc.aio does not tell them apart). Called on EOF only: the hot
    path awaits ``context.read()`` itself, one coroutine fewer per call."""
    try:
        await context.send_initial_metadata(())
    except (asyncio.CancelledError, Exception) as exc:  # gRPC cancels an ended call's handler
        raise CallEnded from exc
    raise InvalidInput(NO_MESSAGE)


#: A call cancelled with less than this left of its deadline was given up by its client
#: at that deadline: the client started the clock when it sent the call, the server
#: when it received it, so the client's deadline comes first by the time in between.
CANCELLED_AT_DEADLINE_S = 0.1


def deadline_passed(context: Context, slack_s: float = 0.0) -> bool:
    """Whether the call's deadline has passed (or is less than ``slack_s`` away)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack_s


def client_saw(context: Context, code: str) -> str:
    """The status a call's client saw, for a call that ended with ``code`` (a status
    name): DEADLINE_EXCEEDED once its deadline had passed, however it ended, so SLOs
    count it as bad; a cancellation just before the deadline counts as it."""
    slack_s = CANCELLED_AT_DEADLINE_S if code == "CANCELLED" else 0.0
    return "DEADLINE_EXCEEDED" if deadline_passed(context, slack_s) else code


class Gate:
    """``cap``: calls (and stream messages) served at once, server-wide (shared with the
    other ports); one more is answered RESOURCE_EXHAUSTED, unless it can take the
    place of another tenant's call waiting at the door (``door.py``). An inference
    call takes its place once its key is checked, before its message is read (it may
    wait at the door, undecoded); any other call once its small message has come, so
    that calls whose messages never come hold no place. ``door``: where inference
    calls take turns by tenant once many are in progress (``door.py``; shared with the
    other ports too)."""

    def __init__(
        self,
        authenticate: Authenticator,
        authenticate_admin: AdminAuthenticator,
        observer: Observer | None = None,
        cap: CallCap | None = None,
        door: FrontDoor | None = None,
        authenticate_peer: PeerAuthenticator | None = None,
        unread: UnreadAnswers | None = None,
        gather: CallGather | None = None,
        reads: MessageReads | None = None,
    ) -> None:
        """``authenticate_peer``: the tenant of a call's verified client certificate,
        asked for calls without a key (mTLS only; None: a key is always needed).
        ``unread``: each tenant's answers not read yet (``unread.py``): an inference
        call of a tenant at its bound is refused before it takes a place (None: not
        counted). ``gather``: where inference calls of a busy front end wait for a few
        others once their message has come, to run together (``gather.py``; None:
        never held). ``reads``: how long each call's message may take to come, and
        how many calls read theirs at once (``reads.py``; None: the defaults)."""
        self._authenticate = authenticate
        self._authenticate_admin = authenticate_admin
        self._authenticate_peer = authenticate_peer
        self._observer: Observer = observer or NullObserver()
        self.door = door
        self._cap = cap if cap is not None else CallCap(1 << 62)
        #: Calls (and streams) whose handler started, ever: how a stopping server
        #: sees that gRPC has handed it every call it had received.
        self.started = 0
        self._unread = unread
        self.gather = gather
        self.reads = reads if reads is not None else MessageReads(DEFAULT_MESSAGE_READ_TIMEOUT_S)

    @property
    def observer(self) -> Observer:
        return self._observer

    def _caller(self, access: Access, context: Context) -> Tenant | None:
        """The calling tenant (None on open methods and for an admin key)."""
        if access is Access.OPEN:
            return None
        key = authorization(context)
        if access is Access.ADMIN:
            self._authenticate_admin(key)
            return None
        try:
            tenant = self._tenant(key, context)
        except Unauthenticated as refused:
            if access is not Access.TENANT_OR_ADMIN:
                raise
            try:
                self._authenticate_admin(key)
            except Unauthenticated:
                raise refused from None
            return None
        current_tenant.set(tenant)
        return tenant

    def _tenant(self, key: str | None, context: Context) -> Tenant:
        """A tenant key's tenant; without a key, the verified client certificate's."""
        if key is None and self._authenticate_peer is not None:
            return self._authenticate_peer(context)
        return self._authenticate(key)

    def unary(
        self,
        method: str,
        access: Access,
        request_type: type[Message],
        behavior: Unary,
        response_serializer: Callable[[Any], bytes],
        fair: bool = False,
    ) -> grpc.RpcMethodHandler:
        """``fair``: the call passes the front door (inference calls)."""
        caller_of = self._caller
        cap = self._cap
        observer = self._observer
        shed = self.door  # where a full cap may take a place from another tenant
        door = self.door if fair else None
        unread = self._unread if fair else None
        gather = self.gather if fair else None
        reads = self.reads
        gate = self

        async def handle(messages: object, context: Context) -> Any:
            gate.started += 1
            start = time.perf_counter()
            call = Call(None)
            code = "OK"
            refusal: Exception | None = None
            entered = inside = ended = False
            reading: Reading | None = None
            try:
                if access is Access.OPEN:
                    # A probe: answered at once, its message not read (no field of it
                    # is used), no place under the cap taken, so that without a key
                    # nothing is held and a full server still answers its probes.
                    return await behavior(request_type(), call, context)
                call.tenant = caller_of(access, context)
                if deadline_passed(context):
                    # Over before it was handed over (a flood of calls with short deadlines
                    # fills gRPC's queue with them): counted, nothing taken, read or sent.
                    raise CallEnded
                tenant_id = call.tenant.id if call.tenant is not None else ""
                if unread is not None:
                    unread.check(tenant_id)
                if door is not None and call.tenant is not None:
                    # An inference call takes its place before the door, where it may
                    # wait; one whose message never comes holds its tenant's share.
                    cap.enter(shed, tenant_id)
                    entered = True
                    await door.enter(call.tenant)
                    inside = True
                # An inference call reads under its place; a tenant's other calls are
                # counted, an admin's are not (``reads.py``).
                counted = tenant_pool(tenant_id) if call.tenant is not None and not inside else None
                reading = reads.begin(reads.timeout_s, (counted,) if counted else ())
                raw = await context.read()
                reads.end(reading)
                if not isinstance(raw, bytes):
                    await no_message(context)
                if not entered:
                    # Any other call's (small) message is read first: calls whose
                    # messages never come held every place, and no call could shed them.
                    cap.enter(shed, tenant_id)
                    entered = True
                if gather is not None and (held := gather.wait(context.time_remaining)):
                    await held
                request = parse(request_type, raw)
                request_id = getattr(request, "id", "")
                if request_id:
                    current_request_id.set(request_id[:MAX_LOGGED_ID])
                return await behavior(request, call, context)
            except MandantError as exc:
                code, refusal = status_for(exc).name, exc
                count_refusal(observer, call.tenant.id if call.tenant is not None else "", exc)
            except CallEnded:
                code, ended = REFUSED_BY_GRPC, True
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                if reading is None or not reads.end(reading):
                    code = "CANCELLED"
                    raise
                refusal = reads.refusal(reading)
                code = status_for(refusal).name
            except Exception as exc:
                code, refusal = "INTERNAL", exc
            finally:
                reads.end(reading)
                if entered:
                    cap.leave()
                if inside and door is not None and call.tenant is not None:
                    door.leave(call.tenant)
                code = client_saw(context, code)
                tenant_id = call.tenant.id if call.tenant is not None else ""
                duration_s = time.perf_counter() - start
                observer.request_finished(
                    tenant_id,
                    call.model,
                    code,
                    duration_s,
                    call.version,
                    # a message its client did not finish sending: not on the server's
                    # account (no SLO budget spent), as CANCELLED
                    fair and not isinstance(refusal, MessageTimedOut),
                    call.owner,
                    isinstance(refusal, ServerBusy),
                )
            if ended:  # gRPC answered it: end as a cancelled handler does
                raise asyncio.CancelledError
            # Refused only now, with the call counted and its places given back: grpc's
            # abort sends the status at once, and a client that has seen it may read
            # /metrics or call again straight away.
            if isinstance(refusal, MandantError):
                await abort(context, refusal)
            else:
                await abort_internal(context, method, call, refusal)

        return grpc.stream_unary_rpc_method_handler(
            handle, request_deserializer=None, response_serializer=response_serializer
        )

    def stream(
        self,
        method: str,
        access: Access,
        behavior: Streaming,
        response_serializer: Callable[[Any], bytes],
        admit: Callable[[], None] | None = None,
        initial_metadata: tuple[tuple[str, str], ...] = (),
    ) -> grpc.RpcMethodHandler:
        """A bidirectional stream: the key is checked when it opens (the whole stream
        fails on a bad one, counted as one refused call; so it does when ``admit``
        raises, or its tenant has ``max_tenant_streams`` open), and again by the behaviour
        when it asks (after a reload: a revoked key stops an open stream too); it reads
        raw messages, takes a place under the cap for each while it serves it, and
        reports each message's answer itself. An open stream holds no place of its
        own. ``initial_metadata``: sent once the key is accepted."""
        caller_of = self._caller
        observer = self._observer
        reads = self.reads
        gate = self

        async def handle(requests: object, context: Context) -> None:
            gate.started += 1
            call = Call(None)
            start = time.perf_counter()
            opened = None

            def release() -> None:
                nonlocal opened
                if opened is not None:
                    reads.close_stream(opened)
                    opened = None

            try:
                call.tenant = caller_of(access, context)
                if admit is not None:
                    admit()
                if call.tenant is not None:  # each may hold a message in part
                    opened = reads.open_stream(call.tenant.id)
            except MandantError as exc:  # counted like a unary call refused at the gate
                duration_s = time.perf_counter() - start
                tenant_id = call.tenant.id if call.tenant is not None else ""
                count_refusal(observer, tenant_id, exc)
                observer.request_finished(tenant_id, "", status_for(exc).name, duration_s)
                await abort(context, exc)
                return
            try:
                # The key is accepted: say so at once, so that a client may wait for this
                # before writing (a write racing a refusal makes grpc.aio clients see
                # INTERNAL instead of UNAUTHENTICATED, grpc/grpc#36066).
                await context.send_initial_metadata(initial_metadata)
                await behavior(call, context, lambda: caller_of(access, context), release)
                return
            except MandantError as exc:
                failure: Exception = exc
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if deadline_passed(context):
                    # The call ended under it (its initial metadata, or a write, failed
                    # in gRPC's core): no fault of ours, nothing left to answer.
                    raise asyncio.CancelledError from None
                failure = exc
            finally:
                release()
            # Failed only now, its place given back: gRPC sends the status after the
            # answers already handed to it, and a client that does not read them (a
            # revoked key's, ``stream.py``) would hold the place as long as its connection.
            if isinstance(failure, MandantError):
                await abort(context, failure)
            else:
                await abort_internal(context, method, call, failure)

        return grpc.stream_stream_rpc_method_handler(
            handle, request_deserializer=None, response_serializer=response_serializer
        )

    def forwarded(self, access: Access, forward: Forward) -> grpc.RpcMethodHandler:
        """A front end's handler for an RPC the engine serves (``workers: N``): the key
        is checked, the (small) message read (refused over its size bound, as the
        engine's parse would), and the call takes its place under the
        cap here (as :meth:`unary`'s calls that pass no door), then the bytes go to the
        engine as they came, whose gate checks the key again, answers and counts the
        call. Only the refusals made here are counted here."""
        caller_of = self._caller
        cap = self._cap
        observer = self._observer
        shed = self.door
        reads = self.reads
        gate = self

        async def handle(messages: object, context: Context) -> bytes:
            gate.started += 1
            start = time.perf_counter()
            tenant_id = ""
            refusal: MandantError | None = None  # None: gRPC ended the call (CallEnded)
            try:
                tenant = caller_of(access, context)
                tenant_id = tenant.id if tenant is not None else ""
                pools = (tenant_pool(tenant_id),) if tenant is not None else ()  # an admin's: none
                raw = await reads.read(context, reads.timeout_s, pools)
                if not isinstance(raw, bytes):
                    await no_message(context)
                check_small_message(raw)  # as the engine's parse() would, before it is sent
                cap.enter(shed, tenant_id)
            except MandantError as exc:
                refusal = exc
            except CallEnded:
                pass
            else:
                try:
                    return await forward(raw, context)
                finally:
                    cap.leave()
            if refusal is not None:
                count_refusal(observer, tenant_id, refusal)
            code = status_for(refusal).name if refusal is not None else REFUSED_BY_GRPC
            code = client_saw(context, code)
            observer.request_finished(tenant_id, "", code, time.perf_counter() - start)
            if refusal is None:  # gRPC answered it: end as a cancelled handler does
                raise asyncio.CancelledError
            await abort(context, refusal)
            return b""  # not reached: abort ends the call

        return grpc.stream_unary_rpc_method_handler(handle)


#: Request ids longer than this are refused (``service.py``); logs never carry more.
MAX_LOGGED_ID = 256


async def abort(context: Context, exc: MandantError) -> None:
    if deadline_passed(context):
        # gRPC has ended the call with DEADLINE_EXCEEDED already (or is about to, and
        # cancels this handler): a status sent now fails in gRPC's core, which logs it
        # as an ERROR with a traceback. End as that cancellation does.
        raise asyncio.CancelledError
    trailers = trailers_for(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(status_for(exc), encodable(str(exc)))


async def abort_internal(
    context: Context, method: str, call: Call, error: BaseException | None
) -> None:
    """INTERNAL with a generic message; ``error`` is logged with a request id."""
    request_id = current_request_id.get() or uuid.uuid4().hex[:16]
    logger.error(
        "internal error serving %s (request id %s, tenant %s)",
        method,
        request_id,
        call.tenant.id if call.tenant is not None else "-",
        exc_info=error,
    )
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(request_id=request_id))


def _aborted_code(context: Context) -> str:
    """The status a servicer aborted with (UNKNOWN where grpc does not say)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def count_refusal(observer: Observer, tenant_id: str, refusal: BaseException) -> None:
    """A refusal made at the gate as a rejection of ``tenant_id``'s call, where it is
    one: the server-wide cap's (``count_if_busy``), its messages on their way, its
    streams open (``reads.ReadsFull``)."""
    count_if_busy(observer, tenant_id, refusal)
    if isinstance(refusal, ReadsFull):
        observer.rejected(tenant_id, refusal.reason)
