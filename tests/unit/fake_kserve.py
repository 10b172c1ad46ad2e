"""A test double of a KServe v2 server for the light client's unit tests: a real
grpc.aio server on loopback port 0 whose servicer answers ``ModelInfer`` and
``ModelStreamInfer`` the way Mandant's contract says, with one magic model name per
outcome, including those a real server cannot be made to produce on demand (INTERNAL,
UNAVAILABLE, a server that goes away mid-stream).

Stream contract (DESIGN.md, "Streaming"): the key is checked when the stream opens
(UNAUTHENTICATED ends the stream); each message gets one ``ModelStreamInferResponse``,
on error with ``error_message`` and ``infer_response`` carrying the request's id, model
and ``parameters["status_code"]`` (+ ``retry_pushback_ms`` for RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

API_KEY = "test-key"
BIG = 64 * 1024 * 1024


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str
    pushback_ms: int | None = None


#: Model name -> how the server fails it, on either path.
FAILURES: dict[str, Failure] = {
    "missing": Failure(grpc.StatusCode.NOT_FOUND, "model 'missing' not found"),
    "bad": Failure(grpc.StatusCode.INVALID_ARGUMENT, "input 'X': expected shape [-1, 4]"),
    "never": Failure(grpc.StatusCode.FAILED_PRECONDITION, "more rows than a day's quota"),
    "limited": Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded", 1500),
    "quota": Failure(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "quota rows_per_day=10 exceeded for tenant t", 60000
    ),
    "late": Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued"),
    "down": Failure(grpc.StatusCode.UNAVAILABLE, "backend down"),
    "broken": Failure(grpc.StatusCode.INTERNAL, "internal error (request id 42)"),
}
#: Stream only: an error_message with no status_code parameter (what Triton sends).
PLAIN_ERROR = "plain"
#: Never answered.
SLOW = "slow"
#: Stream only: answers are held until ``hold`` of them wait, then sent in reverse.
HELD = "held"
#: Stream only: the server ends the whole stream with UNAVAILABLE.
DIE = "die"


def echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """Every input back as an output of the same name; ``typed`` answers typed contents."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    if request.model_name == "typed":
        out = response.outputs.add(name="OUT", datatype="INT32", shape=[2])
        out.contents.int_contents.extend([7, -7])
        return response
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.extend(request.raw_input_contents)
    return response


def stream_error(request: pb.ModelInferRequest, failure: Failure) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version
    )
    response.parameters["status_code"].string_param = failure.code.name
    if failure.pushback_ms is not None:
        response.parameters["retry_pushback_ms"].int64_param = failure.pushback_ms
    return pb.ModelStreamInferResponse(error_message=failure.message, infer_response=response)


@dataclass
class FakeInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    hold: int = 1
    #: Send the stream's initial metadata once the key is accepted (Mandant's contract);
    #: False: with the first answer, as Triton and a plain grpc.aio servicer do.
    early_metadata: bool = True
    seen_metadata: list[dict[str, str]] = field(default_factory=list)
    seen_requests: list[pb.ModelInferRequest] = field(default_factory=list)
    streams_opened: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _held: list[pb.ModelInferRequest] = field(default_factory=list)
    _arrivals: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until_in_flight(self, count: int) -> None:
        """Wait until ``count`` stream messages are unanswered."""
        async with self._arrivals:
            await self._arrivals.wait_for(lambda: self.in_flight >= count)

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.seen_metadata.append(metadata)
        if metadata.get("authorization") != f"Bearer {API_KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        await self._authenticate(context)
        self.seen_requests.append(request)
        failure = FAILURES.get(request.model_name)
        if failure is not None:
            trailers: tuple[tuple[str, str], ...] = ()
            if failure.pushback_ms is not None:
                trailers = (("grpc-retry-pushback-ms", str(failure.pushback_ms)),)
            await context.abort(failure.code, failure.message, trailing_metadata=trailers)
        if request.model_name == SLOW:
            await asyncio.sleep(60)
        return echo(request)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self.streams_opened += 1
        await self._authenticate(context)
        if self.early_metadata:
            await context.send_initial_metadata(())  # the key is accepted (Mandant's contract)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._take(request_iterator, answers))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
        finally:
            reader.cancel()

    async def _take(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None],
    ) -> None:
        async for request in request_iterator:
            self.seen_requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            async with self._arrivals:
                self._arrivals.notify_all()
            name = request.model_name
            if name == DIE:
                answers.put_nowait(None)
                return
            if name == SLOW:
                continue
            if name == HELD:
                self._held.append(request)
                if len(self._held) < self.hold:
                    continue
                batch, self._held = self._held[::-1], []
            else:
                batch = [request]
            for one in batch:
                self.in_flight -= 1
                answers.put_nowait(self._answer(one))

    def _answer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        failure = FAILURES.get(request.model_name)
        if failure is not None:
            return stream_error(request, failure)
        if request.model_name == PLAIN_ERROR:
            return pb.ModelStreamInferResponse(
                error_message="something failed",
                infer_response=pb.ModelInferResponse(id=request.id),
            )
        return pb.ModelStreamInferResponse(infer_response=echo(request))


@dataclass
class FakeServer:
    target: str
    servicer: FakeInferenceServicer


@asynccontextmanager
async def serve_fake(hold: int = 1, early_metadata: bool = True) -> AsyncIterator[FakeServer]:
    """The fake on a free loopback port, with 64 MiB message limits like Mandant's."""
    options = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
    server = grpc.aio.server(options=options)
    servicer = FakeInferenceServicer(hold=hold, early_metadata=early_metadata)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield FakeServer(target=f"127.0.0.1:{port}", servicer=servicer)
    finally:
        await server.stop(0)
