"""A bare grpc.aio server answering ModelInfer and ModelStreamInfer by echoing the first
input's bytes with the request's id: no authentication, validation, scheduling, model
or metrics. The floor that Python gRPC itself sets, for comparison with Mandant's
figures.

The stream follows Triton's contract: every ``ModelInferRequest`` read is answered by
one ``ModelStreamInferResponse`` carrying its ``infer_response`` (same ``id``), as soon
as it is read; a request without inputs gets an ``error_message`` and the stream goes on.

    python -m benchmarks._bare_server PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import grpc
import uvloop

# Triton's own generated stubs: the whole service, ModelStreamInfer included.
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc


def echo(request: Any, messages: ModuleType = pb) -> Any:
    """The answer to ``request``: its first input as the output, with its id, built
    from ``messages``' ModelInferResponse (Triton's stubs, or another set's)."""
    response = messages.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id
    )
    tensor = request.inputs[0]
    response.outputs.add(name="OUTPUT0", datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.append(request.raw_input_contents[0])
    return response


class Bare(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return echo(request)

    async def ModelStreamInfer(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in requests:
            if not request.inputs or not request.raw_input_contents:
                yield pb.ModelStreamInferResponse(error_message="expected one raw input")
                continue
            yield pb.ModelStreamInferResponse(infer_response=echo(request))


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("Mandant listening (bare grpc.aio baseline)", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
