"""The v2 ``priority`` parameter is bounded: 1 is the highest, 2**31 - 1 the lowest
explicit level; a larger one is refused INVALID_ARGUMENT (it ranked with, or after,
requests that set none)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import yaml

from mandant.config import parse_config
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import DEMO_CONFIG, SERVER_KINDS, auth, serve

METADATA = tuple(auth("acme").items())


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
    config = parse_config(data, str(DEMO_CONFIG))
    server = serve(SERVER_KINDS[0], config, tmp_path_factory.mktemp("priority"))
    try:
        with grpc.insecure_channel(server.target) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        server.stop()


def _echo(priority: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name="echo", parameters={"priority": pb.InferParameter(uint64_param=priority)}
    )
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.zeros((1, 1), np.float32).tobytes())
    return request


@pytest.mark.parametrize("priority", [2**31, 2**63])
def test_a_priority_beyond_the_lowest_level_is_invalid_argument(
    stub: pb_grpc.GRPCInferenceServiceStub, priority: int
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_echo(priority), metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'priority' is an integer from 0 to 2147483647" in err.value.details()


@pytest.mark.parametrize("priority", [0, 1, 2**31 - 1])
def test_priorities_up_to_the_lowest_level_are_served(
    stub: pb_grpc.GRPCInferenceServiceStub, priority: int
) -> None:
    assert stub.ModelInfer(_echo(priority), metadata=METADATA).outputs
