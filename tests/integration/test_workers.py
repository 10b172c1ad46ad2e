"""``workers: 2`` as processes (issue 11): a real supervisor, engine and two front ends
started by ``mandant serve``, called over loopback gRPC through several connections
(the kernel spreads connections, not calls, over the front ends).

What must hold whatever front end a call lands on: limits, quotas and concurrency caps
exact; weighted shares; metrics of every front end in one view; no tensor of one
tenant in another's answer. And the lifecycle: a front end killed outright fails only
its own calls and comes back; an engine killed outright makes every call UNAVAILABLE
until it is back; SIGTERM under load loses no accepted call; SIGHUP reaches every
process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import AsyncClient, Client, MandantClientError
from mandant_client._proto import grpc_service_pb2 as pb
from tests.integration.stalled_calls import StalledCalls
from tests.servers import (
    ECHO_MODEL,
    MANDANT,
    SUBPROCESS_ENV,
    WorkersServer,
    free_port,
    http_get_port,
    metric,
    wait_for_calls,
)

#: A connection of its own per client (grpc shares one between channels to one target).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
ROW = np.ones((1, 4), np.float32)
ADMIN_KEY = "admin-key"
#: Tenant ``limited``'s burst on its 100 requests/s.
LIMITED_BURST = 20


def _tenant(name: str, **settings: Any) -> dict[str, Any]:
    return {"id": name, "api_keys": [hash_key(f"{name}-key")], **settings}


def workers_config(grace_s: float = 5) -> MandantConfig:
    sleepy = {
        **ECHO_MODEL,
        "name": "sleepy",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 0.5},
    }
    paced = {
        **ECHO_MODEL,
        "name": "paced",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 0.01},
        "batching": {"max_batch_size": 4, "max_queue_rows": 4096},
    }
    return parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "grace_s": grace_s,
                "admin_keys": [hash_key(ADMIN_KEY)],
            },
            "tenants": [
                _tenant("acme"),
                _tenant("globex"),
                _tenant("light", weight=1, max_concurrency=64),
                _tenant("heavy", weight=3, max_concurrency=64),
                _tenant("limited", rate_limit={"requests_per_s": 100, "burst": LIMITED_BURST}),
                _tenant("budget", quota={"rows_per_day": 30}),
                _tenant("capped", max_concurrency=2),
                _tenant("billed"),
            ],
            "models": [ECHO_MODEL, sleepy, paced],
        },
        "test_workers",
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersServer]:
    with WorkersServer(workers_config(), tmp_path_factory.mktemp("workers")) as running:
        yield running


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[WorkersServer]:
    """A server of its own, for tests that leave their server changed or gone."""
    with WorkersServer(workers_config(), tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def _survivor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersServer]:
    with WorkersServer(workers_config(), tmp_path_factory.mktemp("survivor")) as running:
        yield running


@pytest.fixture
def survivor(_survivor: WorkersServer) -> WorkersServer:
    """One server for the tests that kill or stop one of its processes and wait for it
    to come back (a start of ``workers: 2`` costs about 9 s of CPU); each gets it with
    its engine and both front ends serving."""
    _wait_for_pids(_survivor, "engine", 1, set())
    _wait_for_front_ends_listening(_survivor, set())
    _serving(_survivor.target)
    return _survivor


@pytest.fixture
async def clients(server: WorkersServer) -> AsyncIterator[dict[str, list[AsyncClient]]]:
    """Eight connections per tenant."""
    made: dict[str, list[AsyncClient]] = {}
    for tenant in ("acme", "globex", "light", "heavy", "limited", "budget", "capped"):
        made[tenant] = [
            AsyncClient(server.target, f"{tenant}-key", timeout_s=30, options=OWN_CONNECTION)
            for _ in range(8)
        ]
    yield made
    for group in made.values():
        for client in group:
            await client.close()


def _sockets(pid: int, state: str = "01") -> list[tuple[int, int]]:
    """(local port, remote port) of the TCP sockets process ``pid`` holds in ``state``
    (01: established connections; 0A: listening)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and fields[9] in inodes:
                local, remote = (int(end.rsplit(":", 1)[1], 16) for end in fields[1:3])
                found.append((local, remote))
    return found


def _connections(pid: int, port: int, state: str = "01") -> int:
    """TCP sockets on local ``port`` held by process ``pid`` in ``state``."""
    return sum(local == port for local, _ in _sockets(pid, state))


async def _outcome(client: AsyncClient, model: str = "echo", rows: np.ndarray = ROW) -> str:
    try:
        await client.infer(model, {"INPUT0": rows})
    except MandantClientError as exc:
        return exc.code.name
    return "OK"


async def test_connections_spread_over_both_front_ends(
    server: WorkersServer, clients: dict[str, list[AsyncClient]]
) -> None:
    outcomes = await asyncio.gather(*(_outcome(c) for c in clients["acme"] + clients["globex"]))
    assert set(outcomes) == {"OK"}
    fronts = server.children()["front-end"]
    assert len(fronts) == 2
    held = [_connections(pid, server.grpc_port) for pid in fronts]
    assert sum(held) >= 16 and min(held) > 0, held


async def test_quota_is_exact_across_front_ends(clients: dict[str, list[AsyncClient]]) -> None:
    calls = [_outcome(client) for _ in range(5) for client in clients["budget"]]
    outcomes = Counter(await asyncio.gather(*calls))
    assert outcomes == {"OK": 30, "RESOURCE_EXHAUSTED": 10}


async def test_concurrency_cap_is_exact_across_front_ends(
    clients: dict[str, list[AsyncClient]],
) -> None:
    outcomes = Counter(await asyncio.gather(*(_outcome(c, "sleepy") for c in clients["capped"])))
    assert outcomes == {"OK": 2, "RESOURCE_EXHAUSTED": 6}


async def test_rate_limit_is_exact_across_front_ends(
    clients: dict[str, list[AsyncClient]],
) -> None:
    """100 requests/s through eight connections on both front ends: the calls admitted
    after the burst follow the rate (± 5%), not twice the rate. Each admitted call
    counts at the time it was sent, which the engine's admission follows within a round
    trip, not at the time its answer came back, which a busy machine delays by tens of
    milliseconds (a 2 s run measured 91.7 requests/s that way). The burst holds 200 ms
    of tokens: with 50 ms (burst 5), a stall of the busy machine longer than that lost
    the tokens beyond the burst, as a token bucket must (a CI run measured 94.1)."""
    admitted: list[float] = []
    stop_at = time.monotonic() + 3.0

    async def hammer(client: AsyncClient) -> None:
        while (sent := time.monotonic()) < stop_at:
            if await _outcome(client) == "OK":
                admitted.append(sent)

    await asyncio.gather(*(hammer(c) for c in clients["limited"]))
    admitted.sort()
    rate = (len(admitted) - LIMITED_BURST) / (admitted[-1] - admitted[0])
    assert 95 <= rate <= 105, rate


async def test_weighted_shares_across_front_ends(
    clients: dict[str, list[AsyncClient]],
) -> None:
    """Two backlogged tenants, weights 1:3, each on eight connections over both front
    ends, on a model the engine runs in batches of 4: rows served in a window in the
    middle of the flood come 1:3."""
    served: dict[str, list[float]] = {"light": [], "heavy": []}
    stop_at = time.monotonic() + 4.0

    async def flood(tenant: str, client: AsyncClient) -> None:
        async def one() -> None:
            while time.monotonic() < stop_at:
                if await _outcome(client, "paced") == "OK":
                    served[tenant].append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(6)))

    start = time.monotonic()
    await asyncio.gather(*(flood(t, c) for t in served for c in clients[t]))
    light = sum(1 for t in served["light"] if start + 1 <= t <= start + 3.5)
    heavy = sum(1 for t in served["heavy"] if start + 1 <= t <= start + 3.5)
    assert light > 20, (light, heavy)
    assert heavy / (light + heavy) == pytest.approx(0.75, abs=0.05 * 0.75)
    # The weighted service gap (rows served / weight, heavy minus light, in the window)
    # stays within issue 11's bound, one batch and one request (one row each), whichever
    # front end a call took: it does not drift. Counted from the window's start, when
    # either tenant may already be a bound ahead, it stays within twice that.
    gap = worst = 0.0
    events = sorted(
        (at, tenant)
        for tenant, ats in served.items()
        for at in ats
        if start + 1 <= at <= start + 3.5
    )
    for _, tenant in events:
        gap += 1 / 3 if tenant == "heavy" else -1.0
        worst = max(worst, abs(gap))
    print(f"weighted service gap: at most {worst:.2f} rows per unit of weight")
    assert worst <= 2 * (4 + 1), worst  # twice a batch of 4 rows and a request


async def test_metrics_count_every_front_ends_calls(tmp_path: Path) -> None:
    # 20 connections: all on one front end with probability 2 ** -19 (8 was 1/128, and
    # it happened).
    with WorkersServer(workers_config(), tmp_path) as server:
        group = [
            AsyncClient(server.target, "globex-key", options=OWN_CONNECTION) for _ in range(20)
        ]
        outcomes = await asyncio.gather(*(_outcome(c) for _ in range(2) for c in group))
        fronts = server.children()["front-end"]
        assert all(_connections(pid, server.grpc_port) > 0 for pid in fronts)
        for client in group:
            await client.close()
        assert outcomes.count("OK") == 40
        # Front ends report each call just after answering it: let the reports land.
        await asyncio.to_thread(wait_for_calls, server, ADMIN_KEY, 40)
        labels = {"tenant": "globex", "model": "echo", "code": "OK"}
        counted = metric(server, ADMIN_KEY, "mandant_requests_total", **labels)
        assert counted == 40


def test_reports_count_every_call_answered_before_them(server: WorkersServer) -> None:
    """A front end sends the engine its calls' figures a little after answering them
    (with its next requests, or within 50 ms): a usage report (billing) or a
    ModelStatistics call (a Triton client checking its calls) asked right after a call
    must count it, whichever front end answered it. Each call on a connection of its
    own: both front ends answer some."""
    rows = {"INPUT0": np.ones((2, 4), np.float32)}
    for count in range(1, 9):
        with Client(server.target, api_key="billed-key", options=OWN_CONNECTION) as client:
            client.infer("echo", rows)
        _, body = http_get_port(server.http_port, "/usage", ADMIN_KEY)
        usage = json.loads(body)["tenants"]["billed"]
        # Its calls so far, and the ModelStatistics calls before this one.
        assert usage["requests"] == {"OK": 2 * count - 1}
        with grpc.insecure_channel(server.target, options=OWN_CONNECTION) as channel:
            reply = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelStatistics",
                request_serializer=pb.ModelStatisticsRequest.SerializeToString,
                response_deserializer=pb.ModelStatisticsResponse.FromString,
            )(
                pb.ModelStatisticsRequest(name="echo"),
                metadata=(("authorization", "Bearer billed-key"),),
                timeout=10,
            )
        assert reply.model_stats[0].inference_stats.success.count == count


# -- isolation through the IPC path ------------------------------------------------------

TENANTS = ("acme", "globex", "light", "heavy")
_payload = st.tuples(
    st.sampled_from(TENANTS), st.integers(min_value=1, max_value=48), st.integers(1, 64)
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(calls=st.lists(_payload, min_size=2, max_size=40))
def test_no_tensor_reaches_another_tenant(server: WorkersServer, calls: list[Any]) -> None:
    """Interleaved calls of several tenants, each with its own tagged rows, over both
    front ends at once: every answer holds exactly its own call's values."""

    async def run() -> None:
        group = {
            tenant: [
                AsyncClient(server.target, f"{tenant}-key", options=OWN_CONNECTION)
                for _ in range(2)
            ]
            for tenant in TENANTS
        }

        async def one(index: int, tenant: str, rows: int, width: int) -> None:
            tag = (TENANTS.index(tenant) + 1) * 1000.0 + index
            sent = np.full((rows, width), tag, np.float32) + np.arange(width, dtype=np.float32)
            answer = await group[tenant][index % 2].infer("echo", {"INPUT0": sent})
            np.testing.assert_array_equal(answer["OUTPUT0"], sent)

        try:
            await asyncio.gather(*(one(i, *call) for i, call in enumerate(calls)))
        finally:
            for clients in group.values():
                for client in clients:
                    await client.close()

    asyncio.run(run())


# -- lifecycle ---------------------------------------------------------------------------


def _wait_for_pids(server: WorkersServer, role: str, count: int, old: set[int]) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = server.children()[role]
        if len(pids) == count and not old & set(pids):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"no new {role} within 30 s: {server.children()}")


def _wait_for_front_ends_listening(server: WorkersServer, old: set[int]) -> None:
    """Both front ends, none of ``old``, listen on the gRPC port (a process that is
    still starting takes no connection: the kernel gives them all to the other)."""
    deadline = time.monotonic() + 30
    while True:
        pids = _wait_for_pids(server, "front-end", 2, old)
        if all(_connections(pid, server.grpc_port, state="0A") for pid in pids):
            return
        assert time.monotonic() < deadline, "a front end started again does not listen"
        time.sleep(0.1)


def _serving(target: str, key: str = "acme-key", within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    with Client(target, key, timeout_s=5) as client:
        while True:
            try:
                client.infer("echo", {"INPUT0": ROW})
                return
            except MandantClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


async def _load(
    target: str, stop: asyncio.Event, connections: int = 8, model: str = "echo"
) -> list[tuple[int, float, float, str]]:
    """Calls in a loop on ``connections`` connections (a client each) until ``stop``:
    (client, start, end, code)."""
    ended: list[tuple[int, float, float, str]] = []
    group = [
        AsyncClient(target, "acme-key", timeout_s=20, options=OWN_CONNECTION)
        for _ in range(connections)
    ]

    async def loop(index: int, client: AsyncClient) -> None:
        while not stop.is_set():
            start = time.monotonic()
            code = await _outcome(client, model)
            ended.append((index, start, time.monotonic(), code))

    try:
        await asyncio.gather(*(loop(n, c) for n, c in enumerate(group)))
    finally:
        for client in group:
            await client.close()
    return ended


async def test_killed_front_end_fails_only_its_calls_and_comes_back(
    survivor: WorkersServer,
) -> None:
    stop = asyncio.Event()
    load = asyncio.create_task(_load(survivor.target, stop, model="sleepy"))
    await asyncio.sleep(1.5)
    victim, sibling = survivor.children()["front-end"]
    held = _connections(victim, survivor.grpc_port)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(2.5)
    stop.set()
    ended = await load
    failed = [(client, code) for client, _, _, code in ended if code != "OK"]
    assert {code for _, code in failed} <= {"UNAVAILABLE"}, failed
    # Only the clients connected to the victim see a failure: the call each had in
    # flight, and the calls made until its channel is connected again (more than one
    # where a reconnection reached the dying process's listening socket before it was
    # gone: the kernel still handed it the connection, and the channel backs off).
    # Every client of the sibling carries on; every client of the victim comes back,
    # and once back sees no failure.
    assert len({client for client, _ in failed}) <= held, (failed, held)
    for client in {client for client, _ in failed}:
        calls = sorted((start, code) for n, start, _, code in ended if n == client)
        back = [start for start, code in calls if code == "OK" and start > killed_at]
        assert back, (client, calls)
        assert all(start < back[0] for start, code in calls if code != "OK"), (client, calls)
    assert sum(1 for *_, code in ended if code == "OK") > 8
    _wait_for_pids(survivor, "front-end", 2, {victim})
    assert sibling in survivor.children()["front-end"]
    _serving(survivor.target)


def test_killed_engine_makes_calls_unavailable_until_it_is_back(
    survivor: WorkersServer,
) -> None:
    (engine,) = survivor.children()["engine"]
    os.kill(engine, signal.SIGKILL)
    codes, health = set(), set()
    with (
        Client(survivor.target, "acme-key", timeout_s=5) as client,
        grpc.insecure_channel(survivor.target) as channel,
    ):
        check = health_pb2_grpc.HealthStub(channel).Check
        # Triton's probes are the front end's own: live while the engine restarts, not
        # ready (they were forwarded, and failed UNAVAILABLE: a liveness probe on them
        # killed a server about to recover).
        live = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        readiness = set()
        for _ in range(5):
            try:
                client.infer("echo", {"INPUT0": ROW})
                codes.add("OK")
            except MandantClientError as exc:
                codes.add(exc.code.name)
            health.add(check(health_pb2.HealthCheckRequest(), timeout=5).status)
            assert live(pb.ServerLiveRequest(), timeout=5).live
            readiness.add(ready(pb.ServerReadyRequest(), timeout=5).ready)
            time.sleep(0.3)
    assert "UNAVAILABLE" in codes and codes <= {"UNAVAILABLE", "OK"}
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health  # probes see it too
    assert False in readiness
    _wait_for_pids(survivor, "engine", 1, {engine})
    _serving(survivor.target)


def test_a_stopped_engine_is_taken_for_gone_until_it_answers_again(
    survivor: WorkersServer,
) -> None:
    """An engine that is there but silent (SIGSTOP: a stuck event loop looks the same)
    once held every call for as long as it stayed so (with no deadline: forever),
    with health SERVING; now its calls fail UNAVAILABLE once it has been silent for
    the link's 5 s, new ones at once, and it serves again once it answers. A call
    told so ("retry") is not run when the engine wakes and reads it (it was run and
    charged, and its retry charged again)."""
    (engine,) = survivor.children()["engine"]
    _serving(survivor.target)
    os.kill(engine, signal.SIGSTOP)
    try:
        with (
            Client(survivor.target, "acme-key", timeout_s=60) as client,
            Client(survivor.target, "budget-key", timeout_s=60) as budget,
            grpc.insecure_channel(survivor.target) as channel,
        ):
            metadata = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelMetadata",
                request_serializer=pb.ModelMetadataRequest.SerializeToString,
                response_deserializer=pb.ModelMetadataResponse.FromString,
            )
            request = pb.ModelMetadataRequest(name="echo")
            acme = (("authorization", "Bearer acme-key"),)
            # A call the engine serves, sent before the engine is taken for gone: it
            # fails with the inference calls (it waited for its deadline).
            forwarded = metadata.future(request, metadata=acme, timeout=60)
            with pytest.raises(MandantClientError) as waited:  # held, then failed: not 60 s
                budget.infer("echo", {"INPUT0": np.ones((10, 4), np.float32)})
            assert waited.value.code is grpc.StatusCode.UNAVAILABLE
            assert "retry" in str(waited.value)
            lost = forwarded.exception(timeout=10)
            assert lost.code() is grpc.StatusCode.UNAVAILABLE
            assert "which it may yet have carried out" in lost.details()  # not known
            with pytest.raises(MandantClientError) as refused:
                client.infer("echo", {"INPUT0": ROW})
            assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            check = health_pb2_grpc.HealthStub(channel).Check
            deadline = time.monotonic() + 5  # health follows readiness every 0.5 s
            while check(health_pb2.HealthCheckRequest(), timeout=5).status != (
                health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert time.monotonic() < deadline, "health still SERVING"
                time.sleep(0.1)
            # A call the engine serves is still refused by the front end for a missing
            # key, before its message is read: its key is checked there first.
            with pytest.raises(grpc.RpcError) as keyless:
                metadata(request, timeout=5)
            assert keyless.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as keyed:
                metadata(request, metadata=acme, timeout=5)
            assert keyed.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        os.kill(engine, signal.SIGCONT)
    _serving(survivor.target)
    _serving(survivor.target, "budget-key")  # one row, read after the one told to retry
    _, body = http_get_port(survivor.http_port, "/usage", ADMIN_KEY)
    assert json.loads(body)["tenants"]["budget"]["quota"]["used"]["rows_today"] == 1


#: The grace of the server stopped under load: the 8 calls queued on ``sleepy`` are 4 s
#: of work, which on a loaded host outlasted a grace of 5 s (their calls were cancelled).
LOADED_GRACE_S = 30


@pytest.mark.parametrize("to", ["the supervisor", "every process"])
async def test_sigterm_under_load_loses_no_accepted_call(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], to: str
) -> None:
    """To every process at once is how a service manager stops a service (systemd's
    ``KillMode=control-group``): the engine, signalled itself, failed every call it
    had at once."""
    with WorkersServer(workers_config(grace_s=LOADED_GRACE_S), tmp_path) as server:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(server.target, stop, model="sleepy"))
        await asyncio.sleep(1.2)
        assert server.process is not None
        children = [pid for group in server.children().values() for pid in group]
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        if to == "every process":
            for pid in children:
                os.kill(pid, signal.SIGTERM)
        await asyncio.to_thread(server.process.wait, LOADED_GRACE_S + 30)
        stop.set()
        ended = await load
        assert server.process.returncode == 0
    # Calls accepted before the signal (started 0.1 s before it at least) all answer OK,
    # queued ones included; later ones are refused (UNAVAILABLE), nothing else.
    accepted = [code for _, start, end, code in ended if start < signalled - 0.1 < end]
    assert len(accepted) == 8 and set(accepted) == {"OK"}, accepted
    assert {code for *_, code in ended} <= {"OK", "UNAVAILABLE"}
    # Every process stopped on its own, in order: no front end gave up on the engine
    # ("inference engine silent"), no model was left running, no child was killed.
    log = capfd.readouterr().err
    assert "engine stopping" in log  # the processes' log is read here
    for trouble in (
        "silent for",
        "not freed in",
        "did not stop in time",
        "stopping took longer than its grace",
    ):
        assert trouble not in log, [line for line in log.splitlines() if trouble in line]


def test_sighup_reaches_every_process(survivor: WorkersServer, tmp_path: Path) -> None:
    data = yaml.safe_load(survivor.config_path.read_text())
    data["tenants"].append(_tenant("newcomer"))
    survivor.config_path.write_text(yaml.safe_dump(data))
    assert survivor.process is not None
    survivor.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:  # every front end (eight connections) and the engine know the new key
        try:
            for _ in range(8):
                with Client(
                    survivor.target, "newcomer-key", timeout_s=5, options=OWN_CONNECTION
                ) as client:
                    client.infer("echo", {"INPUT0": ROW})
            break
        except MandantClientError as exc:
            assert exc.code is grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() < deadline
            time.sleep(0.2)


def _keys_taken(target: str, key: str) -> list[str]:
    """What eight connections of their own (over both front ends) answer ``key``'s
    inference call and metadata call (forwarded to the engine): OK or a status name."""
    codes = []
    for _ in range(8):
        with Client(target, key, timeout_s=5, options=OWN_CONNECTION) as client:
            for call in (
                lambda: client.infer("echo", {"INPUT0": ROW}),
                lambda: client.model_metadata("echo"),
            ):
                try:
                    call()
                    codes.append("OK")
                except MandantClientError as exc:
                    codes.append(exc.code.name)
    return codes


def test_a_process_started_again_serves_what_its_siblings_serve(fresh: WorkersServer) -> None:
    """A key revoked and another given in the file, no SIGHUP yet: a front end that
    died and came back takes the keys the others take (the configuration applied), and
    the SIGHUP then applies the file to every process. (It once read the file itself:
    its connections took the new key for inference and the old one for the calls the
    engine answers.)"""
    data = yaml.safe_load(fresh.config_path.read_text())
    acme = next(tenant for tenant in data["tenants"] if tenant["id"] == "acme")
    acme["api_keys"] = [hash_key("acme-key-2")]
    fresh.config_path.write_text(yaml.safe_dump(data))
    victim, _ = fresh.children()["front-end"]
    os.kill(victim, signal.SIGKILL)
    _wait_for_front_ends_listening(fresh, {victim})
    assert set(_keys_taken(fresh.target, "acme-key")) == {"OK"}
    assert set(_keys_taken(fresh.target, "acme-key-2")) == {"UNAUTHENTICATED"}

    assert fresh.process is not None
    fresh.process.send_signal(signal.SIGHUP)
    _serving(fresh.target, "acme-key-2")
    deadline = time.monotonic() + 10
    while set(_keys_taken(fresh.target, "acme-key")) != {"UNAUTHENTICATED"}:
        assert time.monotonic() < deadline, "the old key is still taken after the SIGHUP"
        time.sleep(0.2)
    assert set(_keys_taken(fresh.target, "acme-key-2")) == {"OK"}


def test_a_process_started_again_after_a_reload_keeps_the_restart_only_settings(
    fresh: WorkersServer,
) -> None:
    """``server.max_message_bytes`` lowered in the file and SIGHUP: the processes keep
    the bound they started with (it waits for a restart). A front end that died then
    came back with the new bound, and refused on its connections what its sibling took
    on theirs."""
    data = yaml.safe_load(fresh.config_path.read_text())
    data["server"]["max_message_bytes"] = 64 * 1024
    fresh.config_path.write_text(yaml.safe_dump(data))
    assert fresh.process is not None
    fresh.process.send_signal(signal.SIGHUP)
    time.sleep(1)  # the children reload (nothing of it is visible to a client)
    victim, _ = fresh.children()["front-end"]
    os.kill(victim, signal.SIGKILL)
    _wait_for_front_ends_listening(fresh, {victim})
    wide = np.ones((1, 50_000), np.float32)  # 200 kB
    for _ in range(8):
        with Client(fresh.target, "acme-key", timeout_s=5, options=OWN_CONNECTION) as client:
            np.testing.assert_array_equal(client.infer("echo", {"INPUT0": wide})["OUTPUT0"], wide)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_supervisor_killed_outright_leaves_no_process_behind(fresh: WorkersServer) -> None:
    """Its children get SIGTERM from the kernel (PR_SET_PDEATHSIG) and look for it
    every second: a front end whose engine went at the same moment waited for its
    engine link for good (Python 3.11's wait_for dropped the cancel), an hour after
    the CI run that killed its supervisor."""
    children = [pid for pids in fresh.children().values() for pid in pids]
    assert fresh.process is not None and len(children) == 3
    fresh.process.kill()
    fresh.process.wait()
    deadline = time.monotonic() + 5 + 2  # grace_s, then a stop's own pace
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in children if _running(pid)]


def test_a_file_that_does_not_validate_is_refused_at_sighup(fresh: WorkersServer) -> None:
    """Nothing changes, and a process started again after it serves the running
    configuration (not a file it cannot read)."""
    fresh.config_path.write_text("tenants: [unclosed\n")
    assert fresh.process is not None
    fresh.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    victim, _ = fresh.children()["front-end"]
    os.kill(victim, signal.SIGKILL)
    _wait_for_front_ends_listening(fresh, {victim})
    assert set(_keys_taken(fresh.target, "acme-key")) == {"OK"}


def test_a_sighup_while_a_front_end_starts_does_not_kill_it(survivor: WorkersServer) -> None:
    """A front end killed outright is started again; a SIGHUP that comes while it is
    still importing reaches it once it serves (it would end a process that has no
    handler yet, which would then be restarted again)."""
    victim, _ = survivor.children()["front-end"]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.35)  # the new front end is importing
    assert survivor.process is not None
    survivor.process.send_signal(signal.SIGHUP)
    pids = _wait_for_pids(survivor, "front-end", 2, {victim})
    time.sleep(2.0)
    assert sorted(survivor.children()["front-end"]) == sorted(pids)
    _serving(survivor.target)


@pytest.mark.parametrize("multiplex", [False, True], ids=["unary", "multiplexed"])
async def test_one_client_with_several_connections_reaches_every_front_end(
    server: WorkersServer, multiplex: bool
) -> None:
    """mandant_client's ``connections``: one client's calls go round-robin over its own
    connections (and streams), which the kernel spreads over the front ends. The kernel
    hashes each connection to a listener, so with two front ends all of n connections
    land on one with probability 2 ** (1 - n): 24 makes that about 1e-7 (8 was 1/128,
    and it happened)."""
    fronts = server.children()["front-end"]
    port = server.grpc_port
    async with AsyncClient(
        server.target, "acme-key", timeout_s=30, connections=24, multiplex=multiplex
    ) as client:
        rows = [np.full((1, 4), n, np.float32) for n in range(48)]
        answers = await asyncio.gather(*(client.infer("echo", {"INPUT0": r}) for r in rows))
        for sent, answer in zip(rows, answers, strict=True):
            np.testing.assert_array_equal(answer["OUTPUT0"], sent)
        # This client's connections, by their ports here: counting a front end's
        # connections before and after also counted an earlier test's, closing meanwhile.
        mine = {local for local, remote in _sockets(os.getpid()) if remote == port}
        held = [
            sum(local == port and remote in mine for local, remote in _sockets(pid))
            for pid in fronts
        ]
    assert len(mine) == 24 and sum(held) == 24 and min(held) > 0, (held, len(mine))


def test_a_client_needs_at_least_one_connection() -> None:
    with pytest.raises(ValueError, match="connections must be at least 1"):
        Client("127.0.0.1:1", connections=0)


def _ready(http_port: int) -> bool:
    try:
        return http_get_port(http_port, "/readyz")[0] == 200
    except OSError:  # not listening yet
        return False


def test_readyz_waits_for_a_front_end_that_accepts_calls(tmp_path: Path) -> None:
    """The engine (which serves the HTTP port) starts before the front ends: /readyz
    said ready on the engine's word alone, and the gRPC port then refused connections
    for about half a second (every call a probe let through failed)."""
    grpc_port, http_port = free_port(), free_port()
    data = workers_config().model_dump(mode="json", exclude_none=True)
    data["server"].update(grpc_port=grpc_port, http_port=http_port, workers=2)
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(data))
    process = subprocess.Popen(
        [*MANDANT, "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=SUBPROCESS_ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while not _ready(http_port):
            assert process.poll() is None and time.monotonic() < deadline, "never ready"
            time.sleep(0.01)
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()
    finally:
        process.terminate()
        process.wait(30)


def test_a_second_server_on_the_same_grpc_port_refuses_to_start(
    server: WorkersServer, tmp_path: Path
) -> None:
    """Front ends bind the port with SO_REUSEPORT: a second ``workers: N`` server of
    the same user on it started silently and took a share of the connections (with
    its own tenants, keys and limits). It stops at once now, saying why, and leaves
    no private folder behind (its copies of the configuration stayed in /tmp)."""
    data = workers_config().model_dump(mode="json", exclude_defaults=True)
    data["server"].update(workers=2, grpc_port=server.grpc_port)
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(data))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    second = subprocess.run(
        [*MANDANT, "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**SUBPROCESS_ENV, "TMPDIR": str(scratch)},
        timeout=60,
    )
    assert second.returncode != 0
    assert f"cannot use gRPC port {server.grpc_port}" in second.stderr, second.stderr
    assert not list(scratch.iterdir())


def test_a_stopped_front_end_is_not_ready_and_is_started_again(survivor: WorkersServer) -> None:
    """A front end that is there but silent (SIGSTOP; a stuck event loop looks the
    same) kept its listening socket, so the kernel gave it a share of new connections
    that nobody answered, and /readyz said ready with every front end stopped. Now it
    stops counting as accepting calls at once, and is killed after 10 s of silence
    for the supervisor to start again."""
    fronts = survivor.children()["front-end"]
    for pid in fronts:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while _ready(survivor.http_port):
            assert time.monotonic() < deadline, "/readyz still says ready"
            time.sleep(0.1)
        _wait_for_front_ends_listening(survivor, set(fronts))
    finally:
        for pid in fronts:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    _serving(survivor.target)
    deadline = time.monotonic() + 10
    while not _ready(survivor.http_port):
        assert time.monotonic() < deadline, "/readyz never ready again"
        time.sleep(0.1)


def test_an_engine_started_again_keeps_its_internal_port(tmp_path: Path) -> None:
    """``internal_http.port: 0``: the engine started again listened on another port
    (http_port and rest_port were kept, not this one): probes on it then failed."""
    data = workers_config().model_dump(mode="json", exclude_defaults=True)
    data["server"]["internal_http"] = {"host": "127.0.0.1", "port": 0}
    with WorkersServer(parse_config(data, "test"), tmp_path) as server:
        deadline = time.monotonic() + 10
        found = None
        while found is None:
            assert time.monotonic() < deadline, server.output
            found = re.search(
                r"Internal HTTP \(no key\): http://[^:]+:(\d+)/", "".join(server.output)
            )
            time.sleep(0.05)
        port = int(found[1])
        assert http_get_port(port, "/readyz")[0] == 200
        (engine,) = server.children()["engine"]
        os.kill(engine, signal.SIGKILL)
        _wait_for_pids(server, "engine", 1, {engine})
        _serving(server.target)
        assert http_get_port(port, "/readyz")[0] == 200


@pytest.mark.parametrize("value", ["José".encode(), b"a\tb", b"caf\xe9"])
def test_a_metadata_value_no_grpc_client_sends_is_not_forwarded(
    server: WorkersServer, value: bytes
) -> None:
    """A front end forwards its model and admin RPCs to the engine with the client's
    metadata; a text value gRPC's client will not send (not printable ASCII: another
    client stack's ``x-user: José``) failed the forward: INTERNAL and a logged
    traceback, where one process answers the call. Such a value is not forwarded."""
    calls = StalledCalls(
        int(server.target.rsplit(":", 1)[1]),
        "/inference.GRPCInferenceService/RepositoryIndex",
        "acme-key",
        declared=0,
        sent=0,
        metadata=((b"x-user", value),),
    )
    try:
        ((code, message),) = calls.statuses(10)
    finally:
        calls.close()
    assert code is grpc.StatusCode.OK, message
