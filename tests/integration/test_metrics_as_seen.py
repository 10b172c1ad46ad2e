"""``/metrics`` of a real server says what its clients got and whose model ran: a
message over ``max_message_bytes``, which gRPC itself refuses, counted with gRPC's
RESOURCE_EXHAUSTED (it was INVALID_ARGUMENT, as a call without a message); the
batches of globex's tuned ``classifier`` apart from the shared one's (one series by
name mixed them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.core import Metric

from mandant.observability.series import HistogramSeries, SeriesCollector
from mandant.tenancy.keys import hash_key
from mandant_client import Client
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import (
    SERVER_KINDS,
    Server,
    ServerThread,
    auth,
    demo_config,
    http_get,
    metric,
    serving,
)

ADMIN_KEY = "test-admin-key"
LIMIT = 1 << 20
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = demo_config(admin_keys=[hash_key(ADMIN_KEY)], max_message_bytes=LIMIT)
    with serving(request.param, config, Path(tmp_path_factory.mktemp("seen"))) as running:
        yield running


def eventually(read: Callable[[], float | None], expected: float, timeout_s: float = 10) -> None:
    """``read()`` reaches ``expected`` (a front end of ``workers: 2`` reports its calls
    to the engine just after answering them)."""
    deadline = time.monotonic() + timeout_s
    while (found := read()) != expected:
        assert time.monotonic() < deadline, f"{found} after {timeout_s}s, not {expected}"
        time.sleep(0.02)


def test_an_oversize_message_counts_as_the_resource_exhausted_its_client_got(
    server: Server,
) -> None:
    def count(code: str) -> float:
        return metric(server, ADMIN_KEY, "mandant_requests_total",
                      tenant="acme", model="", code=code) or 0.0  # fmt: skip

    request = pb.ModelInferRequest(model_name="classifier")
    rows = 2 * LIMIT // 1024
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 256])
    request.raw_input_contents.append(bytes(rows * 1024))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=tuple(auth("acme").items()))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        eventually(lambda: count("RESOURCE_EXHAUSTED"), 1)
        assert count("INVALID_ARGUMENT") == 0
        # A call that really has no message is still the client's mistake.
        empty = channel.stream_unary(INFER)
        with pytest.raises(grpc.RpcError) as err:
            empty(iter(()), metadata=tuple(auth("acme").items()))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "the call has no request message"
        eventually(lambda: count("INVALID_ARGUMENT"), 1)
        assert count("RESOURCE_EXHAUSTED") == 1


def test_a_tuned_model_has_batch_series_apart_from_the_shared_one(server: Server) -> None:
    """globex calls ``classifier`` and runs its tuned variant; acme runs the shared
    one: ``mandant_batch_size`` says whose (``tenant``: the owner, ``""`` shared)."""
    rows = np.ones((3, 256), np.float32)
    with Client(server.target, api_key="globex-demo-key") as globex:
        globex.infer("classifier", {"INPUT0": rows})
    with Client(server.target, api_key="acme-demo-key") as acme:
        acme.infer("classifier", {"INPUT0": rows[:2]})

    def batch_rows(owner: str) -> float | None:
        return metric(server, ADMIN_KEY, "mandant_batch_size_sum", model="classifier",
                      tenant=owner)  # fmt: skip

    eventually(lambda: batch_rows("globex"), 3)
    eventually(lambda: batch_rows(""), 2)


class _Held(HistogramSeries):
    """A series whose samples are made only once ``RELEASE`` is set: a scrape long to
    write (1,000 tenants' series took 3.5 s)."""

    def family(self, with_samples: bool = True) -> Metric:
        if with_samples:
            RELEASE.wait(30)
        return super().family(with_samples)


RELEASE = threading.Event()


def test_a_scrape_long_to_write_holds_no_call(tmp_path: Path) -> None:
    """``/metrics`` is written in a thread from the series as they were when it was
    asked for: written on the event loop, it held every tenant's calls for as long
    (with ``workers: N``, the engine's: after 5 s its front ends took it for gone)."""
    config = demo_config(admin_keys=[hash_key(ADMIN_KEY)])
    RELEASE.clear()
    with ServerThread(config, tmp_path) as server, Client(server.target, "acme-demo-key") as acme:
        assert server.app is not None
        held = _Held("held", "A series slow to write.", ["tenant"], [1.0])
        held.observe(("acme",), 0.5)
        metrics = server.app.metrics

        async def register() -> None:
            metrics.register(SeriesCollector([held]))

        server.call(register())
        scrape = threading.Thread(target=http_get, args=(server, "/metrics", ADMIN_KEY))
        scrape.start()
        try:
            time.sleep(0.2)  # the scrape is being written
            answered = acme.infer("echo", {"INPUT0": np.ones((1, 4), np.float32)}, timeout_s=10)
            assert answered["OUTPUT0"].shape == (1, 4)
        finally:
            RELEASE.set()
            scrape.join(30)
        status, body = http_get(server, "/metrics", ADMIN_KEY)
        assert status == 200 and b'held_bucket{le="1.0",tenant="acme"} 1.0' in body
