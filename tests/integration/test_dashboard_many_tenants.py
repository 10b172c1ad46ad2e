"""The dashboard with 300 tenants in the configuration: ``/api/dashboard`` lists every
tenant once, worst burn rate first, with no made-up figure for a tenant without calls;
one tenant's history and rejections (by reason and model) come with ``?tenant=``; a
tenant key sees only itself. Then in a real headless Chromium (driven over the
DevTools protocol, typing and clicking as a user): the table's 300 rows in that order,
the filter narrowing it, a click opening one tenant's charts, a tenant key opening its
own, and no "-999", "NaN" or "undefined" anywhere on the page.

Burn rates are set by the configuration, not by timing: a tenant whose SLO latency is
1 µs has every call bad, so its burn rate is exactly 1 / (1 - objective)."""

from __future__ import annotations

import asyncio
import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import Client, RateLimited
from tests.integration.cdp import CHROMIUM, browser_page
from tests.servers import DEMO_CONFIG, ServerThread

ADMIN_KEY = "many-tenants-admin-key"
IDS = [f"tenant-{i:03d}" for i in range(300)]
BAD = 0.001  # ms: no call is this fast, so every call misses the SLO
#: tenant → (SLO, calls made); burn rate = bad fraction / (1 - objective)
TRAFFIC: dict[str, tuple[dict[str, float] | None, int]] = {
    "tenant-137": ({"latency_ms": BAD, "objective": 0.99}, 5),  # burn 100 (3 OK, 2 refused)
    "tenant-042": ({"latency_ms": BAD, "objective": 0.9}, 3),  # burn 10
    "tenant-250": ({"latency_ms": BAD, "objective": 0.5}, 3),  # burn 2
    "tenant-001": ({"latency_ms": 60_000, "objective": 0.99}, 3),  # burn 0
    "tenant-299": (None, 2),  # no SLO: nothing to judge
}
#: Worst first; then every tenant with nothing to judge, by id.
ORDER = ["tenant-137", "tenant-042", "tenant-250", "tenant-001"] + [
    t for t in IDS if t not in ("tenant-137", "tenant-042", "tenant-250", "tenant-001")
]
SENTINELS = ("-999", "999 %", "NaN", "undefined", "Infinity")


def key_of(tenant: str) -> str:
    return f"key-{tenant}"


def many_tenants_config() -> Any:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0,
                      "admin_keys": [hash_key(ADMIN_KEY)]}  # fmt: skip
    data["models"] = [m for m in data["models"] if m.get("name") == "echo"]
    tenants = []
    for tenant in IDS:
        slo, _ = TRAFFIC.get(tenant, ({"latency_ms": 50, "objective": 0.99}, 0))
        entry: dict[str, Any] = {"id": tenant, "api_keys": [hash_key(key_of(tenant))]}
        if slo is not None:
            entry["slo"] = slo
        tenants.append(entry)
    # tenant-137's own limit on echo refuses its last two calls.
    tenants[137]["models"] = {"echo": {"rate_limit": {"requests_per_s": 0.001, "burst": 3}}}
    data["tenants"] = tenants
    return parse_config(data, str(DEMO_CONFIG))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(many_tenants_config(), tmp_path_factory.mktemp("many")) as server:
        x = np.ones((1, 4), np.float32)
        for tenant, (_, calls) in TRAFFIC.items():
            with Client(server.target, api_key=key_of(tenant), timeout_s=10) as client:
                for _ in range(calls):
                    try:
                        client.infer("echo", {"INPUT0": x})
                    except RateLimited:
                        assert tenant == "tenant-137"
        yield server


def http(
    server: ServerThread, path: str, key: str | None = None, gzipped: bool = False
) -> tuple[int, bytes, dict[str, str]]:
    assert server.app is not None
    request = urllib.request.Request(f"http://127.0.0.1:{server.app.http_port}{path}")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    if gzipped:
        request.add_header("Accept-Encoding", "gzip")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def strict_json(body: bytes) -> Any:
    """JSON that refuses NaN and Infinity (Python's parser would take them)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the dashboard's data")

    return json.loads(body, parse_constant=refuse)


def test_overview_lists_every_tenant_worst_burn_first(server: ServerThread) -> None:
    status, body, _ = http(server, "/api/dashboard", key=ADMIN_KEY)
    assert status == 200
    data = strict_json(body)
    rows = data["tenants"]
    assert [t["id"] for t in rows] == ORDER
    burn = {t["id"]: t["windows"]["5m"]["burn_rate"] for t in rows if t["windows"]}
    assert burn["tenant-137"] == pytest.approx(100.0)
    assert burn["tenant-042"] == pytest.approx(10.0)
    assert burn["tenant-250"] == pytest.approx(2.0)
    assert burn["tenant-001"] == 0.0
    idle = next(t for t in rows if t["id"] == "tenant-100")
    for window in ("5m", "1h"):  # no calls: no attainment, no burn, no budget
        assert idle["windows"][window] == {"good": 0, "total": 0, "attainment": None,
                                           "burn_rate": None, "budget_left": None}  # fmt: skip
    assert idle["p50_ms"] is None and idle["p99_ms"] is None and idle["rps"] == 0.0
    assert next(t for t in rows if t["id"] == "tenant-299")["windows"] is None
    worst = rows[0]
    assert worst["requests"] == 3 and worst["windows"]["1h"]["budget_left"] == pytest.approx(-99)
    assert worst["rejections"] == [{"reason": "requests_per_s", "model": "echo", "count": 2}]
    assert all("history" not in t for t in rows)  # the overview carries no chart data
    # Sent gzipped to a client that accepts it (a browser does).
    status, zipped, headers = http(server, "/api/dashboard", key=ADMIN_KEY, gzipped=True)
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert [t["id"] for t in strict_json(gzip.decompress(zipped))["tenants"]] == ORDER
    print(f"\n/api/dashboard, 300 tenants: {len(body)} bytes, {len(zipped)} gzipped")


def test_one_tenants_history_and_rejections_by_model(server: ServerThread) -> None:
    status, body, _ = http(server, "/api/dashboard?tenant=tenant-137", key=ADMIN_KEY)
    assert status == 200
    tenant = strict_json(body)["tenant"]
    assert tenant["id"] == "tenant-137" and len(tenant["history"]) == 60
    assert sum(p["p99_ms"] is not None for p in tenant["history"]) >= 1
    assert tenant["rejections"] == [{"reason": "requests_per_s", "model": "echo", "count": 2}]
    status, body, _ = http(server, "/metrics", key=ADMIN_KEY)
    assert (b'mandant_rejections_total{model="echo",reason="requests_per_s",'
            b'tenant="tenant-137"} 2.0') in body  # fmt: skip
    status, body, _ = http(server, "/api/dashboard?tenant=tenant-invented", key=ADMIN_KEY)
    assert status == 404 and b"invented" not in body


def test_a_tenant_key_sees_itself_only(server: ServerThread) -> None:
    status, body, _ = http(server, "/api/dashboard", key=key_of("tenant-042"))
    assert status == 200
    assert [t["id"] for t in strict_json(body)["tenants"]] == ["tenant-042"]
    status, body, _ = http(server, "/api/dashboard?tenant=tenant-042", key=key_of("tenant-042"))
    assert status == 200 and strict_json(body)["tenant"]["id"] == "tenant-042"
    # Another tenant's figures: the same 404 as a tenant that does not exist.
    status, body, _ = http(server, "/api/dashboard?tenant=tenant-137", key=key_of("tenant-042"))
    assert status == 404 and b"137" not in body
    status, body, _ = http(server, "/api/dashboard?tenant=tenant-137")
    assert status == 401 and b"137" not in body


ROWS = "[...document.querySelectorAll('#tenant-table tbody tr')].map(r => r.dataset.tenant)"
DETAIL_LOADED = "!!document.querySelector('#detail[data-loaded][data-tenant=\"{}\"]:not([hidden])')"


def field(selector: str) -> str:
    return f"document.querySelector({json.dumps(selector)}).textContent"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium missing: `make test` installs it")
def test_table_filter_and_drill_down_in_chromium(server: ServerThread, tmp_path: Path) -> None:
    assert server.app is not None
    page_url = f"http://127.0.0.1:{server.app.http_port}/"

    async def drive() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with browser_page(tmp_path / "admin") as page:
            await page.goto(page_url + "#key=" + ADMIN_KEY)
            await page.wait_for("document.body.dataset.loaded === 'true'")
            seen["rows"] = await page.eval(ROWS)
            seen["shown"] = await page.eval(field("#shown"))
            seen["render_ms"] = await page.eval("document.body.dataset.renderMs")
            seen["worst"] = {
                name: await page.eval(field(f"tr[data-tenant='tenant-137'] td[data-field={name}]"))
                for name in ("burn_rate_5m", "attainment_5m", "budget_left_1h", "rejections")
            }
            seen["idle"] = {
                name: await page.eval(field(f"tr[data-tenant='tenant-100'] td[data-field={name}]"))
                for name in ("burn_rate_5m", "attainment_5m", "budget_left_1h", "p50_ms")
            }
            seen["text"] = await page.eval("document.body.innerText")
            await page.type("#filter", "tenant-13")
            seen["filtered"] = await page.eval(ROWS)
            seen["shown_filtered"] = await page.eval(field("#shown"))
            await page.click("tr[data-tenant='tenant-137']")
            await page.wait_for(DETAIL_LOADED.format("tenant-137"))
            seen["hash"] = await page.eval("location.hash")
            seen["points"] = await page.eval(
                "Object.fromEntries([...document.querySelectorAll('#detail path[data-series]')]"
                ".map(p => [p.dataset.series, +p.dataset.points]))"
            )
            seen["ticks"] = await page.eval(
                "[...document.querySelectorAll('#detail text.y-tick')].map(t => t.textContent)"
            )
            seen["rejections"] = await page.eval(
                "[...document.querySelectorAll('#detail tr[data-reason]')]"
                ".map(r => [r.dataset.reason, r.dataset.model, r.lastChild.textContent])"
            )
            seen["detail_burn"] = await page.eval(field("#detail [data-field=burn_rate_5m]"))
            seen["detail_text"] = await page.eval("document.body.innerText")
        async with browser_page(tmp_path / "tenant") as page:
            await page.goto(page_url + "#key=" + key_of("tenant-042"))
            await page.wait_for(DETAIL_LOADED.format("tenant-042"))
            seen["own_rows"] = await page.eval(ROWS)
            seen["own_html"] = await page.eval("document.documentElement.outerHTML")
            seen["own_text"] = await page.eval("document.body.innerText")
        return seen

    seen = asyncio.run(drive())
    assert seen["rows"] == ORDER and seen["shown"] == "300 of 300 tenants"
    assert seen["worst"] == {"burn_rate_5m": "100.0×", "attainment_5m": "0.00 %",
                             "budget_left_1h": "none · 100.0× spent",
                             "rejections": "2 (requests_per_s on echo)"}  # fmt: skip
    assert seen["idle"] == {"burn_rate_5m": "—", "attainment_5m": "—",
                            "budget_left_1h": "—", "p50_ms": "—"}  # fmt: skip
    assert seen["filtered"] == ["tenant-137"] + [f"tenant-13{i}" for i in range(10) if i != 7]
    assert seen["shown_filtered"] == "10 of 300 tenants"
    assert seen["hash"] == "#tenant=tenant-137"
    assert seen["points"]["p99_ms"] >= 1 and seen["points"]["rps"] >= 1
    assert seen["ticks"] and all(t.endswith((" ms", "/s")) for t in seen["ticks"])
    assert seen["rejections"] == [["requests_per_s", "echo", "2"]]
    assert seen["detail_burn"] == "100.0×"
    for text in (seen["text"], seen["detail_text"], seen["own_text"]):
        assert not [s for s in SENTINELS if s in text]
    assert seen["own_rows"] == ["tenant-042"]
    assert not [t for t in IDS if t != "tenant-042" and t in seen["own_html"]]
    print(f"\n300-tenant table rendered in {seen['render_ms']} ms")
