"""Every path in the configuration resolves against the configuration file's folder,
not the working directory of ``mandant serve``."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import yaml

from mandant.tenancy.keys import hash_key
from mandant_client import Client
from tests.integration.certs import make_ca, server_cert
from tests.servers import free_port, mandant_serve


def test_relative_tls_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    (folder / "certs").mkdir(parents=True)
    ca = make_ca(folder / "certs")
    server = server_cert(ca, folder / "certs")
    port = free_port()
    config = {
        "server": {
            "grpc_port": port,
            "http_port": free_port(),
            "rest_port": free_port(),
            "tls": {"cert": "certs/server.pem", "key": "certs/server.key"},
        },
        "tenants": [{"id": "t", "api_keys": [hash_key("secret-key")]}],
        "models": [
            {
                "name": "echo",
                "factory": "mandant.demo.models:echo",
                "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
                "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
            }
        ],
    }
    path = folder / "mandant.yaml"
    path.write_text(yaml.safe_dump(config))
    assert not (Path.cwd() / "certs" / "server.pem").exists()  # served from elsewhere
    with mandant_serve(path):
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
        with Client(f"localhost:{port}", api_key="secret-key", tls=credentials) as client:
            out = client.infer("echo", {"INPUT0": np.ones((1, 2), np.float32)})
        assert out["OUTPUT0"].sum() == 2
    assert server.cert.exists()
