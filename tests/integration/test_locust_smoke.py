"""A 10-second headless locust run of the noisy-neighbour scenario against a test
server: every tenant's calls go through, and the only failures are those the
scenario provokes (acme, rate limited, gets RESOURCE_EXHAUSTED), and locust exits 0 as
the locustfile's own command runs it (without ``--exit-code-on-error 0``, which made
`make loadtest` pass where that command exited 1)."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mandant.config import MandantConfig, parse_config
from tests.servers import DEMO_CONFIG, ROOT, ServerThread, free_port

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
SCENARIO = ROOT / "loadtests" / "noisy_neighbour.yaml"
LOCUST = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]


def _rate_limited_acme() -> MandantConfig:
    """The demo configuration on port 0, acme rate limited (it will be refused)."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
    for tenant in data["tenants"]:
        if tenant["id"] == "acme":
            tenant["rate_limit"] = {"requests_per_s": 20, "burst": 5}
    return parse_config(data, str(DEMO_CONFIG))


def _failure_names(prefix: Path) -> list[str]:
    """The failure names in locust's failures CSV (``StatusFailure('NAME')``)."""
    with open(f"{prefix}_failures.csv") as file:
        return [row["Error"].strip("'\"").split("(")[-1].strip("')\"")
                for row in csv.DictReader(file)]  # fmt: skip


@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed"
)  # never imported here: it monkey-patches the process with gevent
def test_noisy_neighbour_smoke(tmp_path: Path) -> None:
    with ServerThread(_rate_limited_acme(), tmp_path / "models") as server:
        env = {**os.environ, "MANDANT_TARGET": server.target,
               "MANDANT_LOADTEST_CONFIG": str(SCENARIO)}  # fmt: skip
        prefix = tmp_path / "smoke"
        result = subprocess.run(
            [*LOCUST, "--headless", "-u", "6", "-r", "6", "-t", "5s", "--csv", str(prefix),
             "--html", str(tmp_path / "smoke.html"), "--only-summary",
             "--stop-timeout", "5"],
            capture_output=True, text=True, timeout=90, env=env, cwd=ROOT,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as file:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(file)}
    failures = _failure_names(prefix)
    expected = set(yaml.safe_load(SCENARIO.read_text())["expected_failures"])
    assert failures  # the rate limit was reached: exit 0 above is the scenario's rule
    assert set(failures) <= expected, failures
    for tenant, model in (("acme", "classifier"), ("acme", "echo"),
                          ("initech", "classifier"), ("globex", "classifier")):  # fmt: skip
        row = stats[(tenant, model)]
        assert int(row["Request Count"]) > 0, row
    # The light tenants are never refused, whatever the heavy one does.
    for tenant in ("initech", "globex"):
        assert int(stats[(tenant, "classifier")]["Failure Count"]) == 0
    assert (tmp_path / "smoke.html").stat().st_size > 10_000


#: Imports the locustfile with the scenario named by its first argument, in a process
#: of its own (locust monkey-patches with gevent), and prints what it made of it.
_INSPECT = """
import os, sys
os.environ["MANDANT_LOADTEST_CONFIG"] = sys.argv[1]
sys.path.insert(0, os.path.dirname(sys.argv[2]))
try:
    import locustfile
except ValueError as exc:
    print("refused:", exc)
    raise SystemExit(0)
from locust.env import Environment
for name, cls in sorted(vars(locustfile).items()):
    if name.startswith("Tenant_"):
        user = cls(Environment(user_classes=[cls]))
        user.on_start()
        print(name, cls.tenant.id, [user._inputs[m]["INPUT0"].shape[0] for m in user._models])
        user.on_stop()
"""


def _inspect(tmp_path: Path, scenario: dict[str, object]) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    result = subprocess.run(
        [sys.executable, "-c", _INSPECT, str(path), str(LOCUSTFILE)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_scenario_entries_are_sent_and_tenants_run_as_written(tmp_path: Path) -> None:
    """A model listed twice (1 row and 32) sent 32 rows every call while locust reported
    each entry's rows; ``team-a`` and ``team_a`` made one user class (one tenant never
    ran); ``weight: 0.5`` made no user at all, silently."""
    models = [{"name": "classifier", "rows": 1, "weight": 3}, {"name": "classifier", "rows": 32}]
    out = _inspect(tmp_path, {"target": "127.0.0.1:1", "tenants": [
        {"id": "team-a", "key": "a", "models": models},
        {"id": "team_a", "key": "b", "models": [{"name": "echo", "rows": 2}]},
    ]})  # fmt: skip
    assert "Tenant_team_a team-a [1, 32]" in out and "team_a [2]" in out, out
    fractional = {"id": "acme", "key": "a", "weight": 0.5, "models": [{"name": "echo"}]}
    out = _inspect(tmp_path, {"target": "127.0.0.1:1", "tenants": [fractional]})
    assert "refused: tenant 'acme': weight 0.5 is a share of locust users" in out


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_failures_the_scenario_does_not_expect_fail_the_run(tmp_path: Path) -> None:
    """Every call failing UNAVAILABLE (no server there) exited 0 with
    ``--exit-code-on-error 0``, as `make loadtest` ran it then."""
    env = {**os.environ, "MANDANT_TARGET": "127.0.0.1:1",
           "MANDANT_LOADTEST_CONFIG": str(SCENARIO)}  # fmt: skip
    result = subprocess.run(
        [*LOCUST, "--headless", "-u", "2", "-r", "2", "-t", "1s", "--only-summary",
         "--exit-code-on-error", "0"],
        capture_output=True, text=True, timeout=90, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "failures the scenario does not expect: UNAVAILABLE" in result.stdout + result.stderr


def _locust(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """locust in a session of its own (killed as a group if the test times out)."""
    return subprocess.Popen([*LOCUST, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_distributed_run_passes_with_expected_failures(tmp_path: Path) -> None:
    """A master and one worker: the master holds each failure as text
    (``StatusFailure('RESOURCE_EXHAUSTED')``), matched none of ``expected_failures``,
    and exited 1 on every run whose only failures were the rate limit it set out to
    reach."""
    scenario = tmp_path / "limited.yaml"
    scenario.write_text(yaml.safe_dump({
        "expected_failures": ["RESOURCE_EXHAUSTED"],
        "tenants": [
            {"id": "acme", "key": "acme-demo-key", "wait_s": [0.01, 0.02],
             "models": [{"name": "echo", "rows": 2, "features": 4}]},
            {"id": "initech", "key": "initech-demo-key", "wait_s": [0.05, 0.1],
             "models": [{"name": "classifier", "rows": 1}]},
        ],
    }))  # fmt: skip
    port = str(free_port())
    prefix = tmp_path / "dist"
    with ServerThread(_rate_limited_acme(), tmp_path / "models") as server:
        env = {**os.environ, "MANDANT_TARGET": server.target,
               "MANDANT_LOADTEST_CONFIG": str(scenario)}  # fmt: skip
        master = _locust(
            ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
             "--headless", "--expect-workers", "1", "--expect-workers-max-wait", "30",
             "-u", "2", "-r", "2", "-t", "3s", "--csv", str(prefix), "--only-summary",
             "--stop-timeout", "5"], env,
        )  # fmt: skip
        worker = _locust(["--worker", "--master-host", "127.0.0.1", "--master-port", port], env)
        try:
            master_out, _ = master.communicate(timeout=60)
            worker_out, _ = worker.communicate(timeout=15)
        finally:
            for process in (master, worker):
                if process.poll() is None:  # a timeout: neither outlives the test
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    assert master.returncode == 0, master_out[-3000:] + worker_out[-2000:]
    assert "does not expect" not in master_out, master_out[-3000:]
    with open(f"{prefix}_stats.csv") as file:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(file)}
    assert int(stats[("initech", "classifier")]["Request Count"]) > 0
    assert int(stats[("initech", "classifier")]["Failure Count"]) == 0
    assert int(stats[("acme", "echo")]["Failure Count"]) > 0
    assert set(_failure_names(prefix)) == {"RESOURCE_EXHAUSTED"}
