"""Forwards a model's requests (or its batches) to an NVIDIA Triton Inference Server.

* One shared, long-lived gRPC channel per Triton URL (:class:`ChannelPool`), called
  through ``tritonclient.grpc``'s generated KServe v2 stubs: tensors go as raw bytes,
  a request's own bytes passed on without a copy of ours when they are one whole
  buffer, a batch's requests joined once; only the requested outputs are asked for.
* Readiness is polled in the background (ModelReady, then ModelMetadata and
  ModelConfig); a model whose ``inputs``/``outputs`` are not configured takes them from
  Triton's metadata, refreshed on every poll, so a model reloaded on Triton with new
  tensors is followed. Configured ones are checked against it (:mod:`.triton_tensors`):
  a contradiction fails the load, or makes the model unready while it lasts. A poll
  Triton does not answer (UNAVAILABLE, DEADLINE_EXCEEDED: as for the breaker) makes it
  ``server_silent`` until one it answers (RepositoryIndex then says so). A Mandant
  batch goes to Triton in calls of at most the ``max_batch_size`` of Triton's model
  config.
* Answers are checked against the model's declared outputs (datatype, rank, fixed
  dimensions, rows, byte size): one that does not match is the backend's fault,
  Unavailable, logged once per output and problem, never the caller's
  (:mod:`.triton_answers`, which reads Triton's answers and errors).
* Faults: every call to Triton is bounded by ``timeout_s`` (its caller, by its own
  deadline: the call stays at Triton after it, :meth:`TritonBackend._infer`); a connect
  failure (nothing was sent) is retried at most twice with jittered backoff; a
  :class:`CircuitBreaker` refuses calls at once after repeated failures and lets a probe
  through after its reset time. Triton's errors are translated here, at the boundary, by
  one table (:data:`.triton_answers.TRANSLATION`): only transport failures and timeouts
  count against the breaker, which every tenant shares, and a timeout only while Triton
  answered no other call since it was sent: one tenant's slow calls on a Triton that
  serves the others are theirs, while a model that answers nobody (a wedged instance
  behind a Triton whose health checks still answer) opens it. That holds for a call
  given up by its caller too (its deadline shorter than ``timeout_s``, as real clients'
  are, or a cancel), once Triton has answered no call for :data:`SILENT_S` (or twice
  its slowest recent answer, if longer) while it had calls to answer
  (:meth:`TritonBackend._given_up`): not on one call's wait, which a tenant sets by
  its own data and deadline (bursts of its calls, slow for their inputs and given up
  at 0.25 s on a model that runs one call at a time, opened the breaker for everyone).
  Such a call stays charged, as any call whose
  deadline passed while Triton had it: Triton holds its rows and computes them once its
  model moves again; the calls the open breaker refuses are refunded. Triton's own queue
  refusing a call (its UNAVAILABLE "Exceeds maximum queue size", or "Request timeout
  expired" of its queue policy) is that caller's QueueFull, with a pushback, not
  charged, and says nothing to the breaker (a wedged model's full queue refuses at
  once: as answers, those refusals kept its breaker closed). Only a call let through
  since the breaker last opened (a probe) closes it: a late answer of one sent before
  says nothing now. A model
  that fails on one caller's inputs (Triton's INTERNAL) is that caller's error, never
  UNAVAILABLE for all; Triton's error about a batch of several requests (its
  INVALID_ARGUMENT, or its model failing) is :class:`.triton_answers.TritonModelError`,
  which the batcher splits on, so that each request is answered alone and Triton's
  message, which may hold a batch-mate's values, reaches only the request it is about.
* Blame needs Mandant's batching where Triton batches on its own: a Triton model with a
  dynamic (or sequence) batcher, or an ensemble, joins calls that Mandant sent one by
  one, possibly different tenants', and fails all of them when one's input makes the
  model raise. Mandant cannot tell whose input it was, so a model without ``batching:``
  in its entry answers each such call UNAVAILABLE ("failed on a batch its backend
  formed"), blaming and charging nobody; the caller at fault gets that too, never
  INVALID_ARGUMENT. Per-request blame for such a model needs Mandant's batching
  (``batching:`` in its entry) with ``triton.max_in_flight: 1``, so that Triton never
  holds two of Mandant's calls at once and Mandant batches instead: it then splits a
  failed batch until the request at fault fails alone. Or turn Triton's batcher off.
* Fairness needs the calls to wait in Mandant: Triton serves the calls it holds first
  come first served, so every call Mandant sends beyond what Triton runs at once waits
  in Triton's queue, where one tenant's flood sits ahead of another's call.
  ``max_in_flight: auto`` (the default) sends at most twice what Triton's model config
  says it runs at once (:func:`runs_at_once`: its instances, times the calls its
  batcher joins into one execution), so Triton has the next calls at hand as it
  finishes, and the rest take turns in the tenants' queues; a config that does not say
  (an ensemble, a KServe v2 server without ModelConfig) gets :data:`UNKNOWN_IN_FLIGHT`.
  Read at every poll: the model's schedulers follow a change of Triton's model. A call
  whose caller leaves (a cancel, its deadline) is answered at once but stays at
  Triton, which runs it anyway, and keeps its place until Triton answers it
  (:meth:`TritonBackend._infer`): calls sent in its place wait their turn in Mandant.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from mandant.backends.channels import ChannelPool
from mandant.backends.circuit import CallOutcome, CircuitBreaker, CircuitState
from mandant.backends.triton_answers import TritonAnswers, translate
from mandant.backends.triton_tensors import (
    TensorMismatch,
    mismatches,
    tensor_spec,
    unknown_datatypes,
)
from mandant.config import ModelSpec, TritonModelConfig
from mandant.errors import DeadlineExceeded, DeadlinePassedWhileRunning, Unavailable
from mandant.types import datatype_of
from mandant.wire import join_bytes

logger = logging.getLogger(__name__)

#: Retries of a call that never reached Triton (connection refused / not connected).
CONNECT_RETRIES = 2
RETRY_BACKOFF_S = 0.05
#: Timeout of one health poll RPC.
PROBE_TIMEOUT_S = 1.0
#: Timeout of the first poll's RPCs, when the model starts: they connect the channel
#: too, which on a busy host took longer than :data:`PROBE_TIMEOUT_S` (the model then
#: started unready, and a load through the control API failed "not ready").
FIRST_PROBE_TIMEOUT_S = 5.0
#: A call its caller gave up on (deadline, cancel) counts against the breaker where
#: Triton has answered no call for this long while it had calls to answer (since the
#: earliest sent after its last answer), or for STALL_FACTOR times its slowest recent
#: answer if longer: a model answering nobody, not one tenant's calls slower than its
#: own deadlines (a tenant that keeps Triton busy this long with calls it gives up has
#: kept every other call waiting as long anyway).
SILENT_S = 5.0
STALL_FACTOR = 2.0
#: Triton's slowest recent answer is a peak that each answer lowers by this factor.
SLOWEST_DECAY = 0.9
#: ``max_in_flight: auto``: calls in flight per call Triton runs at once (one running,
#: the next at hand when it ends), and where Triton's model config does not say.
AUTO_IN_FLIGHT_FACTOR = 2
UNKNOWN_IN_FLIGHT = 256
_CONNECT_FAILURE_MARKERS = ("failed to connect", "connection refused", "no route to host")
#: A health poll that failed with these got no answer from Triton (``server_silent``).
_SILENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


#: A call to Triton, running on its own (its caller may leave).
_Call = asyncio.Future[pb.ModelInferResponse]


class TritonBackend:
    """One Mandant model version served by a model on a Triton server."""

    def __init__(
        self,
        spec: ModelSpec,
        channels: ChannelPool,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if spec.triton is None:
            raise ValueError(f"model {spec.name!r} has no 'triton' section")
        self._spec = spec
        self._triton: TritonModelConfig = spec.triton
        self._channels = channels
        self._breaker = breaker or CircuitBreaker(clock=clock)
        self._clock = clock
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._model_ready = False
        #: Triton did not answer the last health poll (:meth:`refresh`).
        self._silent = False
        self._platform = "triton"
        self._discover = not (spec.inputs and spec.outputs)
        #: Triton's model config's ``max_batch_size`` (0: none, or not known).
        self._triton_max_batch = 0
        #: ``max_in_flight: auto``: from Triton's model config, at each poll.
        self._auto_in_flight = UNKNOWN_IN_FLIGHT
        #: Triton may join calls into batches of its own (a dynamic or sequence batcher,
        #: or an ensemble, whose steps may have one): a failure is then maybe another's.
        self._triton_batches = False
        #: When Triton last answered a call (a health poll does not count: a wedged
        #: model's server still answers those), monotonic.
        self._answered_at = -float("inf")
        #: Seconds Triton took for its slowest recent answer (a decaying peak).
        self._slowest_s = 0.0
        #: Calls sent to Triton and not ended; when the earliest of them sent since its
        #: last answer was sent: how long it has had calls to answer and answered none
        #: (``_unanswered``), monotonic.
        self._asking = 0
        self._asked_at = -float("inf")
        #: Calls at Triton (its places, :meth:`_place`), and the calls waiting for one.
        self._at_triton = 0
        self._awaiting_place: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Calls counted against the breaker as their callers left (:meth:`_given_up`).
        self._counted: set[_Call] = set()
        #: How the configured tensors contradict Triton's model's (None: they agree,
        #: or are Triton's own): the model is not ready while they do.
        self._contradiction: str | None = None
        self._answers = TritonAnswers(spec.name, spec.triton)

    # -- the Backend protocol ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self._stub is not None
            and self._model_ready
            and self._contradiction is None
            and bool(self._spec.inputs and self._spec.outputs)
        )

    @property
    def platform(self) -> str:
        return self._platform

    @property
    def circuit_open(self) -> bool:
        """Its breaker refuses calls now (``mandant_backend_circuit_open``): open, or
        half open (a probe may go or is on its way; the other calls are refused).
        Open alone, the gauge read 0 two seconds after each failure, while every call
        was still refused behind a probe that hung."""
        return self._breaker.state is not CircuitState.CLOSED

    @property
    def server_silent(self) -> bool:
        """Triton did not answer the last health poll (``HasServer``)."""
        return self._silent

    @property
    def max_concurrency(self) -> int:
        """``max_in_flight``; ``auto``: from Triton's model config (module doc)."""
        configured = self._triton.max_in_flight
        return self._auto_in_flight if configured == "auto" else configured

    @property
    def spec(self) -> ModelSpec:
        """The configured spec, with the tensors Triton reported where none were set."""
        return self._spec

    @property
    def triton_max_batch_size(self) -> int:
        """``max_batch_size`` of Triton's model config (0: it does not batch, or unknown)."""
        return self._triton_max_batch

    async def start(self) -> None:
        if self._stub is not None:
            raise RuntimeError(f"model {self._spec.name!r} is already started")
        channel = self._channels.acquire(self._triton.url, self._triton.tls)
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await self.refresh(FIRST_PROBE_TIMEOUT_S)
        if self._contradiction is not None:
            raise TensorMismatch(self._contradiction)
        if not self.ready:
            logger.warning(
                "model %s: Triton model %r at %s is not ready yet; serving once it is",
                self._spec.name,
                self._triton.model,
                self._triton.url,
            )
        self._watcher = asyncio.create_task(self._watch(), name=f"triton-health-{self._spec.name}")

    async def aclose(self) -> None:
        self._answers.close()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if self._stub is not None:
            self._stub = None
            self._model_ready = False
            await self._channels.release(self._triton.url, self._triton.tls)

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
        hold_on_cancel: bool = False,
    ) -> dict[str, np.ndarray]:
        """One Triton call for one request's ``inputs``, asking for ``outputs`` only.
        Cancelled, or past ``deadline``, its caller is answered at once and the call
        stays at Triton until it answers (:meth:`_infer`): nothing for the caller to
        hold (``hold_on_cancel``)."""
        return await self._infer([inputs], outputs, deadline, alone=True)

    async def infer_batch(
        self,
        parts: Sequence[Mapping[str, np.ndarray]],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The batcher's call for several requests (``BatchInfer``): their rows joined
        along dimension 0, in calls of at most Triton's ``max_batch_size`` rows made in
        turn (one call where Triton's config does not say). Triton's error about the
        inputs is :class:`TritonModelError`: the batcher splits the batch on it."""
        chunks = self._chunks(parts)
        answers = [await self._infer(chunk, outputs, deadline, alone=False) for chunk in chunks]
        if len(answers) == 1:
            return answers[0]
        return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}

    async def _infer(
        self,
        parts: Sequence[Mapping[str, np.ndarray]],
        outputs: Sequence[str] | None,
        deadline: float | None,
        alone: bool,
    ) -> dict[str, np.ndarray]:
        """One Triton call for ``parts`` (one request's inputs, or several joined).

        A call Triton has is not taken back: cancelling its RPC does not stop Triton
        from running it (nor from queueing it first). So it is sent with ``timeout_s``
        as its timeout, whatever its caller's ``deadline``, and its caller, cancelled
        or past its deadline, is answered at once while the call keeps one of the
        model's places at Triton (``max_in_flight``) until Triton answers it. Freed at
        the caller's deadline, places let one tenant's calls given up at 0.3 s pile up
        in Triton's queue without bound (nine held there, another tenant's next call
        failed after ``timeout_s``), and their outcomes were never seen."""
        stub = self._stub
        if stub is None:
            raise Unavailable(f"model '{self._spec.name}' is not loaded")
        if not outputs:
            outputs = tuple(t.name for t in self._spec.outputs)
        request = self._request(parts, outputs)
        rows: int | None = _rows(parts)
        if alone and self._spec.batching is None and not self._triton_max_batch:
            rows = None  # no batch dimension known: the answer's rows are the model's
        if not self._breaker.allow():
            raise Unavailable(f"model '{self._spec.name}' is unavailable (backend is failing)")
        generation = self._breaker.generation  # outcomes of older calls cannot close it
        try:
            await self._place(deadline)
            if deadline is not None and deadline <= self._clock():
                self._leave_place()
                raise DeadlineExceeded("deadline exceeded before the backend answered")
        except BaseException:
            self._breaker.record_abandoned(generation)  # a half-open probe's turn back
            raise
        sent = self._clock()
        if not self._asking or self._asked_at <= self._answered_at:
            self._asked_at = sent  # the first call Triton has to answer since it last did
        self._asking += 1
        call = asyncio.ensure_future(self._call(stub, request, sent + self._triton.timeout_s))
        call.add_done_callback(lambda done: self._ended(done, sent, generation))
        try:
            await asyncio.wait((call,), timeout=None if deadline is None else deadline - sent)
        except asyncio.CancelledError:  # its caller left: the call stays at Triton
            self._given_up(call, sent, generation)
            raise
        if not call.done():
            self._given_up(call, sent, generation)
            raise DeadlinePassedWhileRunning("deadline exceeded while the backend was running")
        if call.cancelled():  # the channel closed under the call: its model unloaded, the
            # server stopping. Answer it rather than vanish.
            raise Unavailable(f"model '{self._spec.name}' was unloaded")
        try:
            response = call.result()
        except grpc.aio.AioRpcError as exc:
            fault, _ = translate(exc.code(), False, exc.details() or "")
            raise self._answers.error(
                exc, fault, False, alone, joined_by_triton=self._joined_by_triton
            ) from exc
        return self._answers.outputs(response, outputs, self._spec.outputs, rows)

    def _given_up(self, call: _Call, sent: float, generation: int) -> None:
        """The caller of ``call`` (sent at ``sent``) left while Triton has it. Where
        Triton has answered no call since, and has been silent :data:`SILENT_S` (or
        twice its slowest recent answer) while it had calls to answer, that counts
        against the breaker now, not ``timeout_s`` later: a model answering nobody (a
        wedged instance behind a Triton whose health checks still answer). Not on one
        call's wait, which a tenant sets by its own data and deadline."""
        if call.done():  # ended in the same turn: :meth:`_ended` told the breaker
            return
        silent_s = self._clock() - self._asked_at
        stall_s = max(SILENT_S, STALL_FACTOR * self._slowest_s)
        if self._answered_at <= sent and silent_s >= stall_s:
            self._counted.add(call)
            self._tell(CallOutcome.FAILED, generation)

    def _ended(self, call: _Call, sent: float, generation: int) -> None:
        """Triton is done with ``call`` (sent at ``sent``), its caller there or not:
        its place goes to the next call, and what it says of Triton to the breaker
        (a failure counted already as its caller left, once)."""
        self._asking -= 1
        self._leave_place()
        counted = call in self._counted
        self._counted.discard(call)
        exc = None if call.cancelled() else call.exception()
        if call.cancelled():  # the channel closed under it: says nothing of Triton
            outcome = CallOutcome.ABANDONED
        elif exc is None:
            self._answered(sent)
            outcome = CallOutcome.ANSWERED
        elif isinstance(exc, grpc.aio.AioRpcError):
            _, outcome = translate(exc.code(), False, exc.details() or "")
            if outcome is CallOutcome.ANSWERED:
                self._answered(sent)
            elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                outcome = self._unanswered(sent)
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # unloaded on Triton's side: the
                # next calls are refused here until its readiness poll finds it again
                self._set_ready(False, "Triton has no such model")
        else:  # DeadlineExceeded: ``timeout_s`` passed before a retry could be sent
            outcome = CallOutcome.ABANDONED
        if not counted or outcome is CallOutcome.ANSWERED:
            self._tell(outcome, generation)

    def _tell(self, outcome: CallOutcome, generation: int) -> None:
        """Tell the breaker a call's ``outcome``; say so in the log when that opens it
        (every tenant's calls of the model are then refused at once) or closes it."""
        before = self._breaker.state
        self._breaker.record(outcome, generation)
        after = self._breaker.state
        if after is CircuitState.OPEN and before is CircuitState.CLOSED:
            logger.warning(
                "model %s: Triton at %s answered none of its last calls (unreachable, or "
                "silent past their time): its calls are refused UNAVAILABLE, and one is "
                "let through every %.1f s until Triton answers it",
                self._spec.name,
                self._triton.url,
                self._breaker.reset_timeout_s,
            )
        elif after is CircuitState.CLOSED and before is not CircuitState.CLOSED:
            logger.info("model %s: Triton at %s answers again", self._spec.name, self._triton.url)

    async def _place(self, deadline: float | None) -> None:
        """Take one of the model's places at Triton (``max_in_flight``), waiting in turn
        where calls whose callers left hold them all; no longer than ``deadline``. The
        schedulers send no more calls than places, so at most as many wait here as the
        callers left, in the order the schedulers sent them."""
        if self._at_triton < max(1, self.max_concurrency) and not self._awaiting_place:
            self._at_triton += 1
            return
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._awaiting_place.append(place)
        try:
            async with asyncio.timeout(None if deadline is None else deadline - self._clock()):
                await place
        except BaseException as exc:
            if place.done() and not place.cancelled():
                self._leave_place()  # handed a place just as it gave up: pass it on
            elif place in self._awaiting_place:  # (a place leaving may have dropped it)
                self._awaiting_place.remove(place)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("deadline exceeded while queued") from None
            raise

    def _leave_place(self) -> None:
        self._at_triton -= 1
        while self._awaiting_place and self._at_triton < max(1, self.max_concurrency):
            place = self._awaiting_place.popleft()
            if not place.done():
                self._at_triton += 1
                place.set_result(None)

    @property
    def _joined_by_triton(self) -> bool:
        """Triton may have run a call in one batch with other calls of Mandant's: it
        batches on its own, and Mandant sends it several calls at once."""
        return self._triton_batches and self.max_concurrency > 1

    def _answered(self, sent: float) -> None:
        """Triton answered a call sent at ``sent`` (an error answer too)."""
        now = self._clock()
        self._answered_at = now
        self._slowest_s = max(now - sent, self._slowest_s * SLOWEST_DECAY)

    def _unanswered(self, sent: float) -> CallOutcome:
        """What a call sent at ``sent`` that Triton did not answer within ``timeout_s``
        says of Triton: its own slowness (ABANDONED) where Triton answered another
        call since; else FAILED, Triton answered nobody."""
        return CallOutcome.ABANDONED if self._answered_at > sent else CallOutcome.FAILED

    def _chunks(
        self, parts: Sequence[Mapping[str, np.ndarray]]
    ) -> list[Sequence[Mapping[str, np.ndarray]]]:
        """``parts`` in runs of at most Triton's ``max_batch_size`` rows (a request
        larger than that alone: Triton refuses it, and the batcher finds it)."""
        limit = self._triton_max_batch
        if limit <= 0 or _rows(parts) <= limit:
            return [parts]
        chunks: list[Sequence[Mapping[str, np.ndarray]]] = []
        chunk: list[Mapping[str, np.ndarray]] = []
        rows = 0
        for part in parts:
            count = _rows([part])
            if chunk and rows + count > limit:
                chunks.append(chunk)
                chunk, rows = [], 0
            chunk.append(part)
            rows += count
        chunks.append(chunk)
        return chunks

    # -- calls ------------------------------------------------------------------------

    async def _call(
        self, stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, deadline: float
    ) -> pb.ModelInferResponse:
        attempt = 0
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineExceeded("deadline exceeded before the backend answered")
            try:
                response: pb.ModelInferResponse = await stub.ModelInfer(request, timeout=remaining)
                return response
            except grpc.aio.AioRpcError as exc:
                backoff = random.uniform(0, RETRY_BACKOFF_S * 2**attempt)
                retry = attempt < CONNECT_RETRIES and _never_sent(exc)
                if not retry or self._clock() + backoff >= deadline:
                    raise
            attempt += 1
            await asyncio.sleep(backoff)

    def _request(
        self, parts: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str]
    ) -> pb.ModelInferRequest:
        """The call for ``parts`` joined along dimension 0 (one copy; none for a
        request whose tensors are whole buffers of its own)."""
        tensors, raw = [], []
        for name, array in parts[0].items():
            shape = (_rows(parts), *array.shape[1:]) if len(parts) > 1 else array.shape
            tensors.append(
                pb.ModelInferRequest.InferInputTensor(
                    name=name, datatype=datatype_of(array), shape=shape
                )
            )
            if len(parts) == 1:
                raw.append(_raw_bytes(array))
            else:
                raw.append(b"".join([_raw_bytes(part[name]) for part in parts]))
        return pb.ModelInferRequest(
            model_name=self._triton.model,
            model_version=self._triton.version,
            inputs=tensors,
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
            raw_input_contents=raw,
        )

    # -- health -----------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._triton.health_interval_s)
            await self.refresh()

    async def refresh(self, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        """Poll Triton once: model readiness, then (when ready) its metadata and config,
        each RPC within ``timeout_s``."""
        stub = self._stub
        if stub is None:
            return
        model, version = self._triton.model, self._triton.version
        try:
            ready = await stub.ModelReady(
                pb.ModelReadyRequest(name=model, version=version), timeout=timeout_s
            )
            metadata = (
                await stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=model, version=version), timeout=timeout_s
                )
                if ready.ready
                else None
            )
        except grpc.aio.AioRpcError as exc:
            self._silent = exc.code() in _SILENT_CODES
            self._set_ready(False, f"{exc.code().name}: {exc.details()}")
            return
        self._silent = False
        if metadata is not None:
            self._platform = metadata.platform or "triton"
            if self._discover:
                self._adopt(metadata)
            else:
                self._check(metadata)
            await self._read_config(stub, timeout_s)
        self._set_ready(ready.ready, "Triton reports the model not ready")

    async def _read_config(self, stub: pb_grpc.GRPCInferenceServiceStub, timeout_s: float) -> None:
        """Take ``max_batch_size`` and what it runs at once from Triton's model config
        (neither where the server does not serve ModelConfig, as some KServe v2 servers
        do not; a poll that fails otherwise, a timeout say, keeps what the last one
        read)."""
        model, version = self._triton.model, self._triton.version
        batching = self._spec.batching
        try:
            reply = await stub.ModelConfig(
                pb.ModelConfigRequest(name=model, version=version), timeout=timeout_s
            )
            limit = max(0, int(reply.config.max_batch_size))
            joins = reply.config.platform == "ensemble" or any(
                reply.config.HasField(scheduler)
                for scheduler in ("dynamic_batching", "sequence_batching")
            )
            at_once = runs_at_once(reply.config, batching.max_batch_size if batching else 1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return
            limit, joins, at_once = 0, False, None
        self._triton_batches = limit > 0 and joins
        self._auto_in_flight = (
            UNKNOWN_IN_FLIGHT if at_once is None else AUTO_IN_FLIGHT_FACTOR * at_once
        )
        if limit != self._triton_max_batch and batching and 0 < limit < batching.max_batch_size:
            logger.info(
                "model %s: batches of up to %d rows go to Triton's model %r in calls of "
                "at most %d rows (its max_batch_size)",
                self._spec.name,
                batching.max_batch_size,
                model,
                limit,
            )
        self._triton_max_batch = limit

    def _check(self, metadata: pb.ModelMetadataResponse) -> None:
        """Compare the configured tensors with Triton's model's."""
        spec = self._spec
        self._contradict(mismatches(self._triton.model, metadata, spec.inputs, spec.outputs))

    def _contradict(self, problems: list[str]) -> None:
        """The model's tensors and Triton's contradict (``problems``; none: they agree):
        logged at ERROR when they start to, at INFO when they agree again."""
        contradiction = "; ".join(problems) or None
        if contradiction != self._contradiction:
            if contradiction is not None:
                logger.error(
                    "model %s: its tensors contradict Triton's at %s (check "
                    "models[].inputs/outputs): %s",
                    self._spec.name,
                    self._triton.url,
                    contradiction,
                )
            else:
                logger.info("model %s: its tensors agree with Triton's model now", self._spec.name)
        self._contradiction = contradiction

    def _adopt(self, metadata: pb.ModelMetadataResponse) -> None:
        """Take Triton's model's tensors as the model's; one of a datatype Mandant does
        not carry (BF16) is a contradiction instead: the model is not served, as if the
        configuration named it (a call failed INTERNAL where the datatype was looked
        up, and ModelMetadata published it)."""
        unknown = unknown_datatypes(self._triton.model, metadata)
        self._contradict(unknown)
        if unknown:
            return
        inputs = tuple(tensor_spec(t) for t in metadata.inputs)
        outputs = tuple(tensor_spec(t) for t in metadata.outputs)
        if (inputs, outputs) != (self._spec.inputs, self._spec.outputs):
            if self._spec.inputs:
                logger.info("model %s: Triton's model changed its tensors", self._spec.name)
            self._spec = self._spec.model_copy(update={"inputs": inputs, "outputs": outputs})

    def _set_ready(self, ready: bool, reason: str) -> None:
        if ready != self._model_ready:
            if ready:
                logger.info("model %s: Triton at %s is ready", self._spec.name, self._triton.url)
            else:
                logger.warning(
                    "model %s: Triton at %s is not ready (%s)",
                    self._spec.name,
                    self._triton.url,
                    reason,
                )
        self._model_ready = ready


def _never_sent(exc: grpc.aio.AioRpcError) -> bool:
    """A call that failed to connect never reached Triton: safe to send again."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return any(marker in details for marker in _CONNECT_FAILURE_MARKERS)


def _rows(parts: Sequence[Mapping[str, np.ndarray]]) -> int:
    """Rows of ``parts`` together: dimension 0 of their (first) input."""
    return sum(int(next(iter(part.values())).shape[0]) if part else 0 for part in parts)


def _raw_bytes(array: np.ndarray) -> bytes:
    """The tensor's wire bytes; the request's own buffer when ``array`` views all of it."""
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return join_bytes(array)
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if (
        isinstance(base, bytes)
        and array.flags.c_contiguous
        and array.nbytes == len(base)
        and array.dtype.byteorder in "<|="
    ):
        return base
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


def runs_at_once(config: pb.ModelConfig, rows_per_call: int) -> int | None:
    """How many of Mandant's calls of ``rows_per_call`` rows Triton's model runs at
    once: its instances (each group's count, on each of its GPUs), times the calls its
    dynamic or sequence batcher joins into one execution (its ``max_batch_size`` over
    the rows of a call) where it has one. None where the config does not say: an
    ensemble (its steps' models run it), or no instance groups."""
    if config.platform == "ensemble" or not config.instance_group:
        return None
    instances = sum(
        max(1, int(group.count)) * max(1, len(group.gpus)) for group in config.instance_group
    )
    joins = config.HasField("dynamic_batching") or config.HasField("sequence_batching")
    joined = int(config.max_batch_size) // max(1, rows_per_call) if joins else 1
    return instances * max(1, joined)
