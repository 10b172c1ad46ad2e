"""What one tenant can do to another through the server's own work, beyond the model's
time: two attacks found in review, each measured as the other tenant sees it.

* ``shapes``: a victim's 32 callers send one-row ``[1, 4]`` calls to a model whose cost
  is per execution (10 ms a batch, ``benchmarks/_models.py``; ``max_batch_size`` 64,
  fair batching) while an attacker's 2 callers send ``[1, 4]`` (a baseline) or rows of
  other widths, ``[1, 5]`` and ``[1, 6]`` (one attacker alternating, or two tenants
  of one width each): a batch holds one shape, and the attacker's request of another
  shape used to close every batch after one request.
* ``rest-json``: one tenant's REST call of 10⁷ FP32 values (binary in, the answer asked
  for as JSON, as curl and ``binary_data=False`` do) while another tenant makes a tiny
  gRPC call every 20 ms: JSON is written on the event loop (and, with ``workers: N``,
  REST is served by the engine, which every front end waits on). Then the same with
  one BYTES element of ``--bytes-element`` bytes (48 MiB of ``0x01``, each escaped to
  six characters: a 300 MB answer) echoed as JSON, and as binary data; and
  ``--json-callers`` REST calls at once (16 of 10⁶ values), JSON answers all: each
  answer used to write a piece every turn of the loop, so 16 wrote 16 a turn.
* ``json-bodies``: the same tiny calls while the other tenant sends REST inference
  calls whose JSON is as long as ``server.max_json_bytes`` lets it be, on 4
  connections, for ``--seconds``: JSON is parsed and turned into tensors on the event
  loop, so what one call stalls every other by is bounded by that setting (rows of one
  zero each, ``[[0],[0],…]``, the costliest per byte found). Three servers in one
  run: ``max_json_bytes`` 2 MiB (the default until session 18), 256 KiB (the
  default), and 256 KiB with acme limited to 5 requests/s (a tenant out of requests
  is refused before its JSON is parsed, since session 19).
* ``messages``: the same tiny calls while the other tenant sends one small hostile
  request, whose entries the server used to build one by one on the event loop before
  any check: a ModelInfer message of 10⁶ empty ``inputs {}`` (1.9 MiB), one of 4 x 10⁵
  request ``parameters`` entries (~6 MiB), and a 16 MiB JSON body to REST's
  ``/v2/repository/index``.
* ``refused-bytes``: the same tiny calls while the other tenant, allowed one request a
  second, sends gRPC calls of 262,144 short BYTES elements (raw, then typed
  ``bytes_contents``) from two threads for ``--seconds``: nearly all are refused by its
  rate limit, which the engine applies; a front end of ``workers: N`` used to split
  and re-join every element first.
* ``compressed``: the same tiny calls while the other tenant sends gRPC calls whose
  message is 60 MiB inflated and ~60 KiB of gzip on the wire (a ``ModelMetadata``
  request naming a model of 60 MiB of ``a``, compressed once and sent as it is over raw
  HTTP/2, ``grpc-encoding: gzip``; refused once parsed, as over 320 KiB) from
  ``COMPRESSED_SENDERS`` connections for ``--seconds``: gRPC inflates a message whole
  with the event loop waiting. With ``server.grpc_compression: true`` and with the
  default (off: refused UNIMPLEMENTED before it is inflated).
* ``rest-gzip``: the same tiny calls while the other tenant keeps ``GZIP_BODIES`` REST
  inference bodies going at once, each 60 KiB of gzip inflating to 60 MiB, for
  ``--seconds`` (refused: 413 as JSON past ``max_json_bytes``, or 429 past the caller's
  bodies on their way); and the server's peak resident memory (``VmHWM``, the largest
  of its processes).
* ``deadlines``: the same tiny calls while another client floods the server with calls
  whose gRPC deadline is 3 ms (32 callers on 4 connections, each calling again as soon
  as its call expires), with a key nobody has or with acme's: each call is over before
  the server gets to it, and gRPC hands it over all the same, in arrival order, ahead
  of the tiny calls. Against a bare grpc.aio server (``benchmarks/_bare_server.py``:
  gRPC's own part), Mandant with its default ``server.max_concurrent_streams`` (1,024
  calls a connection) and with 128. The flood runs in a process of its own on the
  load generator's core.
* ``amplified``: the same tiny calls while the other tenant sends 4-byte requests whose
  answers are ``AMPLIFIED_BYTES`` each (``benchmarks._models:widen``) and reads none
  of them: ``AMPLIFIED_MESSAGES`` messages on each of ``AMPLIFIED_STREAMS`` streams,
  or ``AMPLIFIED_CALLS`` unary calls on connections of their own, all sent before any
  answer is made, held ``--seconds``; ``server.max_unread_answer_bytes`` set to
  ``AMPLIFIED_BOUND``. How many answers were held and refused, and the server's peak
  resident memory (a server per phase: ``VmHWM`` only grows). The bounds were checked
  only as calls began, so answers made after all had begun were all held.

    .venv/bin/python -m benchmarks.isolation [--workers 1 2] [--seconds 6]
        [--attacks shapes rest-json json-bodies messages refused-bytes compressed rest-gzip
         deadlines amplified]

The server runs on core 0 (every process of it with ``workers: 2``), this load
generator on core 1; one run of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np

from benchmarks._load import (
    CLIENT_CPU,
    KEYS,
    SERVER_CPU,
    THREAD_ENV,
    demo_data,
    run_pinned,
    table,
)
from benchmarks._server import Served, bare_grpc_process, mandant_process, write_config
from mandant_client import AsyncClient
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"

#: One tenant's request against another's tiny calls: its status and its seconds.
Attack = Callable[[Served], tuple[object, float]]
#: A report's rows.
Rows = list[list[object]]

ANY_SHAPE: dict[str, Any] = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}
PACED: dict[str, Any] = {
    "name": "paced",
    "backend": "torch",
    "factory": "benchmarks._models:paced_echo",
    "factory_args": {"seconds": 0.01},
    "batching": {"max_batch_size": 64, "max_queue_delay_ms": 5},
    **ANY_SHAPE,
}
ECHO: dict[str, Any] = {
    "name": "echo",
    "backend": "torch",
    "factory": "mandant.demo.models:echo",
    "device": "cpu",  # the front end's isolation, not a GPU's copies
    **ANY_SHAPE,
}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] * 1000 if ordered else float("nan")


# -- shapes -------------------------------------------------------------------------------


async def _callers(
    client: AsyncClient, shape: Callable[[int], tuple[int, int]], latencies: list[float],
    stop: asyncio.Event,
) -> None:  # fmt: skip
    calls = 0
    while not stop.is_set():
        x = np.ones(shape(calls), np.float32)
        calls += 1
        start = time.perf_counter()
        await client.infer("paced", {"INPUT0": x})
        latencies.append(time.perf_counter() - start)


Shape = Callable[[int], tuple[int, int]]


async def _shapes_phase(
    served: Served, attackers: Sequence[tuple[str, Shape]], seconds: float, warmup_s: float
) -> list[object]:
    """The victim's figures while ``attackers`` (tenant, shape of its n-th call) run 2
    callers each; the attackers' calls/s together; the mean batch."""
    stop = asyncio.Event()
    victim_latencies: list[float] = []
    attacker_latencies: list[float] = []
    clients = [AsyncClient(served.target, KEYS[tenant]) for tenant, _ in attackers]
    async with AsyncClient(served.target, KEYS["acme"]) as victim:
        tasks = [
            asyncio.create_task(_callers(victim, lambda _: (1, 4), victim_latencies, stop))
            for _ in range(32)
        ]
        for client, (_, shape) in zip(clients, attackers, strict=True):
            tasks += [
                asyncio.create_task(_callers(client, shape, attacker_latencies, stop))
                for _ in range(2)
            ]
        await asyncio.sleep(warmup_s)
        victim_latencies.clear()
        attacker_latencies.clear()
        rows_before, batches_before = served.batch_totals("paced")
        await asyncio.sleep(seconds)
        rows, batches = served.batch_totals("paced")
        stop.set()
        await asyncio.gather(*tasks)
    for client in clients:
        await client.close()
    mean_batch = (rows - rows_before) / max(1.0, batches - batches_before)
    return [
        f"{len(victim_latencies) / seconds:,.0f}",
        f"{_percentile(victim_latencies, 0.5):.1f}",
        f"{_percentile(victim_latencies, 0.99):.1f}",
        f"{len(attacker_latencies) / seconds:,.0f}",
        f"{mean_batch:.1f}",
    ]


SHAPE_PHASES: list[tuple[str, list[tuple[str, Shape]]]] = [
    ("alone", []),
    ("attacker, same shape [1, 4]", [("globex", lambda _: (1, 4))]),
    ("attacker, shapes [1, 5] / [1, 6]", [("globex", lambda n: (1, 5 + n % 2))]),
    ("two attackers, [1, 5] and [1, 6]", [("globex", lambda _: (1, 5)),
                                          ("initech", lambda _: (1, 6))]),
]  # fmt: skip


def shapes(workers: int, seconds: float, warmup_s: float) -> list[list[object]]:
    config = write_config(_config(PACED, workers))
    rows: list[list[object]] = []
    with mandant_process(config, SERVER_CPU, THREAD_ENV) as served:
        for label, attackers in SHAPE_PHASES:
            figures = asyncio.run(_shapes_phase(served, attackers, seconds, warmup_s))
            rows.append([workers, label, *figures])
    return rows


# -- rest-json -----------------------------------------------------------------------------


def _big_rest_call(rest_port: int, values: int) -> tuple[object, float]:
    """acme's REST echo of ``values`` FP32, binary in, the answer as JSON."""
    request = {"inputs": [{"name": "INPUT0", "shape": [1, values], "datatype": "FP32",
                           "parameters": {"binary_data_size": 4 * values}}]}  # fmt: skip
    # Random values: their JSON is as long as a real model's answer (17 digits each).
    data = np.random.default_rng(0).random(values, dtype=np.float32).tobytes()
    return _rest_echo(rest_port, "echo", request, data)


def _bytes_rest_call(rest_port: int, size: int, as_json: bool) -> tuple[object, float]:
    """acme's REST echo of one BYTES element of ``size`` bytes of 0x01, binary in, the
    answer as JSON (``as_json``) or binary data."""
    element = struct.pack("<I", size) + b"\x01" * size
    tensor = {"name": "INPUT0", "shape": [1, 1], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(element)}}  # fmt: skip
    request: dict[str, Any] = {"inputs": [tensor]}
    if not as_json:
        request["parameters"] = {"binary_data_output": True}
    return _rest_echo(rest_port, "echo_bytes", request, element)


def _rest_echo(
    rest_port: int, model: str, request: dict[str, Any], data: bytes
) -> tuple[object, float]:
    """acme's REST call of ``model``: ``request``'s JSON, then ``data`` as its binary
    inputs; the answer's status and the seconds the call took, its answer read whole."""
    head = json.dumps(request).encode()
    connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=600)
    start = time.perf_counter()
    connection.request(
        "POST",
        f"/v2/models/{model}/infer",
        body=head + data,
        headers={
            "Authorization": f"Bearer {KEYS['acme']}",
            "Inference-Header-Content-Length": str(len(head)),
        },
    )
    answer = connection.getresponse()
    answer.read()
    connection.close()
    return answer.status, time.perf_counter() - start


async def _tiny_calls(
    target: str, stop: asyncio.Event, starts: list[float] | None = None
) -> tuple[list[float], int]:
    """globex: a one-value gRPC echo every 20 ms until ``stop``; latencies, errors
    (``starts``: each answered call's start, ``time.monotonic``, is appended)."""
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(bytes(4))
    metadata = (("authorization", f"Bearer {KEYS['globex']}"),)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            start = time.perf_counter()
            started = time.monotonic()
            try:
                await stub.ModelInfer(request, metadata=metadata, timeout=60)
                latencies.append(time.perf_counter() - start)
                if starts is not None:
                    starts.append(started)
            except grpc.aio.AioRpcError:
                errors += 1
            await asyncio.sleep(0.02)
    return latencies, errors


async def _beside(
    served: Served, attack: Attack | None, quiet_s: float, warmup_s: float
) -> list[object]:
    """globex's tiny calls while ``attack`` runs (or for ``quiet_s`` without one): the
    attack's status and seconds, then the tiny calls' count, p50 and worst ms, errors."""
    stop = asyncio.Event()
    tiny = asyncio.create_task(_tiny_calls(served.target, stop))
    await asyncio.sleep(warmup_s)
    status, took = "", ""
    if attack is None:
        await asyncio.sleep(quiet_s)
    else:
        code, elapsed = await asyncio.to_thread(attack, served)
        status, took = str(code), f"{elapsed:.2f}"
        await asyncio.sleep(1.0)
    stop.set()
    latencies, errors = await tiny
    return [
        status,
        took,
        len(latencies),
        f"{_percentile(latencies, 0.5):.1f}",
        f"{max(latencies) * 1000:.0f}" if latencies else "",
        errors,
    ]


#: A BYTES echo, for the rest-json attack's large element.
ECHO_BYTES = {
    **ECHO,
    "name": "echo_bytes",
    "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1, -1]}],
}


def _json_answers(callers: int, values: int) -> Attack:
    """acme's ``callers`` REST calls at once, each a :func:`_big_rest_call` of
    ``values``."""

    def send(served: Served) -> tuple[object, float]:
        statuses: dict[int, int] = {}

        def call() -> None:
            status, _ = _big_rest_call(served.rest_port, values)
            statuses[int(str(status))] = statuses.get(int(str(status)), 0) + 1

        return _in_threads(call, callers, statuses)

    return send


def rest_json(
    workers: int,
    seconds: float,
    warmup_s: float,
    values: int,
    element: int,
    callers: tuple[int, int] = (16, 1_000_000),
) -> list[list[object]]:
    """``callers``: how many calls at once of how many values, the last phase."""
    config = write_config(_config(ECHO, workers, ECHO_BYTES))
    rows: list[list[object]] = []
    with mandant_process(config, SERVER_CPU, THREAD_ENV) as served:
        phases: list[tuple[str, Attack | None]] = [
            ("alone", None),
            (
                f"beside a {values:.0e}-value JSON answer",
                lambda served: _big_rest_call(served.rest_port, values),
            ),
            (
                f"beside {callers[0]} JSON answers of {callers[1]:.0e} values at once",
                _json_answers(*callers),
            ),
            (
                f"beside one {element >> 20} MiB BYTES element as JSON",
                lambda served: _bytes_rest_call(served.rest_port, element, as_json=True),
            ),
            (
                f"beside one {element >> 20} MiB BYTES element as binary",
                lambda served: _bytes_rest_call(served.rest_port, element, as_json=False),
            ),
        ]
        for label, attack in phases:
            rows.append([workers, label, *asyncio.run(_beside(served, attack, seconds, warmup_s))])
    return rows


# -- json-bodies ---------------------------------------------------------------------------

#: REST connections acme sends its JSON bodies on, each one call after another.
JSON_CONNECTIONS = 4
#: acme's requests_per_s on the last json-bodies server: nearly every body is refused
#: (429), before it is parsed.
JSON_LIMITED_RATE = 5.0


def _json_body(max_json_bytes: int) -> bytes:
    """The longest inference body of one-zero rows within ``max_json_bytes``."""
    head, tail = b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [', b"}]}"
    rows = (max_json_bytes - len(head) - len(tail) - 32) // len(b"[0],")
    data = b', "data": [' + b"[0]," * (rows - 1) + b"[0]]"
    return head + f"{rows}, 1]".encode() + data + tail


def _json_bodies(max_json_bytes: int, seconds: float) -> Attack:
    body = _json_body(max_json_bytes)

    def send(served: Served) -> tuple[object, float]:
        statuses: dict[int, int] = {}
        until = time.perf_counter() + seconds

        def connection_loop() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", served.rest_port, timeout=600)
            headers = {"Authorization": f"Bearer {KEYS['acme']}"}
            while time.perf_counter() < until:
                connection.request("POST", "/v2/models/echo/infer", body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
            connection.close()

        return _in_threads(connection_loop, JSON_CONNECTIONS, statuses)

    return send


def _in_threads(
    loop: Callable[[], None], threads: int, statuses: dict[Any, int]
) -> tuple[object, float]:
    """``loop`` run in ``threads`` threads at once until each returns: the answers it
    counted in ``statuses`` ("n x status", by status) and the seconds it took."""
    start = time.perf_counter()
    running = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    counts = " ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    return counts, time.perf_counter() - start


#: Servers of the json-bodies attack: (max_json_bytes, acme's requests_per_s or None).
JSON_SERVERS = ((2 << 20, None), (256 << 10, None), (256 << 10, JSON_LIMITED_RATE))


def json_bodies(workers: int, seconds: float, warmup_s: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for max_json_bytes, rate in JSON_SERVERS:
        data = _config(ECHO, workers)
        data["server"]["max_json_bytes"] = max_json_bytes
        if rate is not None:
            acme = next(t for t in data["tenants"] if t["id"] == "acme")
            acme["rate_limit"] = {"requests_per_s": rate}
        with mandant_process(write_config(data), SERVER_CPU, THREAD_ENV) as served:
            phases: list[tuple[str, Attack | None]] = [
                ("alone", None),
                (
                    f"beside JSON bodies of {max_json_bytes >> 10} KiB",
                    _json_bodies(max_json_bytes, seconds),
                ),
            ]
            for label, attack in phases:
                figures = asyncio.run(_beside(served, attack, seconds, warmup_s))
                limit = "none" if rate is None else f"{rate:g} requests/s"
                rows.append([workers, f"{max_json_bytes >> 10} KiB", limit, label, *figures])
    return rows


# -- messages ------------------------------------------------------------------------------


def _many_inputs() -> bytes:
    request = pb.ModelInferRequest(model_name="echo")
    for _ in range(1_000_000):
        request.inputs.add()
    return request.SerializeToString()


def _many_parameters() -> bytes:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(bytes(4))
    for index in range(400_000):
        request.parameters[f"p{index}"].bool_param = True
    return request.SerializeToString()


def _grpc_attack(build: Callable[[], bytes]) -> Attack:
    def send(served: Served) -> tuple[object, float]:
        raw = build()
        with grpc.insecure_channel(served.target) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            start = time.perf_counter()
            try:
                infer(raw, metadata=(("authorization", f"Bearer {KEYS['acme']}"),), timeout=600)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            return code, time.perf_counter() - start

    return send


def _index_body(served: Served) -> tuple[object, float]:
    body = b"[" + b"0," * (8 << 20) + b"0]"  # 16 MiB of JSON
    connection = http.client.HTTPConnection("127.0.0.1", served.rest_port, timeout=600)
    start = time.perf_counter()
    connection.request(
        "POST",
        "/v2/repository/index",
        body=body,
        headers={"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"},
    )
    answer = connection.getresponse()
    answer.read()
    connection.close()
    return str(answer.status), time.perf_counter() - start


ATTACKS: dict[str, Attack] = {
    "10^6 empty inputs (gRPC, 1.9 MiB)": _grpc_attack(_many_inputs),
    "4x10^5 parameters (gRPC, ~6 MiB)": _grpc_attack(_many_parameters),
    "16 MiB JSON to /v2/repository/index": _index_body,
}


def messages(workers: int, warmup_s: float) -> list[list[object]]:
    config = write_config(_config(ECHO, workers))
    rows: list[list[object]] = []
    with mandant_process(config, SERVER_CPU, THREAD_ENV) as served:
        phases: list[tuple[str, Attack | None]] = [("alone", None), *ATTACKS.items()]
        for label, attack in phases:
            rows.append([workers, label, *asyncio.run(_beside(served, attack, 2.0, warmup_s))])
    return rows


# -- refused-bytes ------------------------------------------------------------------------

#: BYTES elements in each of acme's refused calls, 0–2 bytes long (1.3 MB a message).
REFUSED_ELEMENTS = 262_144
#: acme's requests_per_s in the refused-bytes phases: nearly every call is refused.
REFUSED_RATE = 1.0
#: Threads sending acme's calls, each one after another.
REFUSED_SENDERS = 2


def _bytes_message(typed: bool) -> bytes:
    """acme's ModelInfer of :data:`REFUSED_ELEMENTS` BYTES elements to ``echo_bytes``:
    length-prefixed in ``raw_input_contents``, or typed ``bytes_contents``."""
    lengths = np.random.default_rng(0).integers(0, 3, REFUSED_ELEMENTS).tolist()
    items = [b"\x01" * length for length in lengths]
    request = pb.ModelInferRequest(model_name="echo_bytes")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, REFUSED_ELEMENTS])
    if typed:
        tensor.contents.bytes_contents.extend(items)
    else:
        request.raw_input_contents.append(
            b"".join(struct.pack("<I", len(item)) + item for item in items)
        )
    return request.SerializeToString()


def _refused_bytes(typed: bool, seconds: float) -> Attack:
    raw = _bytes_message(typed)

    def send(served: Served) -> tuple[object, float]:
        statuses: dict[str, int] = {}
        until = time.perf_counter() + seconds

        def sender() -> None:
            with grpc.insecure_channel(served.target) as channel:
                infer = channel.unary_unary(INFER)
                metadata = (("authorization", f"Bearer {KEYS['acme']}"),)
                while time.perf_counter() < until:
                    try:
                        infer(raw, metadata=metadata, timeout=600)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    statuses[code] = statuses.get(code, 0) + 1

        return _in_threads(sender, REFUSED_SENDERS, statuses)

    return send


def refused_bytes(workers: int, seconds: float, warmup_s: float) -> list[list[object]]:
    data = _config(ECHO, workers, ECHO_BYTES)
    acme = next(t for t in data["tenants"] if t["id"] == "acme")
    acme["rate_limit"] = {"requests_per_s": REFUSED_RATE}
    rows: list[list[object]] = []
    with mandant_process(write_config(data), SERVER_CPU, THREAD_ENV) as served:
        phases: list[tuple[str, Attack | None]] = [
            ("alone", None),
            ("beside raw BYTES calls", _refused_bytes(False, seconds)),
            ("beside typed bytes_contents calls", _refused_bytes(True, seconds)),
        ]
        for label, attack in phases:
            rows.append([workers, label, *asyncio.run(_beside(served, attack, seconds, warmup_s))])
    return rows


# -- compressed ---------------------------------------------------------------------------

#: What acme's compressed messages inflate to: 60 MiB, under max_message_bytes.
COMPRESSED_BYTES = 60 << 20
#: Connections sending acme's compressed calls, each one call after another.
COMPRESSED_SENDERS = 2
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _raw_compressed_call(
    connection: h2.connection.H2Connection, sock: socket.socket, headers: list[Any], frame: bytes
) -> str:
    """One gRPC call of ``frame`` (a length-prefixed message, compressed) on a raw
    HTTP/2 connection: its status's name once it ends."""
    stream = connection.get_next_available_stream_id()
    connection.send_headers(stream, headers)
    unsent, status = frame, ""
    while not status:
        size = min(
            len(unsent),
            connection.local_flow_control_window(stream),
            connection.max_outbound_frame_size,
        )
        if size > 0:
            connection.send_data(stream, unsent[:size], end_stream=size == len(unsent))
            unsent = unsent[size:]
        sock.sendall(connection.data_to_send())
        if unsent and size > 0:
            continue
        data = sock.recv(1 << 16)
        if not data:
            return "connection closed"
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                fields = {bytes(k): bytes(v) for k, v in event.headers}
                if b"grpc-status" in fields:
                    status = STATUS_NAMES.get(int(fields[b"grpc-status"]), "UNKNOWN")
            elif isinstance(event, h2.events.StreamReset):
                status = status or "stream reset"
            elif isinstance(event, h2.events.DataReceived):
                connection.acknowledge_received_data(event.flow_controlled_length, stream)
        sock.sendall(connection.data_to_send())
    return status


def _compressed_calls(seconds: float) -> Attack:
    message = pb.ModelMetadataRequest(name="a" * COMPRESSED_BYTES).SerializeToString()
    packed = gzip.compress(message)
    frame = struct.pack(">?I", True, len(packed)) + packed
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/inference.GRPCInferenceService/ModelMetadata"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-encoding", "gzip"),
        ("authorization", f"Bearer {KEYS['acme']}"),
    ]

    def send(served: Served) -> tuple[object, float]:
        statuses: dict[str, int] = {}
        until = time.perf_counter() + seconds
        host, _, port = served.target.rpartition(":")

        def sender() -> None:
            with socket.create_connection((host, int(port))) as sock:
                connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                connection.initiate_connection()
                sock.sendall(connection.data_to_send())
                while time.perf_counter() < until:
                    code = _raw_compressed_call(connection, sock, headers, frame)
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == "connection closed":
                        break

        return _in_threads(sender, COMPRESSED_SENDERS, statuses)

    return send


def compressed(workers: int, seconds: float, warmup_s: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for accepted in (True, False):
        data = _config(ECHO, workers)
        data["server"]["grpc_compression"] = accepted
        with mandant_process(write_config(data), SERVER_CPU, THREAD_ENV) as served:
            phases: list[tuple[str, Attack | None]] = [
                ("alone", None),
                ("beside gzip calls of 60 MiB", _compressed_calls(seconds)),
            ]
            for label, attack in phases:
                figures = asyncio.run(_beside(served, attack, seconds, warmup_s))
                rows.append([workers, "on" if accepted else "off (default)", label, *figures])
    return rows


# -- rest-gzip ----------------------------------------------------------------------------

#: acme's REST bodies at once, on as many connections, each one after another.
GZIP_BODIES = 16
#: What each inflates to.
GZIP_INFLATED = 60 << 20


def _gzip_bodies(seconds: float) -> Attack:
    body = gzip.compress(bytes(GZIP_INFLATED), compresslevel=9)

    def send(served: Served) -> tuple[object, float]:
        statuses: dict[int, int] = {}
        until = time.perf_counter() + seconds

        def connection_loop() -> None:
            headers = {"Authorization": f"Bearer {KEYS['acme']}", "Content-Encoding": "gzip"}
            while time.perf_counter() < until:
                connection = http.client.HTTPConnection("127.0.0.1", served.rest_port, timeout=600)
                connection.request("POST", "/v2/models/echo/infer", body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                connection.close()  # a refused body's connection is closed
                statuses[answer.status] = statuses.get(answer.status, 0) + 1

        return _in_threads(connection_loop, GZIP_BODIES, statuses)

    return send


def _peak_mb(pid: int) -> int:
    """The largest ``VmHWM`` (peak resident memory) of ``pid`` and its descendants, MB."""
    peak, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) // 1024)
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(child) for child in children.read().split()]
        except OSError:
            continue
    return peak


def rest_gzip(workers: int, seconds: float, warmup_s: float) -> list[list[object]]:
    rows: list[list[object]] = []
    with mandant_process(write_config(_config(ECHO, workers)), SERVER_CPU, THREAD_ENV) as served:
        phases: list[tuple[str, Attack | None]] = [
            ("alone", None),
            (f"beside {GZIP_BODIES} gzip bodies at once", _gzip_bodies(seconds)),
        ]
        for label, attack in phases:
            figures = asyncio.run(_beside(served, attack, seconds, warmup_s))
            rows.append([workers, label, *figures, _peak_mb(served.pid)])
    return rows


# -- amplified ----------------------------------------------------------------------------

#: Each answer's bytes; the tenant's bound on unread answers; acme's streams, messages
#: on each, and unary calls.
AMPLIFIED_BYTES = 4 << 20
AMPLIFIED_BOUND = 32 << 20
AMPLIFIED_STREAMS, AMPLIFIED_MESSAGES, AMPLIFIED_CALLS = 2, 64, 64
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
#: A connection of its own whose receive window stays at HTTP/2's 64 KiB (answers of
#: any size taken once read).
NOT_READING = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_receive_message_length", -1),
)
WIDEN: dict[str, Any] = {
    "name": "widen",
    "backend": "torch",
    "factory": "benchmarks._models:widen",
    "factory_args": {"width": AMPLIFIED_BYTES // 4},
    "device": "cpu",
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 1]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, AMPLIFIED_BYTES // 4]}],
}


def _widen_request(index: int) -> bytes:
    request = pb.ModelInferRequest(model_name="widen", id=str(index))
    request.inputs.add(name="X", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(bytes(4))
    return request.SerializeToString()


def _amplified(streams: bool, seconds: float) -> Attack:
    """acme's requests, all sent at once and none of their answers read for
    ``seconds``; then read: how many were answered and how many refused."""

    async def run(served: Served) -> tuple[object, float]:
        metadata = (("authorization", f"Bearer {KEYS['acme']}"),)
        count = AMPLIFIED_STREAMS if streams else AMPLIFIED_CALLS
        messages = AMPLIFIED_MESSAGES if streams else 1
        channels = [grpc.aio.insecure_channel(served.target, options=NOT_READING)
                    for _ in range(count)]  # fmt: skip
        start = time.perf_counter()
        answered = refused = 0
        try:
            calls = []
            for channel in channels:
                call = channel.stream_stream(STREAM if streams else INFER)(metadata=metadata)
                for index in range(messages):
                    await call.write(_widen_request(index))
                if not streams:
                    await call.done_writing()
                calls.append(call)
            await asyncio.sleep(seconds)  # answers made, none read
            for call in calls:
                for _ in range(messages):
                    try:
                        raw = await call.read()
                    except grpc.aio.AioRpcError:
                        refused += 1
                        continue
                    if streams and pb.ModelStreamInferResponse.FromString(raw).error_message:
                        refused += 1
                    else:
                        answered += 1
                call.cancel()
        finally:
            for channel in channels:
                await channel.close()
        return f"{answered} answered, {refused} refused", time.perf_counter() - start

    return lambda served: asyncio.run(run(served))


def amplified(workers: int, seconds: float, warmup_s: float) -> list[list[object]]:
    """Phases in servers of their own (peak memory only grows): alone, then acme's
    streams; and acme's unary calls."""
    data = _config(ECHO, workers, WIDEN)
    data["server"]["max_unread_answer_bytes"] = AMPLIFIED_BOUND
    config = write_config(data)
    streams = f"beside {AMPLIFIED_STREAMS} streams x {AMPLIFIED_MESSAGES} messages, unread"
    unary = f"beside {AMPLIFIED_CALLS} unary calls, unread"
    servers: list[list[tuple[str, Attack | None]]] = [
        [("alone", None), (streams, _amplified(True, seconds))],
        [(unary, _amplified(False, seconds))],
    ]
    rows: list[list[object]] = []
    for phases in servers:
        with mandant_process(config, SERVER_CPU, THREAD_ENV) as served:
            for label, attack in phases:
                figures = asyncio.run(_beside(served, attack, seconds, warmup_s))
                rows.append([workers, label, *figures, _peak_mb(served.pid)])
    return rows


# -- deadlines ----------------------------------------------------------------------------

#: The flood's callers, its connections, and each of its calls' gRPC deadline.
FLOOD_CALLERS = 32
FLOOD_CONNECTIONS = 4
FLOOD_DEADLINE_S = 0.003
#: A key no tenant has.
NOBODY_KEY = "not-a-key"


async def _deadline_flood(target: str, key: str, seconds: float) -> dict[str, int]:
    """Calls of :data:`FLOOD_DEADLINE_S` on :data:`FLOOD_CONNECTIONS` connections
    for ``seconds``, each caller calling again at once: how each ended, counted."""
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(bytes(4))
    payload = request.SerializeToString()
    metadata = (("authorization", f"Bearer {key}"),)
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
    channels = [
        grpc.aio.insecure_channel(target, options=options) for _ in range(FLOOD_CONNECTIONS)
    ]
    calls = [channel.unary_unary(INFER) for channel in channels]
    ended: dict[str, int] = {}
    end = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        call = calls[n % FLOOD_CONNECTIONS]
        while time.perf_counter() < end:
            try:
                await call(payload, metadata=metadata, timeout=FLOOD_DEADLINE_S)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            ended[code] = ended.get(code, 0) + 1

    await asyncio.gather(*(caller(n) for n in range(FLOOD_CALLERS)))
    for channel in channels:
        await channel.close()
    return ended


def _flood_process(target: str, key: str, seconds: float) -> tuple[dict[str, int], float, float]:
    """The flood, in a process of its own: how its calls ended, and when it began and
    ended (``time.monotonic``, one clock for every process of the host)."""
    began = time.monotonic()
    ended = asyncio.run(_deadline_flood(target, key, seconds))
    return ended, began, time.monotonic()


async def _beside_flood(target: str, key: str | None, seconds: float) -> list[object]:
    """globex's tiny calls while a flood with ``key`` runs (None: for ``seconds``
    alone): how the flood's calls ended, then the tiny calls begun while it ran, their
    p50, p99 and worst ms, and the tiny calls that failed."""
    stop = asyncio.Event()
    starts: list[float] = []
    tiny = asyncio.create_task(_tiny_calls(target, stop, starts))
    if key is None:
        began = time.monotonic()
        await asyncio.sleep(seconds)
        summary, until = "", time.monotonic()
    else:
        job = (_flood_process, (target, key, seconds))
        [(ended, began, until)] = await asyncio.to_thread(run_pinned, [job])
        summary = ", ".join(f"{code} {count}" for code, count in sorted(ended.items()))
    stop.set()
    latencies, errors = await tiny
    during = [t for t, s in zip(latencies, starts, strict=True) if began <= s <= until]
    return [
        summary,
        len(during),
        f"{_percentile(during, 0.5):.1f}",
        f"{_percentile(during, 0.99):.1f}",
        f"{max(during) * 1000:.0f}" if during else "",
        errors,
    ]


def deadlines(seconds: float) -> list[list[object]]:
    rows: list[list[object]] = []
    floods = [
        ("alone", None),
        ("3 ms calls, a key nobody has", NOBODY_KEY),
        ("3 ms calls, acme's key", KEYS["acme"]),
    ]
    with bare_grpc_process(str(SERVER_CPU)) as bare:
        for label, key in floods[:2]:
            row = asyncio.run(_beside_flood(bare.target, key, seconds))
            rows.append(["bare grpc.aio", label.replace(", a key nobody has", ""), *row])
    for streams in (None, 128):
        data = _config(ECHO, 1)
        if streams is not None:
            data["server"]["max_concurrent_streams"] = streams
        server = f"Mandant, max_concurrent_streams {streams or '1024 (default)'}"
        with mandant_process(write_config(data), SERVER_CPU, THREAD_ENV) as served:
            for label, key in floods:
                rows.append(
                    [server, label, *asyncio.run(_beside_flood(served.target, key, seconds))]
                )
    return rows


def _config(model: dict[str, Any], workers: int, *more: dict[str, Any]) -> dict[str, Any]:
    data = demo_data([model, *more])
    data["server"] = {**data["server"], "workers": workers}
    return data


#: The columns globex's tiny calls fill beside an attack (``_beside``).
TINY = ["tiny calls", "p50 ms", "worst ms", "failed"]


def _reports(args: argparse.Namespace) -> dict[str, tuple[str, list[str], Callable[[int], Rows]]]:
    """Each attack's title, columns, and rows for one ``workers`` count."""
    seconds, warmup = args.seconds, args.warmup
    tiny = "globex's tiny gRPC calls (one per 20 ms)"
    callers = (args.json_callers[0], args.json_callers[1])
    return {
        "shapes": (
            "shapes: victim (32 callers, [1, 4]) on a model of 10 ms per batch, max 64 rows",
            ["workers", "phase", "victim calls/s", "p50 ms", "p99 ms", "attacker calls/s",
             "mean batch"],
            lambda workers: shapes(workers, seconds, warmup),
        ),
        "rest-json": (
            f"rest-json: {tiny} while acme's REST call runs",
            ["workers", "phase", "REST status", "REST s", *TINY],
            lambda workers: rest_json(
                workers, seconds, warmup, args.values, args.bytes_element, callers
            ),
        ),
        "json-bodies": (
            f"json-bodies: {tiny} while acme sends JSON bodies as long as max_json_bytes "
            f"lets them be, on {JSON_CONNECTIONS} connections",
            ["workers", "max_json_bytes", "acme's limit", "phase", "acme's answers",
             "acme's s", *TINY],
            lambda workers: json_bodies(workers, seconds, warmup),
        ),
        "messages": (
            f"messages: {tiny} while acme sends one request",
            ["workers", "phase", "acme's status", "acme's s", *TINY],
            lambda workers: messages(workers, warmup),
        ),
        "refused-bytes": (
            f"refused-bytes: {tiny} while acme, allowed {REFUSED_RATE:g} request/s, sends "
            f"calls of {REFUSED_ELEMENTS:,} BYTES elements (0-2 bytes each) from "
            f"{REFUSED_SENDERS} threads for --seconds",
            ["workers", "phase", "acme's answers", "acme's s", *TINY],
            lambda workers: refused_bytes(workers, seconds, warmup),
        ),
        "compressed": (
            f"compressed: {tiny} while acme sends gRPC messages of {COMPRESSED_BYTES >> 20} "
            f"MiB gzip-compressed (~60 KiB sent) on {COMPRESSED_SENDERS} connections, one "
            "after another, for --seconds",
            ["workers", "grpc_compression", "phase", "acme's answers", "acme's s", *TINY],
            lambda workers: compressed(workers, seconds, warmup),
        ),
        "rest-gzip": (
            f"rest-gzip: {tiny} while acme keeps {GZIP_BODIES} REST bodies of gzip going at "
            f"once, each inflating to {GZIP_INFLATED >> 20} MiB",
            ["workers", "phase", "acme's answers", "acme's s", *TINY, "server peak MB"],
            lambda workers: rest_gzip(workers, seconds, warmup),
        ),
        "amplified": (
            f"amplified: {tiny} while acme sends 4-byte requests answered "
            f"{AMPLIFIED_BYTES >> 20} MiB each and reads nothing for --seconds "
            f"(max_unread_answer_bytes {AMPLIFIED_BOUND >> 20} MiB)",
            ["workers", "phase", "acme's answers", "acme's s", *TINY, "server peak MB"],
            lambda workers: amplified(workers, seconds, warmup),
        ),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--values", type=int, default=10_000_000)
    parser.add_argument("--bytes-element", type=int, default=48 << 20)
    parser.add_argument(
        "--json-callers",
        type=int,
        nargs=2,
        default=[16, 1_000_000],
        metavar=("CALLS", "VALUES"),
        help="rest-json: acme's REST calls at once and the values of each (JSON answers)",
    )
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=["shapes", "rest-json", "json-bodies", "messages", "refused-bytes"],
        choices=["shapes", "rest-json", "json-bodies", "messages", "refused-bytes",
                 "compressed", "rest-gzip", "deadlines", "amplified"],
    )  # fmt: skip
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {CLIENT_CPU})
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, (title, columns, rows_of) in _reports(args).items():
        if name in args.attacks:
            rows = [row for workers in args.workers for row in rows_of(workers)]
            print(f"\n{title}")
            print(table(columns, rows))
    if "deadlines" in args.attacks:  # one process, against a bare server: no --workers
        deadline_rows = deadlines(args.seconds)
        print(
            f"\ndeadlines: globex's tiny gRPC calls (one per 20 ms) while a flood of calls with a "
            f"{FLOOD_DEADLINE_S * 1000:g} ms deadline runs ({FLOOD_CALLERS} callers, "
            f"{FLOOD_CONNECTIONS} connections, --seconds); one process, core 0"
        )
        print(table(
            ["server", "phase", "flood's calls ended", "tiny calls during it", "p50 ms",
             "p99 ms", "worst ms", "failed"],
            deadline_rows,
        ))  # fmt: skip


if __name__ == "__main__":
    main()
