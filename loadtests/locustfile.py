"""locust load test for Mandant over ``mandant_client``.

One locust ``User`` class per tenant (weights from the scenario), each calling its
models by weight and reporting every call to locust's request event: ``request_type``
is the tenant, ``name`` the model, ``response_time`` in ms, ``exception`` the gRPC
status name of a failed call (``RESOURCE_EXHAUSTED``, ``DEADLINE_EXCEEDED``, …).

Scenario: ``MANDANT_LOADTEST_CONFIG`` (a YAML file, default: noisy_neighbour.yaml
next to this file), or entirely from the environment::

    MANDANT_TENANTS="acme=acme-demo-key:3,initech=initech-demo-key:1"
    MANDANT_MODELS="classifier:3,echo:1"      # name:weight, every tenant calls them
    MANDANT_ROWS=8                              # rows per call

``MANDANT_TARGET`` (host:port) overrides the scenario's target. Run headless::

    locust -f loadtests/locustfile.py --headless -u 20 -r 20 -t 60s

A failure whose status the scenario's ``expected_failures`` does not name makes locust
exit 1 (a run where every call failed UNAVAILABLE exited 0); a run whose failures are
all expected exits 0 (locust's own rule, any failure exits 1, made the command above
fail a rate-limited scenario that did what it should). Ctrl-C stops the run as
SIGTERM does (a KeyboardInterrupt raised inside a gevent-mode gRPC call printed a
traceback, and now and then left locust hanging after its summary). The CSV report gets
its last rows before locust exits (it is written once a second, and missed the run's
last second).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc's blocking calls must yield to gevent, or users serialize

import gevent  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from mandant_client import Client, MandantClientError  # noqa: E402

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "noisy_neighbour.yaml"


class StatusFailure(Exception):
    """A failed call, named by its gRPC status (what locust groups failures by)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class ModelLoad:
    name: str
    weight: float = 1.0
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


def _users(tenant_id: str, weight: object) -> int:
    """A tenant's share of locust users: a whole number, 1 or more."""
    if isinstance(weight, bool) or not isinstance(weight, int | float | str):
        raise ValueError(f"tenant {tenant_id!r}: weight {weight!r} is not a number")
    number = float(weight)
    if number < 1 or number != int(number):
        raise ValueError(
            f"tenant {tenant_id!r}: weight {weight} is a share of locust users, a whole "
            "number of 1 or more"
        )
    return int(number)


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split(":", 1)) if ":" in item else (item, "1")  # type: ignore[misc]
            for item in text.split(",") if item.strip()]  # fmt: skip


def scenario_from_env(env: dict[str, str]) -> Scenario:
    """The scenario: the YAML file, or MANDANT_TENANTS / MANDANT_MODELS when set."""
    if "MANDANT_TENANTS" in env:
        rows = int(env.get("MANDANT_ROWS", "8"))
        models = tuple(
            ModelLoad(name.strip(), float(weight), rows)
            for name, weight in _pairs(env.get("MANDANT_MODELS", "classifier"))
        )
        tenants = []
        for spec, weight in _pairs(env["MANDANT_TENANTS"]):
            tenant_id, _, key = spec.partition("=")
            tenant_id = tenant_id.strip()
            tenants.append(
                TenantLoad(tenant_id, key.strip(), _users(tenant_id, weight), models=models)
            )
        data: dict[str, Any] = {"target": "127.0.0.1:8001"}
        scenario = Scenario(data["target"], tuple(tenants))
    else:
        path = Path(env.get("MANDANT_LOADTEST_CONFIG", str(DEFAULT_SCENARIO)))
        data = yaml.safe_load(path.read_text())
        scenario = Scenario(
            data.get("target", "127.0.0.1:8001"),
            tuple(
                TenantLoad(
                    t["id"], t["key"], _users(t["id"], t.get("weight", 1)),
                    tuple(t.get("wait_s", (0.0, 0.0))),  # type: ignore[arg-type]
                    tuple(ModelLoad(**m) for m in t["models"]),
                )
                for t in data["tenants"]
            ),
            tuple(data.get("expected_failures", ())),
        )  # fmt: skip
    target = env.get("MANDANT_TARGET")
    if target:
        scenario = Scenario(target, scenario.tenants, scenario.expected_failures)
    return scenario


class MandantUser(User):
    """Calls one tenant's models through ``mandant_client.Client``."""

    abstract = True
    tenant: TenantLoad
    target: str

    def on_start(self) -> None:
        self.client = Client(self.target, api_key=self.tenant.key, timeout_s=30)
        self._models = list(self.tenant.models)
        self._weights = [m.weight for m in self._models]
        # By entry, not by name: a model listed twice (small and large calls) sent the
        # last entry's size for both, while locust reported each entry's rows.
        self._inputs = {
            m: {m.input: np.random.default_rng(0).random((m.rows, m.features), np.float32)}
            for m in self._models
        }

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        model = random.choices(self._models, self._weights)[0]
        start = time.perf_counter()
        exception: Exception | None = None
        try:
            self.client.infer(model.name, self._inputs[model])
        except MandantClientError as exc:
            exception = StatusFailure(exc.code.name)
        events.request.fire(
            request_type=self.tenant.id,
            name=model.name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=model.rows,
            exception=exception,
            context={"tenant": self.tenant.id},
        )


def _user_classes(scenario: Scenario) -> dict[str, type[MandantUser]]:
    classes: dict[str, type[MandantUser]] = {}
    for tenant in scenario.tenants:
        name = "Tenant_" + "".join(c if c.isalnum() else "_" for c in tenant.id)
        if name in classes:  # team-a and team_a: the second replaced the first
            name = f"{name}_{len(classes)}"
        classes[name] = type(
            name,
            (MandantUser,),
            {
                "abstract": False,
                "tenant": tenant,
                "target": scenario.target,
                "weight": tenant.weight,
                "wait_time": between(*tenant.wait_s),
            },
        )
    return classes


@events.init.add_listener
def _ctrl_c_as_sigterm(environment: Environment, **_: Any) -> None:
    gevent.signal_handler(signal.SIGINT, lambda: os.kill(os.getpid(), signal.SIGTERM))


@events.test_stop.add_listener
def _last_csv_rows(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # one more write of the CSV files


@events.quitting.add_listener
def _fail_on_unexpected(environment: Environment, **_: Any) -> None:
    failed = {getattr(e.error, "code", str(e.error)) for e in environment.stats.errors.values()}
    unexpected = sorted(failed - set(SCENARIO.expected_failures))
    if unexpected:
        print(f"failures the scenario does not expect: {', '.join(unexpected)}")
        environment.process_exit_code = 1
    elif failed:  # every one expected (a rate limit the scenario sets out to reach)
        environment.process_exit_code = 0


SCENARIO = scenario_from_env(dict(os.environ))
globals().update(_user_classes(SCENARIO))
