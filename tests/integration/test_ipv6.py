"""``server.host`` as an IPv6 address, written bare (``::1``) or as in a URL
(``[::1]``): gRPC, REST and the HTTP port all serve on it, in one process and with
``workers: 2``. gRPC wants the brackets and aiohttp does not: either form failed one
of them."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.servers import DEMO_KEYS, WorkersServer, demo_config


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


@pytest.mark.parametrize(("host", "workers"), [("::1", 1), ("[::1]", 2)])
def test_every_port_serves_on_an_ipv6_host(tmp_path: Path, host: str, workers: int) -> None:
    with WorkersServer(demo_config(host=host), tmp_path, workers=workers) as server:
        # The ports came from the banner, which writes the host as [::1].
        client = tc.InferenceServerClient(f"[::1]:{server.grpc_port}")
        headers = {"authorization": f"Bearer {DEMO_KEYS['acme']}"}
        tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
        rows = np.arange(4, dtype=np.float32).reshape(1, 4)
        tensor.set_data_from_numpy(rows)
        answer = client.infer("echo", [tensor], headers=headers).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(answer, rows)
        for port, path in ((server.rest_port, "/v2/health/ready"), (server.http_port, "/readyz")):
            with urllib.request.urlopen(f"http://[::1]:{port}{path}", timeout=10) as reply:
                assert reply.status == 200
