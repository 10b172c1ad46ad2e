"""The load test's scenario and the names of its failures, apart from locust.

Imports no gevent, locust or ``grpc.experimental.gevent`` (the locustfile, importing
them, monkey-patches the process), so the unit tests import this module and the
locustfile imports it from its own folder (locust puts that folder on ``sys.path``).

A failed call is named by its gRPC status (``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, …),
except a message over gRPC's size limit: gRPC says RESOURCE_EXHAUSTED for it, and
the client raises ``InvalidInput`` with that code. It is named
:data:`MESSAGE_TOO_LARGE`, the one name that is not a gRPC status: named
RESOURCE_EXHAUSTED, it passed as the rate limit a scenario expects, and a run whose
every call was too large (and can never succeed) exited 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from mandant_client import InvalidInput, MandantClientError

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "noisy_neighbour.yaml"
DEFAULT_TARGET = "127.0.0.1:8001"
#: The name of a failed call whose message is over gRPC's size limit.
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"


class StatusFailure(Exception):
    """A failed call, named by :func:`failure_name` (what locust groups failures by)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


#: ``repr`` of a :class:`StatusFailure`: how a failure reaches locust's master from a
#: worker (``StatsError.error`` is then a string, not the exception).
_STATUS_FAILURE_REPR = re.compile(rf"{StatusFailure.__name__}\('([A-Za-z_]+)'\)")


def failure_name(exc: MandantClientError) -> str:
    """The name a failed call is reported by: its status, or :data:`MESSAGE_TOO_LARGE`
    for ``InvalidInput`` with code RESOURCE_EXHAUSTED (the only retryable exhaustion,
    ``RateLimited``, ``QuotaExceeded`` and any other ``ResourceExhausted``, keeps the
    name RESOURCE_EXHAUSTED)."""
    if isinstance(exc, InvalidInput) and exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return MESSAGE_TOO_LARGE
    return str(exc.code.name)


def failure_code(error: object) -> str:
    """The failure name in a locust ``StatsError.error``: a :class:`StatusFailure` in a
    local run, its ``repr`` on a distributed run's master (read as the object only, no
    failure there matched ``expected_failures``, and every such run exited 1); any other
    error as its text."""
    if isinstance(error, StatusFailure):
        return error.code
    text = str(error)
    match = _STATUS_FAILURE_REPR.fullmatch(text.strip())
    return match.group(1) if match else text


def unexpected_failures(errors: Iterable[object], expected: Iterable[str]) -> list[str]:
    """The failure names among ``errors`` (locust's ``StatsError.error`` values) that
    ``expected`` does not name, sorted."""
    return sorted({failure_code(error) for error in errors} - set(expected))


@dataclass(frozen=True)
class ModelLoad:
    name: str
    weight: float = 1.0  # finite, > 0 (all 0: every call raised in random.choices)
    rows: int = 1
    input: str = "INPUT0"
    features: int = 256


@dataclass(frozen=True)
class TenantLoad:
    id: str
    key: str
    weight: int = 1  # locust users: a whole number (0.5 made none, silently)
    wait_s: tuple[float, float] = (0.0, 0.0)
    models: tuple[ModelLoad, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Scenario:
    target: str
    tenants: tuple[TenantLoad, ...]
    expected_failures: tuple[str, ...] = ()


def _number(where: str, what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where}: {what} {value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where}: {what} {value!r} is not a number") from None


def _users(tenant_id: str, weight: object) -> int:
    """A tenant's share of locust users: a whole number, 1 or more."""
    number = _number(f"tenant {tenant_id!r}", "weight", weight)
    if not math.isfinite(number) or number < 1 or number != int(number):
        raise ValueError(
            f"tenant {tenant_id!r}: weight {weight} is a share of locust users, a whole "
            "number of 1 or more"
        )
    return int(number)


def _model_load(tenant_id: str, entry: Mapping[str, Any]) -> ModelLoad:
    """One model entry, its weight a finite number above 0 and its rows and features
    whole numbers of 1 or more (a tenant whose model weights were all 0 raised in every
    call, made none, and was missing from the report)."""
    name = entry.get("name")
    where = f"tenant {tenant_id!r}, model {name!r}"
    weight = _number(where, "weight", entry.get("weight", 1.0))
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(
            f"{where}: weight {entry.get('weight')} is the model's share of the tenant's "
            "calls, a finite number above 0"
        )
    sizes = {}
    for key in ("rows", "features"):
        number = _number(where, key, entry.get(key, getattr(ModelLoad, key)))
        if not math.isfinite(number) or number < 1 or number != int(number):
            raise ValueError(f"{where}: {key} {entry.get(key)} is not a whole number of 1 or more")
        sizes[key] = int(number)
    return ModelLoad(**{**entry, "weight": weight, **sizes})


def _tenant_models(tenant_id: str, entries: Iterable[Mapping[str, Any]]) -> tuple[ModelLoad, ...]:
    models = tuple(_model_load(tenant_id, entry) for entry in entries)
    if not models:
        raise ValueError(f"tenant {tenant_id!r}: no models to call")
    return models


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) if ":" in item else (item, "1")  # type: ignore[misc]
            for item in text.split(",") if item.strip()]  # fmt: skip


def scenario_from_env(env: Mapping[str, str]) -> Scenario:
    """The scenario: the YAML file, or MANDANT_TENANTS / MANDANT_MODELS when set.

    Raises ``ValueError`` for a tenant or model entry that could make no calls."""
    if "MANDANT_TENANTS" in env:
        rows = env.get("MANDANT_ROWS", "8")
        entries = [{"name": name.strip(), "weight": weight, "rows": rows}
                   for name, weight in _pairs(env.get("MANDANT_MODELS", "classifier"))]  # fmt: skip
        tenants = []
        for spec, weight in _pairs(env["MANDANT_TENANTS"]):
            tenant_id, _, key = spec.partition("=")
            tenant_id = tenant_id.strip()
            tenants.append(TenantLoad(tenant_id, key.strip(), _users(tenant_id, weight),
                                      models=_tenant_models(tenant_id, entries)))  # fmt: skip
        scenario = Scenario(DEFAULT_TARGET, tuple(tenants))
    else:
        path = Path(env.get("MANDANT_LOADTEST_CONFIG", str(DEFAULT_SCENARIO)))
        data = yaml.safe_load(path.read_text())
        scenario = Scenario(
            data.get("target", DEFAULT_TARGET),
            tuple(
                TenantLoad(
                    t["id"], t["key"], _users(t["id"], t.get("weight", 1)),
                    tuple(t.get("wait_s", (0.0, 0.0))),  # type: ignore[arg-type]
                    _tenant_models(t["id"], t["models"]),
                )
                for t in data["tenants"]
            ),
            tuple(data.get("expected_failures", ())),
        )  # fmt: skip
    target = env.get("MANDANT_TARGET")
    if target:
        scenario = Scenario(target, scenario.tenants, scenario.expected_failures)
    return scenario
