"""The gate every REST endpoint passes, as the gRPC gate (``transport/grpc/gateway.py``):

1. the caller's ``Authorization: Bearer <key>`` header, checked **before the body is
   read** (open endpoints take none; statistics also take an admin key); a client
   that sends ``Expect: 100-continue`` is invited to send its body only then
   (:func:`expect_later`), after the key and the body's announced length passed;
2. the body, read whole (at most ``server.max_message_bytes``, or a route's lower
   bound: 413 beyond it) before
   the call takes a place anywhere — as gRPC hands a handler only a message that has
   arrived — so a client that sends its body slowly, or never finishes it, holds its
   connection and nothing else: not the server-wide cap other tenants' calls need;
3. a server-wide cap on calls in progress (429 with ``Retry-After`` beyond it);
4. inference calls take turns by tenant at the front door (``scheduling/door.py``);
5. every exception becomes an HTTP answer through ``status.py``'s table, with a
   ``{"error": ...}`` body; unknown ones a 500 with a generic message and a logged
   request id;
6. each answer is reported once to the :class:`~mandant.events.Observer` with the gRPC
   status name as its code, so REST and gRPC calls share one set of series.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterable

import numpy as np
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from mandant.config import DEFAULT_MESSAGE_READ_TIMEOUT_S
from mandant.context import current_request_id, current_tenant
from mandant.errors import (
    DeadlineExceeded,
    InvalidInput,
    MandantError,
    RateLimited,
    ServerBusy,
    Unauthenticated,
    shown,
)
from mandant.events import NullObserver, Observer
from mandant.scheduling.door import CallCap, FrontDoor, count_if_busy
from mandant.transport.rest.codec import BodyTooLarge
from mandant.transport.rest.status import (
    INTERNAL_MESSAGE,
    code_for,
    error_headers,
    http_status,
)
from mandant.transport.tls import transport_identities
from mandant.transport.unread import UnreadAnswers
from mandant.types import Call, Tenant

logger = logging.getLogger(__name__)

#: The status of a call whose client left before its request arrived (nginx's 499;
#: never sent: there is no connection left to send it on).
CLIENT_CLOSED = 499

Authenticator = Callable[[str | None], Tenant]
AdminAuthenticator = Callable[[str | None], None]
CertificateAuthenticator = Callable[[Iterable[str]], Tenant]
Behavior = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Access(enum.Enum):
    OPEN = "open"  # server metadata and health: no key, like Triton's
    TENANT = "tenant"  # a tenant's API key
    #: a tenant key (the call's tenant is set) or an admin key (its tenant is None)
    TENANT_OR_ADMIN = "tenant_or_admin"
    ADMIN = "admin"  # an admin key only (model control); tenant keys: 401


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


#: Request bodies one caller (a tenant, or every caller without a key together) may
#: have on their way at once, and all callers together, in ``max_message_bytes``: 20
#: slow uploads of 64 MiB held 1.2 GB, with no bound on how many (RESOURCE_EXHAUSTED
#: beyond, with pushback).
BODIES_PER_TENANT = 2
BODIES_IN_ALL = 8
BODY_RETRY_S = 1.0
#: The rejection reason of a call refused for its caller's bodies on their way.
BODIES_REASON = "request_bodies"


#: Where the gate leaves a request's body (``body_of``), and marks one it stopped
#: reading part way.
BODY = web.RequestKey("mandant.body", memoryview)
CUT = web.RequestKey("mandant.body_cut", bool)
#: The client waits for ``100 Continue`` before it sends its body (:func:`expect_later`).
EXPECTING = web.RequestKey("mandant.expecting", bool)


async def expect_later(request: web.Request) -> web.Response | None:
    """The ``expect_handler`` of the routes that read a body: ``Expect: 100-continue``
    is answered when the gate is about to read the body (:meth:`RestGate._read_body`),
    once the key and the announced length passed, not as the request arrives
    (aiohttp's default): a client without a key, or announcing a body over the bound,
    was invited to send it, then read and dropped for up to a second. A request
    refused before the invitation closes its connection after the answer (its body
    was never asked for: one that came anyway would be read as the next request)."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        refused = error_response(417, f"unknown Expect: {shown(expect)}")
        refused.force_close()  # a body may follow: it was not asked for
        return refused
    if request.version == HttpVersion11:
        request[EXPECTING] = True
    return None


_EMPTY = memoryview(b"")


def body_of(request: web.Request) -> memoryview:
    """The body the gate read (empty for a request without one), read-only."""
    body: memoryview = request.get(BODY, _EMPTY)
    return body


async def _read_known(
    request: web.Request, length: int, arrived: Callable[[int], None]
) -> memoryview:
    """A body of ``length`` bytes, read into memory taken for it at once and left
    unwritten until its bytes come (a ``bytearray`` of that length is written with
    zeros first: 70 ms of the event loop for 48 MiB on a small VM); ``arrived`` is
    told the bytes come so far, as they come (the pages they fill)."""
    body = np.empty(length, dtype=np.uint8)
    filled = 0
    while chunk := await request.content.readany():
        end = filled + len(chunk)
        if end > length:  # aiohttp keeps to Content-Length: not expected
            raise UnreadableBody("the request body is longer than its Content-Length")
        arrived(end)
        body[filled:end] = np.frombuffer(chunk, dtype=np.uint8)
        filled = end
    if filled != length:
        raise UnreadableBody("the request body ended before its Content-Length")
    return body.data.toreadonly()


class UnreadableBody(InvalidInput):
    """A request body that cannot be read to its end (it does not decode, or its
    framing is broken): the connection closes after the answer, a client's next
    request on it would be read from the middle of this one."""


class BodyTimedOut(DeadlineExceeded):
    """A request body not all come within the read timeout."""


class BodiesOnTheirWay(RateLimited):
    """A caller's request bodies on their way are at :data:`BODIES_PER_TENANT`."""


class RestGate:
    def __init__(
        self,
        authenticate: Authenticator,
        authenticate_admin: AdminAuthenticator,
        observer: Observer | None = None,
        cap: CallCap | None = None,
        door: FrontDoor | None = None,
        authenticate_certificate: CertificateAuthenticator | None = None,
        max_body: int = 1 << 62,
        unread: UnreadAnswers | None = None,
        read_timeout_s: float = DEFAULT_MESSAGE_READ_TIMEOUT_S,
    ) -> None:
        """``authenticate_certificate``: the tenant of the identities of a request's
        verified client certificate, asked for requests without a key (mTLS only).
        ``max_body``: the largest request body read (the application's
        ``client_max_size``). ``unread``: each tenant's answers not read yet: an
        inference call (``fair``) of a tenant at the bound is refused before its body
        is read or it takes a place. ``read_timeout_s``: a body not all come by then
        is answered 504 and what came of it freed (``server.message_read_timeout_s``,
        as a gRPC call's message)."""
        self._authenticate = authenticate
        self._authenticate_admin = authenticate_admin
        self._authenticate_certificate = authenticate_certificate
        self._observer: Observer = observer or NullObserver()
        self._cap = cap if cap is not None else CallCap(1 << 62)
        self._door = door
        self._max_body = max_body
        self._unread = unread
        self._read_timeout_s = read_timeout_s
        #: Bytes of request bodies come and being read, per tenant id ("" without a
        #: key) and in all: a client that sends bodies slowly, or never finishes them,
        #: holds that memory meanwhile (for ``read_timeout_s`` at most).
        self._reading: dict[str, int] = {}
        self._reading_total = 0
        self._calls = 0  # on this port, for draining
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def calls(self) -> int:
        return self._calls

    async def wait_idle(self) -> None:
        """Until no call is in progress."""
        await self._idle.wait()

    def route(
        self, access: Access, behavior: Behavior, fair: bool = False, max_body: int | None = None
    ) -> Handler:
        """``fair``: the call passes the front door (inference). ``max_body``: a lower
        bound than the server's on this route's request bodies (413 beyond it)."""
        door = self._door if fair else None
        unread = self._unread if fair else None
        limit = self._max_body if max_body is None else min(max_body, self._max_body)
        observer = self._observer

        async def handle(request: web.Request) -> web.StreamResponse:
            response = await answer(request)
            if request.get(EXPECTING):  # refused before its body was asked for
                response.force_close()
            return response

        async def answer(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            call = Call(None)
            code = "OK"
            entered = inside = busy = stalled = False
            try:
                if access is not Access.OPEN:
                    call.tenant = self._caller(access, request)
                if unread is not None and call.tenant is not None:
                    unread.check(call.tenant.id)
                if request.body_exists and request.method == "POST":  # GETs take none
                    tenant_id = call.tenant.id if call.tenant is not None else ""
                    await self._read_body(request, tenant_id, limit)  # behaviours read it then
                if access is Access.OPEN:
                    # A probe takes no place, as on gRPC: a full server still answers
                    # it, and it never takes a waiting tenant's place at the door.
                    return await behavior(request, call)
                self._cap.enter(self._door, call.tenant.id if call.tenant is not None else "")
                self._calls += 1
                self._idle.clear()
                entered = True
                if door is not None and call.tenant is not None:
                    await door.enter(call.tenant)
                    inside = True
                return await behavior(request, call)
            except BodyTooLarge as exc:
                code = code_for(exc)
                too_large = error_response(413, str(exc))
                if CUT in request:
                    too_large.force_close()
                return too_large
            except MandantError as exc:
                code, busy = code_for(exc), isinstance(exc, ServerBusy)
                # a body its client did not finish sending: not on the server's account
                # (no SLO budget spent), as CANCELLED
                stalled = isinstance(exc, BodyTimedOut)
                tenant_id = call.tenant.id if call.tenant is not None else ""
                count_if_busy(observer, tenant_id, exc)
                if isinstance(exc, BodiesOnTheirWay):
                    observer.rejected(tenant_id, BODIES_REASON)
                response = error_response(http_status(code), str(exc), error_headers(exc))
                if isinstance(exc, UnreadableBody) or CUT in request:
                    response.force_close()  # the rest of the body cannot be read past
                return response
            except asyncio.CancelledError:  # the client went away
                code = "CANCELLED"
                raise
            except ConnectionResetError:  # ... while its body was on the way
                code = "CANCELLED"
                return web.Response(status=CLIENT_CLOSED)  # nobody is left to read it
            except Exception:
                code = "INTERNAL"
                return _internal(request, call)
            finally:
                if inside and door is not None and call.tenant is not None:
                    door.leave(call.tenant)
                if entered:
                    self._cap.leave()
                    self._calls -= 1
                    if not self._calls:
                        self._idle.set()
                tenant_id = call.tenant.id if call.tenant is not None else ""
                duration_s = time.perf_counter() - start
                observer.request_finished(
                    tenant_id,
                    call.model,
                    code,
                    duration_s,
                    call.version,
                    fair and not stalled,
                    call.owner,
                    busy,
                )

        return handle

    async def _read_body(self, request: web.Request, tenant_id: str, limit: int) -> None:
        """Read the body into ``request[BODY]``, counting it against the bounds on
        bodies on their way as its bytes arrive (inflated, for a compressed one: up to
        ``limit`` whatever its length), refused part way, the connection closed, once
        they pass them; a body of a known length that could not be held now is
        refused before a byte is read (or asked for: ``Expect``). Counted as they
        come, not as announced: clients that announced eight bodies and sent nothing
        held every tenant's REST bodies refused. A body not all come within
        ``read_timeout_s`` is answered DEADLINE_EXCEEDED. ``limit``: the route's bound
        on a body (at most ``max_body``)."""
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        whole = length is not None and encoding in ("", "identity")
        if whole and length:
            self._check_room(tenant_id, length)
        if request.get(EXPECTING):  # the key and the length passed: now send it
            request[EXPECTING] = False
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's size counts from here
        decoder = None if whole else _decoder(encoding)
        held = 0

        def arrived(size: int) -> None:
            nonlocal held
            if size > held:
                try:
                    self._hold(tenant_id, size - held)
                except MandantError:
                    request[CUT] = True  # the rest of it stays unread
                    raise
                held = size

        try:
            async with asyncio.timeout(self._read_timeout_s):
                if whole:  # filled in place: no copy as it grows, none once read
                    request[BODY] = await _read_known(request, length or 0, arrived)
                else:
                    request[BODY] = await _read_unknown(request, limit, decoder, arrived)
        except TimeoutError:
            request[CUT] = True
            raise BodyTimedOut(
                f"the request message did not arrive within {self._read_timeout_s:g} s"
            ) from None
        except zlib.error:
            raise UnreadableBody(_NOT_ENCODED) from None
        except (RequestPayloadError, HttpProcessingError):  # aiohttp's wrapper, or not
            raise UnreadableBody("the request body is malformed") from None
        finally:
            if held:
                left = self._reading[tenant_id] - held
                if left:
                    self._reading[tenant_id] = left
                else:
                    del self._reading[tenant_id]
                self._reading_total -= held

    def _hold(self, tenant_id: str, size: int) -> None:
        """Count ``size`` more bytes of ``tenant_id``'s bodies on their way, or refuse
        (:meth:`_check_room`)."""
        self._check_room(tenant_id, size)
        self._reading[tenant_id] = self._reading.get(tenant_id, 0) + size
        self._reading_total += size

    def _check_room(self, tenant_id: str, size: int) -> None:
        """Refuse ``size`` more bytes of ``tenant_id``'s bodies on their way if they
        pass the bounds (what it holds already is its own: a body alone is never
        refused)."""
        reading = self._reading.get(tenant_id, 0)
        if reading and reading + size > BODIES_PER_TENANT * self._max_body:
            raise BodiesOnTheirWay(
                f"{reading} bytes of request bodies of this caller are still on their "
                "way; send fewer at once",
                BODY_RETRY_S,
            )
        bound = BODIES_IN_ALL * self._max_body
        if self._reading_total and self._reading_total + size > bound:
            # The bound, not the total: that counts every caller's bytes, to the byte,
            # and told one tenant how much the others were uploading as they did.
            raise ServerBusy(
                f"server busy: request bodies on their way are at the server's bound "
                f"({bound} bytes)",
                retry_after_s=BODY_RETRY_S,
            )

    def _caller(self, access: Access, request: web.Request) -> Tenant | None:
        """The tenant of a tenant key (or, without a key, of a verified client
        certificate); None for an admin key where one is accepted."""
        authorization = request.headers.get("Authorization")
        if access is Access.ADMIN:
            self._authenticate_admin(authorization)
            return None
        try:
            if authorization is None and self._authenticate_certificate is not None:
                identities = transport_identities(request.transport)
                tenant = self._authenticate_certificate(identities)
            else:
                tenant = self._authenticate(authorization)
        except Unauthenticated as refused:
            if access is not Access.TENANT_OR_ADMIN:
                raise
            try:
                self._authenticate_admin(authorization)
            except Unauthenticated:
                raise refused from None
            return None
        current_tenant.set(tenant)
        return tenant


async def _read_unknown(
    request: web.Request,
    limit: int,
    decoder: BodyInflater | None,
    arrived: Callable[[int], None],
) -> memoryview:
    """A body of unknown length, or a compressed one (``decoder``), inflated as it
    arrives, up to ``limit`` bytes (refused beyond it, the connection then closed);
    ``arrived`` is told its size so far as it grows: a compressed one's at each step of
    its inflating (told once a piece of 64 KiB had inflated whole, to 63 MiB, sixteen
    concurrent ones of a tenant held 1.3 GB where two of its bodies' worth are allowed,
    and each was copied twice more in one turn of the event loop)."""
    body = bytearray()

    def grew() -> None:
        if len(body) > limit:
            request[CUT] = True
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        arrived(len(body))

    while chunk := await request.content.readany():
        if decoder is None:
            body += chunk
            grew()
            continue
        # bounded as sent too: past deflate's growth on what does not compress
        if decoder.taken + len(chunk) > limit + limit // 1024 + 65536:
            request[CUT] = True
            raise BodyTooLarge(f"request body is larger than {limit} bytes as sent")
        await decoder.inflate(chunk, body, grew)
    if decoder is not None and not decoder.ended:
        raise UnreadableBody(_NOT_ENCODED)  # cut short
    return memoryview(body).toreadonly()


def _internal(request: web.Request, call: Call) -> web.Response:
    request_id = current_request_id.get() or uuid.uuid4().hex[:16]
    logger.exception(
        "internal error serving REST %s %s (request id %s, tenant %s)",
        request.method,
        request.match_info.route.resource.canonical if request.match_info.route.resource else "-",
        request_id,
        call.tenant.id if call.tenant is not None else "-",
    )
    return error_response(500, INTERNAL_MESSAGE.format(request_id=request_id))


_NOT_ENCODED = "the request body does not decode as its Content-Encoding says"
#: Bytes a compressed body is inflated by in one step: a millisecond or so, after which
#: the event loop serves others (aiohttp inflated whatever had arrived in one go: one
#: request of 61 KiB inflated 60 MiB in one 80 ms turn, and a stream of them, with or
#: without a key, held every tenant's calls for seconds).
INFLATE_STEP = 256 * 1024
#: What a gzip member after the first sixteen must come with, on average: bytes sent
#: or bytes inflated (BGZF's members, the most a tool writes, inflate to 64 KiB each,
#: and of compressible data are some 100 bytes sent; empty ones, and zeros after the
#: last, inflate to nothing).
MEMBER_BYTES = 1024
MEMBER_INFLATED = 32 * 1024
_MANY_MEMBERS = (
    "the request body has more gzip members than its size explains (one per "
    f"{MEMBER_BYTES} bytes sent or {MEMBER_INFLATED} inflated)"
)


class BodyInflater:
    """Inflates a ``gzip`` or ``deflate`` body as it arrives, a step at a time."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._zlib: zlib._Decompress | None = None
        self._head = b""  # a deflate body's first byte, until its second comes
        self._taken = 0  # bytes given to inflate
        self._inflated = 0  # bytes it inflated to
        self._members = 0  # gzip members begun

    @property
    def taken(self) -> int:
        """The bytes given to :meth:`inflate` so far, as sent."""
        return self._taken

    @property
    def ended(self) -> bool:
        """Whether the compressed stream ended whole."""
        return self._zlib is not None and self._zlib.eof

    async def inflate(self, data: bytes, into: bytearray, grew: Callable[[], None]) -> None:
        """``data`` inflated onto the end of ``into``, :data:`INFLATE_STEP` at a time;
        after each step ``grew()`` (which refuses a body grown too large by raising, and
        counts it), then the event loop is free for a turn. zlib.error for data that is
        not the encoding's, or that follows its end (but for gzip's next member, and
        zeros after the last, as gzip takes them); :class:`UnreadableBody` for more gzip
        members than their bytes explain (each costs a new inflater: 20-byte empty ones
        kept a core busy for as long as a chunked body went on)."""
        self._taken += len(data)
        inflater = self._zlib
        if inflater is None:
            data = self._head + data
            if self._encoding == "deflate" and len(data) < 2:
                self._head = data  # its first two bytes tell zlib's wrapper from raw
                return
            inflater = self._zlib = zlib.decompressobj(_wbits(self._encoding, data))
        while data:
            if inflater.eof:  # data after the end of a member
                if self._encoding != "gzip":
                    raise zlib.error("data after the end of the compressed body")
                data = data.lstrip(b"\0")
                if not data:
                    break
                self._members += 1
                explained = self._taken // MEMBER_BYTES + self._inflated // MEMBER_INFLATED
                if self._members > 16 + explained:
                    raise UnreadableBody(_MANY_MEMBERS)
                inflater = self._zlib = zlib.decompressobj(_wbits(self._encoding, data))
            size = len(into)
            into += inflater.decompress(data, INFLATE_STEP)
            self._inflated += len(into) - size
            grew()
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            if data:
                await asyncio.sleep(0)


def _wbits(encoding: str, data: bytes) -> int:
    """zlib's ``wbits`` for a body of ``encoding`` that begins with ``data``."""
    if encoding == "gzip":
        return 16 + zlib.MAX_WBITS
    if data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        return zlib.MAX_WBITS  # deflate in zlib's wrapper (RFC 1950)
    return -zlib.MAX_WBITS  # raw deflate (RFC 1951)


def _decoder(encoding: str) -> BodyInflater | None:
    """How a body of ``encoding`` is inflated (None: it is not); UnreadableBody for an
    encoding this server does not take."""
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "deflate"):
        return BodyInflater(encoding)
    raise UnreadableBody(f"Content-Encoding {encoding[:32]!r} is not supported (gzip, deflate)")
