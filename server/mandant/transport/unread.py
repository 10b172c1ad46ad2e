"""Inference answers handed to a transport that their clients have not read yet, per
tenant, over gRPC and REST.

gRPC holds an answer until its client reads it (HTTP/2 flow control): a unary call's
answer after the call has given back its places, a stream's while its message's place
in the stream's window is taken. aiohttp holds a REST answer the same way, one per
connection, after its call has given back its places. Per stream and per connection
that was bounded (``max_stream_inflight``, ``max_concurrent_streams``), per tenant it
was not: a tenant opening many connections or streams and reading nothing made the
server hold every answer it asked for. :class:`UnreadAnswers` (one per process, for
both ports) counts each tenant's answer bytes from the moment they are handed over until
they are written (a unary call's: until gRPC ends the call, which it does once the
answer is written or the call is given up; a stream's: until its write returns; a REST
answer's: until aiohttp has written it, or failed to). While a tenant's count is at
``server.max_unread_answer_bytes`` its next inference calls and stream messages are
refused RESOURCE_EXHAUSTED (REST: 429), with pushback, before they take a place under
the cap or at the door (a unary call: by the gate, once its key is checked, its message
unread) and before anything is charged. An answer that would take a tenant's count past
twice the bound is refused too, as it is handed over (:meth:`UnreadAnswers.take`,
:data:`ANSWER_SLACK`; the model ran: charged): calls that all passed the first check
while nothing was held yet, or whose answers are far larger than their requests, were
all held (one tenant's 200 messages of 60 bytes, each answered 4 MiB, held 512 MiB
against a bound of 4). So a tenant holds at most twice the bound plus one answer. An
answer alone is never refused (what a tenant holds already is its own); other tenants
are not touched.
gRPC answers are counted by their tensors' bytes as sent (``InferResponse.nbytes``: a
BYTES tensor's elements with their lengths), the message's framing not counted; REST
answers by their body's length (JSON is longer than the tensors it holds).
"""

from __future__ import annotations

from typing import NoReturn

from mandant.errors import RateLimited
from mandant.events import Observer

#: The rejection reason (``mandant_rejections_total``) of a call refused for its
#: tenant's unread answers.
UNREAD_REASON = "unread_answers"
#: The pushback of such a refusal: how soon its clients might have read.
UNREAD_RETRY_S = 1.0
#: An answer is refused as it is handed over where it would take its tenant's count
#: past this many times the bound (a stream's: its bytes): a batch's answers are all
#: handed over in a few loop turns, before any can be written, so a client that reads
#: them at once still holds them all for a moment (at the bound itself, half of one
#: batch of 1 MiB answers to a reading client was refused).
ANSWER_SLACK = 2


class AnswersUnread(RateLimited):
    """A tenant's answers not yet read by its clients are at the server's bound."""


class UnreadAnswers:
    """Each tenant's answer bytes handed to gRPC and not yet written (module doc)."""

    def __init__(self, max_bytes: int, observer: Observer) -> None:
        self._max_bytes = max_bytes
        self._observer = observer
        self._held: dict[str, int] = {}  # tenant id → bytes; absent: none

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def check(self, tenant: str) -> None:
        """Refuse (and count the refusal of) a call of ``tenant`` while its unread
        answers are at the bound."""
        held = self._held.get(tenant)
        if held is not None and held >= self._max_bytes:
            self._refuse(tenant, held, self._max_bytes)

    def check_answer(self, tenant: str, size: int) -> None:
        """Refuse an answer of ``size`` bytes that would take ``tenant``'s unread
        answers past :data:`ANSWER_SLACK` times the bound, unless it holds none (an
        answer alone is never refused, nor one without tensors)."""
        held = self._held.get(tenant)
        cap = ANSWER_SLACK * self._max_bytes
        if held is not None and size and held + size > cap:
            self._refuse(tenant, held, cap)

    def take(self, tenant: str, size: int) -> None:
        """Count an answer of ``size`` bytes for ``tenant`` until :meth:`release`, or
        refuse it as :meth:`check_answer` does (AnswersUnread): it is not held."""
        self.check_answer(tenant, size)
        self.hold(tenant, size)

    def _refuse(self, tenant: str, held: int, bound: int) -> NoReturn:
        self._observer.rejected(tenant, UNREAD_REASON)
        raise AnswersUnread(
            f"{held} bytes of this tenant's answers are not read yet by its clients "
            f"(at most {bound}): read them before calling again",
            UNREAD_RETRY_S,
        )

    def hold(self, tenant: str, size: int) -> None:
        if size:
            self._held[tenant] = self._held.get(tenant, 0) + size

    def release(self, tenant: str, size: int) -> None:
        if size:
            left = self._held[tenant] - size
            if left:
                self._held[tenant] = left
            else:
                del self._held[tenant]
