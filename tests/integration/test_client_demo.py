"""mandant_client against the real demo server: every call, and the exception each
status becomes. Also TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from mandant_client import (
    AsyncClient,
    Client,
    InvalidInput,
    ModelNotFound,
    Unauthenticated,
    Unavailable,
)
from tests.servers import SERVER_KINDS, Server, demo_config, serving


def test_sync_client_calls(demo: Server) -> None:
    with Client(demo.target, api_key="acme-demo-key") as client:
        assert client.server_live() and client.server_ready()
        assert client.model_ready("fraud")
        meta = client.model_metadata("fraud")
        assert meta.platform == "pytorch_torchscript"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            ("SCORE", "FP32", [-1, 1])
        ]
        assert sorted(m.name for m in client.models()) == ["classifier", "echo", "fraud"]
        x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
        score = client.infer("fraud", {"INPUT0": x})["SCORE"]
        assert score.shape == (4, 1) and np.all((score > 0) & (score < 1))
        echo = client.infer("echo", {"INPUT0": x}, outputs=["OUTPUT0"], version="1")
        np.testing.assert_array_equal(echo["OUTPUT0"], x)


def test_sync_client_exceptions(demo: Server) -> None:
    x = np.zeros((1, 32), np.float32)
    with Client(demo.target, api_key="globex-demo-key") as client:
        with pytest.raises(ModelNotFound):
            client.infer("fraud", {"INPUT0": x})
        with pytest.raises(InvalidInput, match="expected shape"):
            client.infer("classifier", {"INPUT0": x})
    with Client(demo.target, api_key="nope") as client, pytest.raises(Unauthenticated):
        client.models()


async def test_async_client(demo: Server) -> None:
    async with AsyncClient(demo.target, api_key="initech-demo-key") as client:
        assert await client.server_ready()
        out = await client.infer("classifier", {"INPUT0": np.ones((2, 256), np.float32)})
        assert out["OUTPUT0"].shape == (2, 16)
        with pytest.raises(ModelNotFound):
            await client.model_metadata("fraud")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_tls(tmp_path: Path, kind: str) -> None:
    cert, key = _self_signed(tmp_path)
    config = demo_config(tls={"cert": str(cert), "key": str(key)})
    with serving(kind, config, tmp_path) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with Client(server.target, api_key="acme-demo-key", tls=credentials) as client:
            assert (
                client.infer("echo", {"INPUT0": np.ones((1, 2), np.float32)})["OUTPUT0"].sum() == 2
            )
        with Client(server.target, api_key="acme-demo-key") as plain, pytest.raises(Unavailable):
            plain.infer("echo", {"INPUT0": np.ones((1, 2), np.float32)}, timeout_s=2)
