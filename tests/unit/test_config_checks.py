"""What the configuration checks beyond single fields: model names and versions in one
spelling, every cross-reference problem at once with its own path, keyless tenants,
command-line server settings, and the files and factories ``check-config`` looks at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mandant.config import config_folder, parse_config
from mandant.errors import MAX_RETRY_AFTER_S, ConfigError, RateLimited
from mandant.tenancy.keys import hash_key

IO = {
    "factory": "m:f",
    "inputs": [{"name": "IN", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "OUT", "datatype": "FP32", "shape": [-1, 4]}],
}
KEY_A, KEY_B = hash_key("key-a"), hash_key("key-b")


def model(name: str | None = "m", **extra: Any) -> dict[str, Any]:
    return {"name": name, **IO, **extra} if name is not None else {**IO, **extra}


def errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as refused:
        parse_config(data)
    return refused.value.errors


@pytest.mark.parametrize("name", ["", "x/y z", "a/b", "-lead", "sp ace", "x" * 129, "ü", "echo\n"])
def test_a_model_name_is_spelled_like_a_tenant_id(name: str) -> None:
    """A name REST paths (/v2/models/{name}) and '<tenant>/<name>' can carry; an empty
    one was '(top level): Assertion failed'."""
    [(path, message)] = errors({"models": [model(name)]})
    assert path == "models.0.name"
    assert "letters, digits" in message


def test_a_final_newline_is_not_part_of_a_name_or_a_key_hash() -> None:
    """``$`` matches before a final newline: "acme\n" was a second tenant that looked
    like acme on the dashboard, a key hash with one never matched any key."""
    [(path, _)] = errors({"tenants": [{"id": "acme\n", "api_keys": [KEY_A]}]})
    assert path == "tenants.0.id"
    [(path, _)] = errors({"tenants": [{"id": "acme", "api_keys": [KEY_A + "\n"]}]})
    assert path == "tenants.0.api_keys"


def test_a_base_is_spelled_like_a_name() -> None:
    data = {
        "tenants": [{"id": "t", "api_keys": [KEY_A]}],
        "models": [model(base="a b", tenant="t")],
    }
    assert [path for path, _ in errors(data)] == ["models.0.base"]


def test_names_that_serve_today_still_validate() -> None:
    names = ["classifier", "echo", "fraud", "m", "slow-lookup", "one.pt", "resnet_50", "A1"]
    config = parse_config({"models": [model(name) for name in names]})
    assert [m.model_name for m in config.models] == names


@pytest.mark.parametrize("version", [0, "0", "00", -1, "-1", "v2", "1.0", 1.0, True, "", " 1"])
def test_versions_are_positive_integers(version: object) -> None:
    [(path, message)] = errors({"models": [model(version=version)]})
    assert (path, "positive integers" in message) == ("models.0.version", True)


def test_a_version_has_one_spelling_so_duplicates_are_caught() -> None:
    assert parse_config({"models": [model(version="007")]}).models[0].version == "7"
    found = errors({"models": [model(version=1), model(version="01")]})
    assert found == [("models.1.version", "model 'm' version 1 is defined twice (also models.0)")]


def test_every_cross_reference_problem_is_reported_at_once_with_its_path() -> None:
    """Each at its own field path; one per run at '(top level)' before."""
    found = errors(
        {
            "server": {"admin_keys": [KEY_B]},
            "tenants": [
                {"id": "a", "api_keys": [KEY_A]},
                {"id": "a", "api_keys": [KEY_A, KEY_B], "models": {"ghost": {}}},
                {"id": "c", "api_keys": [hash_key("c"), hash_key("c")], "client_certs": ["CN=c"]},
            ],
            "models": [
                model(),
                model(version="1"),
                model("p", tenant="nobody"),
                model(None, tenant="a", base="nothere"),
                model("v", version=1, version_policy={"latest": 1}),
                model("v", version=2, version_policy={"all": {}}),
                model("w", version=2, version_policy={"specific": [3]}),
            ],
        }
    )
    assert found == [
        ("tenants.1.id", "tenant ids must be unique: 'a' is also tenants.0"),
        ("tenants.1.api_keys.0", "an API key hash appears under two tenants (also tenants.0)"),
        ("tenants.1.api_keys.1", "an admin key hash is also a tenant's API key"),
        ("tenants.2.api_keys.1", "an API key hash is listed twice"),
        ("server.tls.client_ca", "tenants' client_certs need server.tls.client_ca"),
        ("models.1.version", "model 'm' version 1 is defined twice (also models.0)"),
        ("models.2.tenant", "model 'p': unknown tenant 'nobody'"),
        ("models.3.base", "model 'nothere' of tenant 'a': base 'nothere' is not a shared model"),
        (
            "models.5.version_policy",
            "model 'v': its entries set different version_policy (see models.4)",
        ),
        (
            "models.6.version_policy.specific",
            "model 'w': version_policy names version 3, which has no entry",
        ),
        ("tenants.1.models.ghost", "tenant 'a': limits for unknown model 'ghost'"),
    ]


def test_a_load_entry_s_reference_problems_name_the_entry() -> None:
    config = parse_config(
        {"tenants": [{"id": "t", "api_keys": [KEY_A]}], "models": [model("x"), model("m")]}
    )
    with pytest.raises(ConfigError) as refused:
        config.with_model_entries(
            "m", '[{"name": "m", "factory": "a:b"}, {"name": "m", "tenant": "u"}]'
        )
    assert [path for path, _ in refused.value.errors] == ["1.tenant"]


def test_a_tenant_that_cannot_authenticate_is_a_warning() -> None:
    config = parse_config(
        {"tenants": [{"id": "a", "api_keys": [KEY_A]}, {"id": "b"}], "models": [model()]}
    )
    assert config.warnings() == [
        (
            "tenants.1",
            "tenant 'b' has no api_keys and no client_certs: no call can authenticate as it",
        )
    ]


def test_a_front_door_as_large_as_the_call_cap_is_a_warning() -> None:
    """A lone tenant's share of the door is all of it: with the door no smaller than
    the cap, its calls can take every place inside, none left waiting whose place
    another tenant's call could take, and the others are refused."""
    tenants, models = [{"id": "a", "api_keys": [KEY_A]}], [model()]
    fine = parse_config(
        {"tenants": tenants, "models": models, "server": {"max_concurrent_rpcs": 129}}
    )
    assert fine.warnings() == []
    config = parse_config(
        {"tenants": tenants, "models": models, "server": {"max_concurrent_rpcs": 128}}
    )
    assert config.warnings() == [
        (
            "server.front_door_slots",
            "128 is not below max_concurrent_rpcs (128): one tenant's calls can take every "
            "place under the cap, and the other tenants' calls are refused; keep it well "
            "below (the defaults: 128 and 4096)",
        )
    ]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"grpc_port": 99999}, ("server.grpc_port", "Input should be less than or equal to 65535")),
        ({"rest_port": 70000}, ("server.rest_port", "Input should be less than or equal to 65535")),
        ({"http_port": -1}, ("server.http_port", "Input should be greater than or equal to 0")),
        (
            {"workers": 0},
            ("server.workers", "'auto', or a number of front-end processes from 1 to 256"),
        ),
    ],
)
def test_server_settings_changed_are_validated_as_the_file_s(
    changes: dict[str, object], error: tuple[str, str]
) -> None:
    config = parse_config({"server": {"grpc_port": 9001}})
    with pytest.raises(ConfigError) as refused:
        config.with_server(changes)
    assert refused.value.errors[0] == error


def test_server_settings_changed_keep_the_file_s() -> None:
    config = parse_config({"server": {"grpc_port": 9001, "tls": {"cert": "c", "key": "k"}}})
    changed = config.with_server({"rest_port": 0, "workers": "auto"})
    assert (changed.server.grpc_port, changed.server.rest_port) == (9001, 0)
    assert changed.server.workers == "auto" and changed.server.tls == config.server.tls


def test_file_problems_names_every_unreadable_file_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "models").mkdir()
    (tmp_path / "here.pt").write_text("x")
    config = parse_config(
        {
            "server": {"tls": {"cert": "cert.pem", "key": "key.pem", "client_ca": "models"}},
            "tenants": [{"id": "t", "api_keys": [KEY_A]}],
            "models": [
                model("here", path="here.pt"),
                model("gone", path="gone.pt"),
                model("built", path="built.safetensors", weights_init="m:w"),
                model(
                    "remote", backend="triton", path="nothing", triton={"url": "u", "model": "r"}
                ),
                model(None, tenant="t", base="built", path="own.safetensors"),
            ],
        }
    )
    assert config.file_problems(tmp_path) == [
        ("server.tls.key", f"no such file: {tmp_path / 'key.pem'}"),
        ("server.tls.client_ca", f"not a file: {tmp_path / 'models'}"),
        ("models.1.path", f"no such file: {tmp_path / 'gone.pt'}"),
    ]
    assert config.callable_refs() == [
        ("models.0.factory", "m:f"),
        ("models.1.factory", "m:f"),
        ("models.2.factory", "m:f"),
        ("models.2.weights_init", "m:w"),
        ("models.3.factory", "m:f"),
        ("models.4.factory", "m:f"),
    ]


def test_a_tenant_priority_is_bounded_as_a_v2_priority() -> None:
    with pytest.raises(ConfigError, match=r"tenants\.0\.priority"):
        parse_config({"tenants": [{"id": "a", "priority": 2**31}]})


def test_file_problems_name_tls_files_tls_cannot_use(tmp_path: Path) -> None:
    """A key that is not the certificate's, or a file that is not PEM, passed
    check-config, and serve refused to start with OpenSSL's words alone ("[X509:
    KEY_VALUES_MISMATCH] key values mismatch"), naming no file."""
    from tests.integration.certs import make_ca

    one, other = make_ca(tmp_path, "one"), make_ca(tmp_path, "other")
    (tmp_path / "junk.pem").write_text("garbage")

    def problems(cert: Path, key: Path, client_ca: Path | None = None) -> list[tuple[str, str]]:
        tls = {"cert": str(cert), "key": str(key), "client_ca": str(client_ca or one.cert)}
        return parse_config({"server": {"tls": tls}}).file_problems(tmp_path)

    assert problems(one.cert, one.key) == []
    assert problems(one.cert, other.key) == [
        ("server.tls.key", "is not the key of server.tls.cert")
    ]
    assert problems(tmp_path / "junk.pem", one.key) == [
        ("server.tls.cert", "not a PEM certificate")
    ]
    assert problems(one.cert, tmp_path / "junk.pem") == [
        ("server.tls.key", "not a PEM private key")
    ]
    [(field, why)] = problems(one.cert, one.key, tmp_path / "junk.pem")
    assert field == "server.tls.client_ca" and why.startswith("not a PEM certificate")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"server": {"workers": 0}},
            [("server.workers", "'auto', or a number of front-end processes from 1 to 256")],
        ),
        (
            {
                "models": [
                    {
                        **model("m"),
                        "warmup": [
                            {"inputs": {"INPUT0": {"datatype": "FP32", "shape": [1], "value": [1]}}}
                        ],
                    }
                ]
            },
            [
                (
                    "models.0.warmup.0.inputs.INPUT0.value",
                    "one element: a number, true or false, or text",
                )
            ],
        ),
    ],
)
def test_a_setting_of_several_kinds_is_refused_once(
    data: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    """A setting that takes one of several kinds: one message at its own path (each
    kind said why not, with pydantic's tags in the path: server.workers.constrained-int,
    server.workers.literal['auto'])."""
    with pytest.raises(ConfigError) as refused:
        parse_config({"tenants": [{"id": "t", "api_keys": [KEY_A]}], **data})
    assert refused.value.errors == expected


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_message_bytes", 2**32),
        ("max_concurrent_streams", 2**31),
        ("max_connection_age_s", 2_500_000),
        ("grace_s", 10**7),
        ("front_door_slots", 2**31),
        ("max_concurrent_rpcs", 2**31),
    ],
)
def test_settings_gRPC_takes_as_c_ints_are_bounded(setting: str, value: int) -> None:
    """check-config passed them; serve then stopped with an OverflowError's traceback
    once the models had loaded (a connection's grace counts in int milliseconds), or
    failed every call INTERNAL (the front door's shares are floats: 10**400 slots)."""
    found = errors({"server": {setting: value}, "tenants": [], "models": []})
    assert [where for where, _ in found] == [f"server.{setting}"]
    assert "less than or equal to" in found[0][1]


@pytest.mark.parametrize(
    ("tenant", "path"),
    [
        ({"weight": 1e-320}, "tenants.0.weight"),  # the batcher's rounds were infinite
        ({"weight": float("inf")}, "tenants.0.weight"),
        ({"rate_limit": {"requests_per_s": 1e-320}}, "tenants.0.rate_limit.requests_per_s"),
        ({"rate_limit": {"rows_per_s": float("nan")}}, "tenants.0.rate_limit.rows_per_s"),
        ({"rate_limit": {"requests_per_s": 1, "burst": 1e300}}, "tenants.0.rate_limit.burst"),
        ({"quota": {"rows_per_day": 2**64}}, "tenants.0.quota.rows_per_day"),  # GetUsage failed
        # the dashboard's JSON held Infinity, which browsers refuse: the page broke
        ({"slo": {"latency_ms": float("inf")}}, "tenants.0.slo.latency_ms"),
        ({"slo": {"latency_ms": 1e308}}, "tenants.0.slo.latency_ms"),  # its chart drew NaN
    ],
)
def test_limits_a_server_cannot_compute_with_are_refused(tenant: dict[str, Any], path: str) -> None:
    """Accepted before (``gt=0``): a denormal rate's wait was infinite and its refusal
    INTERNAL (a stream's message never answered), a denormal weight stopped a shared
    model for every tenant, a quota beyond 64 bits failed every GetUsage."""
    [(found, _)] = errors({"tenants": [{"id": "t", "api_keys": [KEY_A], **tenant}]})
    assert found == path


def test_a_refusal_hints_at_a_finite_wait() -> None:
    assert RateLimited("x", float("inf")).retry_after_s == MAX_RETRY_AFTER_S
    assert RateLimited("x", float("nan")).retry_after_s == 0.0
    assert round(MAX_RETRY_AFTER_S * 1000) < 2**63


def test_a_weights_file_built_from_two_recipes_is_refused() -> None:
    """A tuned variant that changes its base's ``factory_args`` but inherits its
    ``path`` and ``weights_init``: both built the one file at the first start, the last
    build won, and every tenant's shared model served the variant's weights (for good:
    the file stays)."""
    tenants = [{"id": "globex", "api_keys": [KEY_A]}]
    base = model("c", path="c.safetensors", weights_init="m:w", factory_args={"seed": 0})
    variant = {"name": "c", "tenant": "globex", "base": "c", "factory_args": {"seed": 1}}
    with pytest.raises(ConfigError) as refused:
        parse_config({"tenants": tenants, "models": [base, variant]}).model_specs(Path("/m"))
    [(path, message)] = refused.value.errors
    assert path == "models.1.path"
    assert "(also models.0)" in message and "give it a 'path' of its own" in message
    own_file = {**variant, "path": "c-globex.safetensors"}
    for fine in (own_file, {**variant, "factory_args": {"seed": 0}}):
        parse_config({"tenants": tenants, "models": [base, fine]}).model_specs(Path("/m"))


@pytest.mark.parametrize("shape", [[1, 4], [2, 3], []])
def test_a_batched_model_s_tensors_start_with_the_batch(shape: list[int]) -> None:
    """Accepted before: every batch of two or more requests then failed its output
    check and ran again apart (batching all overhead), ModelConfig told clients
    ``max_batch_size 8`` while a 3-row call was refused; a scalar was READY and refused
    every call as the client's fault."""
    io = {"name": "IN", "datatype": "FP32", "shape": shape}
    entry = model(inputs=[io], batching={"max_batch_size": 8})
    with pytest.raises(ConfigError) as refused:
        parse_config({"models": [entry]}).model_specs(Path("/m"))
    [(path, message)] = refused.value.errors
    assert path == "models.0" and "the batch as their first dimension, -1: not IN" in message
    parse_config({"models": [model(batching={"max_batch_size": 8})]}).model_specs(Path("/m"))


def test_relative_paths_resolve_beside_the_real_file_as_it_is_now(tmp_path: Path) -> None:
    """A file linked into another folder keeps its models beside the real file (a
    change resolved no link, and they went missing); a mounted ConfigMap, links into a
    folder the kubelet replaces at each edit, is followed to its folder of now (resolved
    once at start, every reload after an edit read the removed one)."""
    release = tmp_path / "release"
    release.mkdir()
    (release / "mandant.yaml").write_text("tenants: []\n")
    link = tmp_path / "etc" / "mandant.yaml"
    link.parent.mkdir()
    link.symlink_to(release / "mandant.yaml")
    assert config_folder(link) == release
    mounted = tmp_path / "config"
    for version in (1, 2):
        (mounted / f"..v{version}").mkdir(parents=True)
        (mounted / f"..v{version}" / "mandant.yaml").write_text("tenants: []\n")
        (mounted / "..data_tmp").symlink_to(f"..v{version}")
        (mounted / "..data_tmp").replace(mounted / "..data")
        if version == 1:
            (mounted / "mandant.yaml").symlink_to("..data/mandant.yaml")
        assert config_folder(mounted / "mandant.yaml") == mounted / f"..v{version}"


def test_a_weights_file_s_recipe_is_compared_by_value() -> None:
    """The same factory_args written in another key order are the same recipe."""
    tenants = [{"id": "globex", "api_keys": [KEY_A]}]
    args = {"seed": 0, "opts": {"x": 1, "y": 2}}
    base = model("c", path="c.safetensors", weights_init="m:w", factory_args=args)
    variant = {"name": "c", "tenant": "globex", "base": "c",
               "factory_args": {"opts": {"y": 2, "x": 1}, "seed": 0}}  # fmt: skip
    parse_config({"tenants": tenants, "models": [base, variant]}).model_specs(Path("/m"))


def test_an_empty_host_is_refused() -> None:
    """gRPC cannot bind ``host: ""``; check-config passed it and ``serve`` stopped once
    every model had loaded."""
    assert errors({"server": {"host": ""}}) == [
        ("server.host", "empty: 0.0.0.0 binds every IPv4 address, :: every address")
    ]
