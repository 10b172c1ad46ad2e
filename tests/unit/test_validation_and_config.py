from __future__ import annotations

from pathlib import Path

import pytest

from mandant.config import TenantConfig, parse_config
from mandant.errors import ConfigError, InvalidInput, Unauthenticated
from mandant.tenancy import keys
from mandant.tenancy.directory import TenantDirectory
from mandant.tenancy.keys import KeyStore, generate_key, hash_key
from mandant.types import Tenant, TensorHeader, TensorSpec
from mandant.validation import check_inputs, check_outputs

IO = {
    "inputs": [
        {"name": "A", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "B", "datatype": "INT64", "shape": [-1]},
    ],
    "outputs": [
        {"name": "Y", "datatype": "FP32", "shape": [-1]},
        {"name": "Z", "datatype": "FP32", "shape": [-1]},
    ],
}
SPEC = parse_config({"models": [{"name": "m", "factory": "a:b", **IO}]}).model_specs(Path("."))[0]


def test_valid_headers_give_the_row_count() -> None:
    headers = [TensorHeader("B", "INT64", (3,)), TensorHeader("A", "FP32", (3, 4))]
    assert check_inputs(SPEC, headers) == 3


def test_the_rows_are_the_largest_input_s_whatever_the_client_s_order() -> None:
    """An unbatched model's inputs may differ in rows: the first one the client sent
    decided the rows its quota was charged (1 for 50 here)."""
    few_first = [TensorHeader("B", "INT64", (1,)), TensorHeader("A", "FP32", (50, 4))]
    assert check_inputs(SPEC, few_first) == 50
    assert check_inputs(SPEC, few_first[::-1]) == 50


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([], "request has no inputs; model 'm' takes A, B"),
        ([TensorHeader("A", "FP32", (1, 4))], "missing input(s) B for model 'm'"),
        (
            [TensorHeader("A", "FP32", (1, 4)), TensorHeader("C", "FP32", (1,))],
            "unexpected input 'C'; model 'm' takes A, B",
        ),
        (
            [TensorHeader("A", "FP64", (1, 4)), TensorHeader("B", "INT64", (1,))],
            "input 'A': expected datatype FP32, got FP64",
        ),
        (
            [TensorHeader("A", "FP32", (1, 5)), TensorHeader("B", "INT64", (1,))],
            "input 'A': expected shape [-1, 4], got [1, 5]",
        ),
    ],
)
def test_invalid_headers_name_the_input(headers: list[TensorHeader], message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_inputs(SPEC, headers)
    assert str(err.value) == message


def test_a_spec_changed_by_model_copy_is_validated_against_its_own_tensors() -> None:
    """A Triton model's spec is replaced with the tensors the server reports; what
    validation caches of the old spec must not carry over."""
    assert check_outputs(SPEC, []) == ("Y", "Z")  # caches the original's
    assert check_inputs(SPEC, [TensorHeader("A", "FP32", (1, 4)), TensorHeader("B", "INT64", (1,))])
    changed = SPEC.model_copy(
        update={
            "inputs": (TensorSpec("X", "FP32", (-1,)),),
            "outputs": (TensorSpec("W", "FP32", (-1,)),),
        }
    )
    assert check_outputs(changed, []) == ("W",)
    assert check_inputs(changed, [TensorHeader("X", "FP32", (2,))]) == 2
    with pytest.raises(InvalidInput, match="unexpected input 'A'"):
        check_inputs(changed, [TensorHeader("A", "FP32", (1, 4))])


def test_requested_outputs() -> None:
    assert check_outputs(SPEC, []) == ("Y", "Z")
    assert check_outputs(SPEC, ["Z", "Z"]) == ("Z",)
    with pytest.raises(InvalidInput, match="unknown output 'Q'; model 'm' has Y, Z"):
        check_outputs(SPEC, ["Q"])


def test_config_errors_collect_every_field_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "server": {"grpc_port": -1},
                "tenants": [{"id": "acme", "weight": 0, "api_keys": ["sha256:xyz"]}],
                "models": [{"name": "m", "version": "v2"}],
            }
        )
    paths = [path for path, _ in err.value.errors]
    assert paths == [
        "server.grpc_port",
        "tenants.0.api_keys",
        "tenants.0.weight",
        "models.0.version",
    ]


def test_config_references_are_checked() -> None:
    with pytest.raises(ConfigError, match="base 'nope' is not a shared model"):
        parse_config({"tenants": [{"id": "a"}], "models": [{"tenant": "a", "base": "nope"}]})
    with pytest.raises(ConfigError, match="defined twice"):
        parse_config({"models": [{"name": "m", **IO, "factory": "a:b"}] * 2})
    with pytest.raises(ConfigError, match="an API key hash appears under two tenants"):
        key = hash_key("k")
        parse_config({"tenants": [{"id": "a", "api_keys": [key]}, {"id": "b", "api_keys": [key]}]})


def test_a_queue_cap_below_the_batch_size_is_refused_with_its_path() -> None:
    model = {"name": "m", "factory": "a:b", **IO}
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"models": [{**model, "batching": {"max_batch_size": 8, "max_queue_rows": 7}}]}
        )
    assert err.value.errors == [
        (
            "models.0.batching",
            "max_queue_rows (7) is below max_batch_size (8): calls the model "
            "accepts could never be queued",
        )
    ]
    parse_config({"models": [{**model, "batching": {"max_batch_size": 8, "max_queue_rows": 8}}]})


def test_keys_authenticate_by_hash_with_one_message_for_every_failure() -> None:
    key, key_hash = generate_key()
    acme = Tenant("acme")
    store = KeyStore([(acme, [key_hash])])
    assert store.authenticate(f"Bearer {key}") is acme
    assert store.authenticate(f"bearer  {key}") is acme
    messages = set()
    for header in (
        None,
        "",
        key,
        f"Basic {key}",
        "Bearer ",
        f"Bearer {key}x",
        f"Bearer {key_hash}",
    ):
        with pytest.raises(Unauthenticated) as err:
            store.authenticate(header)
        messages.add(str(err.value))
    assert messages == {"missing or invalid API key"}


def test_keys_that_authenticated_are_not_hashed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's next calls skip the sha256; a refused value is hashed every time
    (never remembered); the store remembers a bounded number of short values."""
    key, key_hash = generate_key()
    hashed: list[str] = []
    monkeypatch.setattr(keys, "hash_key", lambda key: hashed.append(key) or hash_key(key))
    monkeypatch.setattr(keys, "REMEMBERED_VALUES", 2)
    acme = Tenant("acme")
    store = KeyStore([(acme, [key_hash])])
    for _ in range(3):
        assert store.authenticate(f"Bearer {key}") is acme
    assert len(hashed) == 1
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            store.authenticate(f"Bearer {key}x")
    assert len(hashed) == 3
    for header in (f"bearer {key}", f"BEARER {key}"):  # the store is full: it starts again
        assert store.authenticate(header) is acme
    assert store.authenticate(f"Bearer {key}") is acme
    assert len(hashed) == 6
    padded = f"Bearer {key}" + " " * keys.REMEMBERED_LENGTH  # too long to remember
    for _ in range(2):
        assert store.authenticate(padded) is acme
    assert len(hashed) == 8


def test_a_revoked_key_stops_at_once_though_it_was_remembered() -> None:
    key, key_hash = generate_key()
    directory = TenantDirectory([TenantConfig(id="acme", api_keys=[key_hash])])
    assert directory.authenticate(f"Bearer {key}").id == "acme"
    directory.replace([TenantConfig(id="acme", api_keys=[generate_key()[1]])], [])
    with pytest.raises(Unauthenticated):
        directory.authenticate(f"Bearer {key}")
