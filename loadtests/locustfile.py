"""locust load test for Mandant over ``mandant_client``.

One locust ``User`` class per tenant (weights from the scenario), each calling its
models by weight and reporting every call to locust's request event: ``request_type``
is the tenant, ``name`` the model, ``response_time`` in ms, ``exception`` the gRPC
status name of a failed call (``RESOURCE_EXHAUSTED``, ``DEADLINE_EXCEEDED``, …), or
``MESSAGE_TOO_LARGE`` for a message over gRPC's size limit, the one name that is not a
status (named RESOURCE_EXHAUSTED, as gRPC codes it, it passed as an expected rate limit
while every call failed). The scenario, its checks and these names are in
``scenario.py`` beside this file, which imports no gevent (the unit tests import it).

Scenario: ``MANDANT_LOADTEST_CONFIG`` (a YAML file, default: noisy_neighbour.yaml
next to this file), or entirely from the environment::

    MANDANT_TENANTS="acme=acme-demo-key:3,initech=initech-demo-key:1"
    MANDANT_MODELS="classifier:3,echo:1"      # name:weight, every tenant calls them
    MANDANT_ROWS=8                              # rows per call

``MANDANT_TARGET`` (host:port) overrides the scenario's target. Run headless::

    locust -f loadtests/locustfile.py --headless -u 20 -r 20 -t 60s

A failure whose name the scenario's ``expected_failures`` does not list makes locust
exit 1 (a run where every call failed UNAVAILABLE exited 0); a run whose failures are
all expected exits 0 (locust's own rule, any failure exits 1, made the command above
fail a rate-limited scenario that did what it should), unless a task raised (setting
0 hid its exceptions). The same holds on a distributed run's master, where failures
arrive as text (read as objects only, none matched, and every such run exited 1). A
model entry whose weight is not a finite number above 0 (all 0: every call raised, and
the tenant was missing from the report), or whose rows or features are not whole
numbers of 1 or more, is refused when the scenario loads. Ctrl-C stops the run as
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
from typing import Any

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc's blocking calls must yield to gevent, or users serialize

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from mandant_client import Client, MandantClientError  # noqa: E402

# isort: split
# This file's folder, which locust puts on sys.path (whatever the working directory).
from scenario import (  # noqa: E402
    Scenario,
    StatusFailure,
    TenantLoad,
    failure_name,
    scenario_from_env,
    unexpected_failures,
)


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
            exception = StatusFailure(failure_name(exc))
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
    errors = [e.error for e in environment.stats.errors.values()]
    unexpected = unexpected_failures(errors, SCENARIO.expected_failures)
    if unexpected:
        print(f"failures the scenario does not expect: {', '.join(unexpected)}")
        environment.process_exit_code = 1
    elif errors and not (environment.runner and environment.runner.exceptions):
        # Every failure expected (a rate limit the scenario sets out to reach) and no
        # task raised: setting 0 while a task raised hid its exceptions.
        environment.process_exit_code = 0


SCENARIO = scenario_from_env(dict(os.environ))
globals().update(_user_classes(SCENARIO))
