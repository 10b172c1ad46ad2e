"""The built-in dashboard in a real headless Chromium while traffic flows: without a
key it asks for one and names nobody; with the admin key (from the URL fragment) every
tenant's row shows latency, SLO attainment, burn rate and throughput, and the tenant
the fragment opens shows its drawn latency and throughput lines and its rejections,
read from the rendered DOM; a screenshot is saved under the test's tmp dir (and to
``$MANDANT_SCREENSHOT`` when set, which is how docs/dashboard.png is made)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from mandant.config import parse_config
from mandant_client import Client, MandantClientError
from tests.servers import DEMO_CONFIG, DEMO_KEYS, ServerThread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: A duration as the dashboard's ``fmtMs`` writes it: milliseconds, or seconds from 1 s.
DURATION = re.compile(r"\d (ms|s)$")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium missing: `make test` installs Debian's chromium"
)
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=4000",
)  # fmt: skip
#: tenant → (rows per call, pause between calls in s, callers)
ADMIN_DEMO_KEY = "admin-demo-key"
LOAD = {"acme": (32, 0.0, 3), "globex": (4, 0.01, 1), "initech": (1, 0.005, 1)}


class Cards(HTMLParser):
    """Collects, per table row ``tr[data-tenant]`` (as ``row:<id>``) and per open tenant
    ``section[data-tenant]`` (as ``detail:<id>``), each ``[data-field]`` text and the
    number of points drawn in each chart series."""

    def __init__(self) -> None:
        super().__init__()
        self.tenants: dict[str, dict[str, str]] = {}
        self._tenant: str | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("section", "tr") and a.get("data-tenant"):
            self._tenant = ("row:" if tag == "tr" else "detail:") + (a["data-tenant"] or "")
            self.tenants[self._tenant] = {}
        elif self._tenant and a.get("data-field"):
            self._field = a["data-field"]
            self.tenants[self._tenant][self._field or ""] = ""
        elif self._tenant and tag == "path" and a.get("data-series"):
            self.tenants[self._tenant]["points:" + (a["data-series"] or "")] = (
                a.get("data-points") or "0"
            )
        elif tag in ("section", "tr"):
            self._tenant = None

    def handle_data(self, data: str) -> None:
        if self._tenant and self._field:
            self.tenants[self._tenant][self._field] += data.strip()

    def handle_endtag(self, tag: str) -> None:
        self._field = None
        if tag == "tr" and self._tenant and self._tenant.startswith("row:"):
            self._tenant = None


def browser_config() -> object:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
    for tenant in data["tenants"]:
        if tenant["id"] == "acme":  # the flood gets rejections to show
            # Well under what acme's callers send even on a loaded host: most of the
            # flood is refused at once (cheap), leaving the server time for the page.
            tenant["rate_limit"] = {"requests_per_s": 30, "burst": 10}
    return parse_config(data, str(DEMO_CONFIG))


@pytest.fixture
def busy_server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(browser_config(), tmp_path / "models") as server:  # type: ignore[arg-type]
        stop = threading.Event()

        def call(tenant: str, rows: int, pause_s: float) -> None:
            batch = np.random.default_rng(1).random((rows, 256), np.float32)
            with Client(server.target, api_key=DEMO_KEYS[tenant], timeout_s=10) as client:
                while not stop.is_set():
                    try:
                        client.infer("classifier", {"INPUT0": batch})
                    except MandantClientError:
                        time.sleep(0.005)
                    if pause_s:
                        time.sleep(pause_s)

        threads = [
            threading.Thread(target=call, args=(tenant, rows, pause), daemon=True)
            for tenant, (rows, pause, callers) in LOAD.items()
            for _ in range(callers)
        ]
        for thread in threads:
            thread.start()
        # A few seconds of traffic before the page loads (longer for the docs picture),
        # and at least one of acme's rejections for it to show.
        try:
            time.sleep(float(os.environ.get("MANDANT_DASHBOARD_WARMUP_S", "3")))
            assert server.app is not None
            rejected = {"tenant": "acme", "reason": "requests_per_s", "model": ""}
            deadline = time.monotonic() + 60
            while not server.app.metrics.get_sample_value("mandant_rejections_total", rejected):
                assert time.monotonic() < deadline, "acme's flood was never rate limited"
                time.sleep(0.05)
            yield server
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_dashboard_shows_every_tenant_live(busy_server: ServerThread, tmp_path: Path) -> None:
    assert busy_server.app is not None
    page = f"http://127.0.0.1:{busy_server.app.http_port}/"
    # Without a key the page asks for one and shows no tenant.
    result = chromium(page, tmp_path / "profile-anon", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data-loaded="true"' not in result.stdout and "a key is needed" in result.stdout
    anonymous = Cards()
    anonymous.feed(result.stdout)
    assert anonymous.tenants == {}
    # The fragment never reaches the server; it opens acme's charts below the table.
    url = page + "#key=" + ADMIN_DEMO_KEY + "&tenant=acme"
    result = chromium(url, tmp_path / "profile-dom", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'data-loaded="true"' in result.stdout, "the page never rendered its data"
    cards = Cards()
    cards.feed(result.stdout)
    rows = {k.removeprefix("row:"): v for k, v in cards.tenants.items() if k.startswith("row:")}
    assert set(rows) == {"acme", "globex", "initech"}
    for tenant, fields in rows.items():
        # fmtMs writes a second or more as seconds: a loaded box's p99 was "1.58 s".
        assert DURATION.search(fields["p50_ms"]), (tenant, fields)
        assert fields["p99_ms"].startswith("p99 ") and DURATION.search(fields["p99_ms"])
        assert fields["attainment_5m"].endswith(" %"), (tenant, fields)
        assert fields["burn_rate_5m"].endswith("×"), (tenant, fields)
        assert fields["rps"].endswith("/s") and fields["rps"] != "0.00/s", (tenant, fields)
    acme = cards.tenants["detail:acme"]
    assert DURATION.search(acme["p99_ms"]) and acme["attainment_5m"].endswith(" %"), acme
    assert int(acme["points:p99_ms"]) >= 1 and int(acme["points:rps"]) >= 1, acme
    assert 'data-reason="requests_per_s"' in result.stdout  # acme's rejections, by reason
    assert 'data-model="classifier"' in result.stdout and 'class="bar"' in result.stdout
    assert "-999" not in result.stdout and "NaN" not in result.stdout

    shot = tmp_path / "dashboard.png"
    result = chromium(url, tmp_path / "profile-shot", "--window-size=1400,1500",
                      f"--screenshot={shot}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    target = os.environ.get("MANDANT_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
