"""A bare grpc.aio server answering ModelInfer by echoing the first input's bytes:
no authentication, validation, scheduling, model or metrics. The floor that Python
gRPC itself sets, for comparison with Mandant's figures.

    python -m benchmarks._bare_server PORT
"""

from __future__ import annotations

import sys

import grpc
import uvloop

from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc


class Bare(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        tensor = request.inputs[0]
        response.outputs.add(name="OUTPUT0", datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Bare(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("Mandant listening (bare grpc.aio baseline)", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
