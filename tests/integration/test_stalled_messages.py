"""A call whose client sends part of its message and then nothing ends
DEADLINE_EXCEEDED after ``server.message_read_timeout_s``, and what came of it is
freed: gRPC holds a message's part until the rest comes, and before, such calls lived
as long as their connection (24 inference calls sending 40 of 60 MiB each held 1 GB).
A tenant's calls other than inference read at most ``TENANT_READS_MAX`` messages at
once; beyond, RESOURCE_EXHAUSTED before the message is asked for. A stream is not
timed between its messages, so each may hold one in part: a tenant's open streams are
counted instead (``server.max_tenant_streams``). One process and the front ends of
``workers: 2`` alike (``transport/grpc/reads.py``). The probes' reads,
without a key, are in ``test_probe_bounds.py``."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc.reads import TENANT_READS_MAX
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.stalled_calls import StalledCalls
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, metric, serve

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MODEL_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
KEY = "globex-key"
METADATA = (("authorization", f"Bearer {KEY}"),)
READ_TIMEOUT_S = 0.5
MAX_TENANT_STREAMS = 3
OTHER_METADATA = (("authorization", "Bearer acme-key"),)
ADMIN = "admin-key"


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "message_read_timeout_s": READ_TIMEOUT_S,
                "max_tenant_streams": MAX_TENANT_STREAMS,
                "admin_keys": [hash_key(ADMIN)],
            },
            "tenants": [
                {"id": "globex", "api_keys": [hash_key(KEY)], "slo": {"latency_ms": 1000}},
                {"id": "acme", "api_keys": [hash_key("acme-key")]},
            ],
            "models": [ECHO_MODEL],
        }
    )
    running = serve(request.param, config, tmp_path_factory.mktemp("stalled"))
    yield running
    running.stop()


def rejections(server: Server, reason: str) -> float:
    """globex's calls refused for ``reason`` so far, once any is counted (a front end
    of ``workers: 2`` reports its refusals to the engine within 50 ms)."""
    deadline = time.monotonic() + 5
    while (found := metric(server, ADMIN, "mandant_rejections_total", tenant="globex",
                           reason=reason, model="")) is None:  # fmt: skip
        assert time.monotonic() < deadline, f"no rejection counted for {reason}"
        time.sleep(0.02)
    return found


def port_of(server: Server) -> int:
    return int(server.target.rsplit(":", 1)[1])


def echo_works(server: Server) -> None:
    row = np.ones((1, 4), np.float32)
    message = pb.ModelInferRequest(model_name="echo")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=row.shape)
    message.raw_input_contents.append(row.tobytes())
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(message, metadata=METADATA, timeout=10)
        assert answer.raw_output_contents[0] == row.tobytes()
        stub.ModelMetadata(pb.ModelMetadataRequest(name="echo"), metadata=METADATA, timeout=10)


def test_an_inference_call_whose_message_stalls_ends_deadline_exceeded(server: Server) -> None:
    start = time.monotonic()  # before the calls start: the server's wait begins after
    calls = StalledCalls(port_of(server), INFER, KEY, calls=3, declared=8 << 20, sent=4096)
    try:
        statuses = calls.statuses(timeout_s=10)
        took_s = time.monotonic() - start
    finally:
        calls.close()
    assert [code for code, _ in statuses] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3, statuses
    assert statuses[0][1] == f"the request message did not arrive within {READ_TIMEOUT_S:g} s"
    assert READ_TIMEOUT_S <= took_s < READ_TIMEOUT_S + 3
    echo_works(server)


def _counted(server: Server, name: str, **labels: str) -> float:
    return metric(server, ADMIN, name, tenant="globex", **labels) or 0.0


def _until_counted(server: Server, code: str, count: float) -> None:
    """Until globex's ``code`` calls on no model reach ``count`` (a front end of
    ``workers: 2`` reports its calls to the engine within 50 ms)."""
    deadline = time.monotonic() + 5
    while _counted(server, "mandant_requests_total", model="", code=code) < count:
        assert time.monotonic() < deadline, f"{code} not counted {count}"
        time.sleep(0.02)


def test_a_message_its_client_did_not_finish_spends_no_slo_budget(server: Server) -> None:
    """A call whose message (gRPC) or body (REST) its client did not finish sending
    ends DEADLINE_EXCEEDED, counted as such, but not against its tenant's SLO: the
    client stalled, not the server (it counted as the server's failure, as a
    DEADLINE_EXCEEDED of the model's). A call the server answers late still counts."""
    expired = _counted(server, "mandant_requests_total", model="", code="DEADLINE_EXCEEDED")
    slo = _counted(server, "mandant_slo_requests_total")
    calls = StalledCalls(port_of(server), INFER, KEY, calls=2, declared=1 << 20, sent=4096)
    try:
        assert [code for code, _ in calls.statuses(timeout_s=10)] == [
            grpc.StatusCode.DEADLINE_EXCEEDED
        ] * 2
    finally:
        calls.close()
    with socket.create_connection(("127.0.0.1", server.rest_port)) as rest:
        rest.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs": ['
        )
        rest.settimeout(10)
        assert rest.recv(4096).startswith(b"HTTP/1.1 504")
    _until_counted(server, "DEADLINE_EXCEEDED", expired + 3)
    echo_works(server)  # an OK call still counts
    deadline = time.monotonic() + 5
    while _counted(server, "mandant_slo_requests_total") < slo + 1:
        assert time.monotonic() < deadline, "the OK call was not counted"
        time.sleep(0.02)
    assert _counted(server, "mandant_slo_requests_total") == slo + 1


def test_a_tenants_other_calls_read_a_bounded_number_of_messages_at_once(
    server: Server,
) -> None:
    calls = StalledCalls(port_of(server), MODEL_METADATA, KEY, calls=TENANT_READS_MAX + 1)
    try:
        statuses = calls.statuses(timeout_s=10)
    finally:
        calls.close()
    codes = Counter(code for code, _ in statuses)
    assert codes == {
        grpc.StatusCode.DEADLINE_EXCEEDED: TENANT_READS_MAX,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 1,
    }
    refused = next(text for code, text in statuses if code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused == (
        f"{TENANT_READS_MAX} calls of this tenant are sending their messages "
        f"(at most {TENANT_READS_MAX}): retry once they have"
    )
    # Counted as a rejection too (it was in mandant_requests_total only).
    assert rejections(server, "request_messages") == 1
    echo_works(server)  # every read given back: the next calls are read


def streamed_echo_works(server: Server, metadata: tuple[tuple[str, str], ...]) -> None:
    message = pb.ModelInferRequest(model_name="echo", id="streamed")
    tensor = message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([message]), metadata=metadata, timeout=10))
    assert [(a.error_message, a.infer_response.id) for a in answers] == [("", "streamed")]


def test_a_tenants_open_streams_are_bounded_and_another_tenants_are_not(
    server: Server,
) -> None:
    """Streams each holding part of a message (which gRPC keeps, untimed, while the
    stream waits for it) up to the tenant's bound; one more is refused as it opens,
    while another tenant's streams work; once they end, the tenant opens streams
    again."""
    held = StalledCalls(
        port_of(server), STREAM, KEY, calls=MAX_TENANT_STREAMS + 1, declared=8 << 20, sent=4096
    )
    try:
        statuses = held.statuses(timeout_s=2)
        assert statuses == [
            (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_TENANT_STREAMS} streams of this tenant are open (at most "
                f"{MAX_TENANT_STREAMS}, server.max_tenant_streams): retry once one has ended",
            )
        ]  # the others stay open, holding their parts
        assert rejections(server, "streams") == 1
        streamed_echo_works(server, OTHER_METADATA)
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while True:  # the server sees the connection go, and its streams end
        try:
            streamed_echo_works(server, METADATA)
            break
        except grpc.RpcError as refused:
            assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the streams were never given back"
            time.sleep(0.1)
