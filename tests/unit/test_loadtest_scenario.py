"""The load test's scenario and failure names (``loadtests/scenario.py``), without
locust: importing the locustfile (or locust) monkey-patches the process with gevent."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml

from mandant_client import (
    InvalidInput,
    QuotaExceeded,
    RateLimited,
    ResourceExhausted,
    Unavailable,
    error_for,
)

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"


def _load_scenario_module() -> ModuleType:
    name = "mandant_loadtests_scenario"  # not "scenario": no clash on sys.modules
    spec = importlib.util.spec_from_file_location(name, LOADTESTS / "scenario.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sc = _load_scenario_module()
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_message_over_the_size_limit_is_not_named_resource_exhausted() -> None:
    """gRPC codes a message over its size limit RESOURCE_EXHAUSTED, and the client
    raises it as InvalidInput with that code: named by its code, it passed as the rate
    limit the noisy-neighbour scenario expects, while every call failed."""
    too_large = error_for(EXHAUSTED, "Sent message larger than max (71680104 vs. 67108864)")
    assert isinstance(too_large, InvalidInput) and too_large.code is EXHAUSTED
    assert sc.failure_name(too_large) == sc.MESSAGE_TOO_LARGE == "MESSAGE_TOO_LARGE"
    failures = [sc.StatusFailure(sc.failure_name(too_large))]
    assert sc.unexpected_failures(failures, ["RESOURCE_EXHAUSTED"]) == ["MESSAGE_TOO_LARGE"]


@pytest.mark.parametrize(
    ("error", "name"),
    [
        (error_for(EXHAUSTED, "rate limit of tenant acme"), "RESOURCE_EXHAUSTED"),
        (error_for(EXHAUSTED, "quota rows_per_day of tenant acme is spent"), "RESOURCE_EXHAUSTED"),
        (RateLimited("queue full"), "RESOURCE_EXHAUSTED"),
        (QuotaExceeded("quota spent"), "RESOURCE_EXHAUSTED"),
        (ResourceExhausted("no room"), "RESOURCE_EXHAUSTED"),
        (InvalidInput("INPUT0 has the wrong shape"), "INVALID_ARGUMENT"),
        (Unavailable("connection refused"), "UNAVAILABLE"),
    ],
)
def test_other_failures_are_named_by_their_status(error: Exception, name: str) -> None:
    assert sc.failure_name(error) == name


def test_failures_are_read_from_the_object_or_its_text_alike() -> None:
    """On a distributed run's master locust holds each failure as its ``repr`` text;
    read as the object only, none matched ``expected_failures`` and the run exited 1."""
    failure = sc.StatusFailure("RESOURCE_EXHAUSTED")
    text = repr(failure)  # what locust's StatsError.parse_error sends to the master
    assert text == "StatusFailure('RESOURCE_EXHAUSTED')"
    assert sc.failure_code(failure) == sc.failure_code(text) == "RESOURCE_EXHAUSTED"
    assert sc.failure_code(repr(sc.StatusFailure("MESSAGE_TOO_LARGE"))) == "MESSAGE_TOO_LARGE"
    assert sc.unexpected_failures([text, failure], ("RESOURCE_EXHAUSTED",)) == []
    other = "ConnectionError('boom')"  # not ours: its text, never an expected name
    assert sc.unexpected_failures([text, other], ("RESOURCE_EXHAUSTED",)) == [other]


def _scenario(tmp_path: Path, **model: Any) -> Any:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({"target": "127.0.0.1:1", "tenants": [
        {"id": "initech", "key": "k1", "models": [{"name": "classifier"}]},
        {"id": "globex", "key": "k2", "models": [{"name": "classifier", **model}]},
    ]}))  # fmt: skip
    return sc.scenario_from_env({"MANDANT_LOADTEST_CONFIG": str(path)})


@pytest.mark.parametrize("weight", [0, -1, 0.0, float("nan"), float("inf"), "many", True, None])
def test_a_model_weight_that_is_not_a_finite_number_above_0_is_refused(
    tmp_path: Path, weight: object
) -> None:
    """Model weights all 0 raised in ``random.choices`` on every call: the tenant made
    no call and was missing from the report."""
    with pytest.raises(ValueError, match=r"^tenant 'globex', model 'classifier': weight"):
        _scenario(tmp_path, weight=weight)


@pytest.mark.parametrize(("key", "value"), [("rows", 0), ("rows", 1.5), ("features", -3),
                                            ("features", "wide"), ("rows", True)])  # fmt: skip
def test_rows_and_features_must_be_whole_numbers_of_1_or_more(
    tmp_path: Path, key: str, value: object
) -> None:
    with pytest.raises(ValueError, match=rf"^tenant 'globex', model 'classifier': {key} "):
        _scenario(tmp_path, **{key: value})


def test_a_tenant_without_models_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"id": "acme", "key": "k", "models": []}]}))
    with pytest.raises(ValueError, match="tenant 'acme': no models"):
        sc.scenario_from_env({"MANDANT_LOADTEST_CONFIG": str(path)})


def test_model_entries_load_as_written(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, weight=0.25, rows=32.0, features=64, input="X")
    assert scenario.tenants[1].models == (sc.ModelLoad("classifier", 0.25, 32, "X", 64),)
    assert scenario.tenants[0].models == (sc.ModelLoad("classifier"),)


def test_the_environment_scenario_is_checked_alike() -> None:
    env = {"MANDANT_TENANTS": "acme=a:3,initech=i", "MANDANT_MODELS": "classifier:3,echo:0"}
    with pytest.raises(ValueError, match=r"^tenant 'acme', model 'echo': weight 0 "):
        sc.scenario_from_env(env)
    scenario = sc.scenario_from_env({**env, "MANDANT_MODELS": "classifier:3,echo",
                                     "MANDANT_ROWS": "4", "MANDANT_TARGET": "h:1"})  # fmt: skip
    assert scenario.target == "h:1"
    assert [(t.id, t.key, t.weight) for t in scenario.tenants] == [("acme", "a", 3),
                                                                  ("initech", "i", 1)]  # fmt: skip
    assert scenario.tenants[0].models == (sc.ModelLoad("classifier", 3.0, 4),
                                          sc.ModelLoad("echo", 1.0, 4))  # fmt: skip


def test_the_noisy_neighbour_scenario_loads() -> None:
    scenario = sc.scenario_from_env({"MANDANT_LOADTEST_CONFIG": str(sc.DEFAULT_SCENARIO)})
    assert scenario.expected_failures == ("RESOURCE_EXHAUSTED",)
    assert [t.id for t in scenario.tenants] == ["acme", "initech", "globex"]
