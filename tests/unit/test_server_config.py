"""The server section's access and readiness settings: defaults, and the
configurations refused on load."""

from __future__ import annotations

import pytest

from mandant.config import parse_config
from mandant.errors import ConfigError
from mandant.tenancy.keys import hash_key


def test_defaults_guard_the_http_port_and_serve_while_any_model_is_ready() -> None:
    server = parse_config({}).server
    assert (server.metrics_auth, server.internal_http, server.ready_when) == (
        "admin",
        None,
        "any_model",
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"server": {"metrics_auth": "tenant"}}, "server.metrics_auth"),
        ({"server": {"ready_when": "some_models"}}, "server.ready_when"),
        ({"server": {"compute_nice": 20}}, "server.compute_nice"),
        ({"server": {"compute_nice": -1}}, "server.compute_nice"),
        ({"server": {"model_load_timeout_s": 0}}, "server.model_load_timeout_s"),
        ({"server": {"model_load_timeout_s": "soon"}}, "server.model_load_timeout_s"),
        ({"server": {"internal_http": {"port": 8002}}}, "must differ from grpc_port"),
        ({"server": {"internal_http": {"port": 8000}}}, "must differ from grpc_port"),
        ({"server": {"rest_port": 8001}}, "'rest_port' must differ from grpc_port"),
        ({"server": {"http_port": 8000}}, "'http_port' must differ"),
        ({"server": {"http_port": 8001}}, "'http_port' must differ"),
        ({"server": {"internal_http": {"host": "10.0.0.1"}}}, "server.internal_http.port"),
        (
            {
                "server": {"admin_keys": [hash_key("k")]},
                "tenants": [{"id": "a", "api_keys": [hash_key("k")]}],
            },
            "an admin key hash is also a tenant's API key",
        ),
    ],
)
def test_refused(data: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(data)
    assert error in str(refused.value)


def test_ports_may_match_on_different_hosts_and_port_0_is_always_free() -> None:
    parse_config({"server": {"http_host": "10.1.2.3", "http_port": 8001}})
    parse_config({"server": {"grpc_port": 0, "rest_port": 0, "http_port": 0}})


def test_a_model_load_may_take_five_minutes_unless_configured() -> None:
    assert parse_config({}).server.model_load_timeout_s == 300
    server = parse_config({"server": {"model_load_timeout_s": 1800}}).server
    assert server.model_load_timeout_s == 1800


def test_the_http_port_binds_server_host_unless_http_host_says_otherwise() -> None:
    assert parse_config({"server": {"host": "0.0.0.0"}}).server.http_bind_host == "0.0.0.0"
    server = parse_config({"server": {"host": "0.0.0.0", "http_host": "10.1.2.3"}}).server
    assert (server.host, server.http_bind_host) == ("0.0.0.0", "10.1.2.3")
    # A --host given on the command line moves the HTTP port too, unless it has its own.
    moved = parse_config({}).server.model_copy(update={"host": "::1"})
    assert moved.http_bind_host == "::1"
