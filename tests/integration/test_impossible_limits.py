"""Configurations that would refuse every call (a burst below one token, a queue cap
below the batch size) are refused by ``mandant check-config`` and by ``mandant serve``
at load, each problem with its field path and reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.servers import ECHO_MODEL, MANDANT, SUBPROCESS_ENV

IMPOSSIBLE = {
    "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
    "tenants": [
        {"id": "a", "rate_limit": {"requests_per_s": 10, "burst": 0.5}},
        {
            "id": "b",
            "rate_limit": {"rows_per_s": 100, "rows_burst": 0.25},
            "models": {"echo": {"rate_limit": {"requests_per_s": 1, "burst": 0.9}}},
        },
    ],
    "models": [{**ECHO_MODEL, "batching": {"max_batch_size": 16, "max_queue_rows": 8}}],
}
ERRORS = [
    "tenants.0.rate_limit.burst: must be at least 1: a call takes at least "
    "one token, so a smaller burst refuses every call",
    "tenants.1.rate_limit.rows_burst: must be at least 1",
    "tenants.1.models.echo.rate_limit.burst: must be at least 1",
    "models.0.batching: max_queue_rows (8) is below max_batch_size (16): "
    "calls the model accepts could never be queued",
]


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--config"]])
def test_check_config_and_serve_refuse_limits_no_call_can_meet(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "impossible.yaml"
    path.write_text(yaml.safe_dump(IMPOSSIBLE))
    out = subprocess.run(
        [*MANDANT, *command, str(path)],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout
    for error in ERRORS:
        assert error in out.stderr, out.stderr
