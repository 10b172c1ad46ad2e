"""Messages a gRPC client compressed: refused UNIMPLEMENTED unless
``server.grpc_compression`` is on. gRPC inflates a message whole with the event loop
waiting, so one tenant's 60 KiB of gzip (60 MiB inflated) held every tenant's calls
for about a second (``python -m benchmarks.isolation --attacks compressed``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from mandant.config import parse_config
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import DEMO_CONFIG, SERVER_KINDS, auth, serving

METADATA = tuple(auth("acme").items())


def _echo() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize("accepted", [False, True], ids=["default", "grpc_compression"])
def test_compressed_messages_are_refused_unless_the_server_accepts_them(
    tmp_path: Path, kind: str, accepted: bool
) -> None:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
    if accepted:
        data["server"]["grpc_compression"] = True
    config = parse_config(data, str(DEMO_CONFIG))
    with (
        serving(kind, config, tmp_path) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        plain = stub.ModelInfer(_echo(), metadata=METADATA, timeout=30)
        assert np.frombuffer(plain.raw_output_contents[0], np.float32).tolist() == [0, 1, 2, 3]
        for algorithm, name in (
            (grpc.Compression.Gzip, "gzip"),
            (grpc.Compression.Deflate, "deflate"),
        ):
            if accepted:
                answer = stub.ModelInfer(
                    _echo(), metadata=METADATA, timeout=30, compression=algorithm
                )
                assert answer.raw_output_contents == plain.raw_output_contents
                continue
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_echo(), metadata=METADATA, timeout=30, compression=algorithm)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert f"Compression algorithm '{name}' is disabled" in refused.value.details()
        # and the server goes on serving
        assert stub.ModelInfer(_echo(), metadata=METADATA, timeout=30).raw_output_contents
