"""Front end vs the bare floor: ``echo`` calls/s and stream messages/s through Mandant
against a bare grpc.aio server (``benchmarks/_bare_server.py``: nothing of Mandant), in
one run, with the ratios the issue's targets are set on.

    .venv/bin/python -m benchmarks.frontend [--seconds 5] [--inflight 64] [--streams 1]
        [--ladder-rounds 3]

Each server runs alone on core 0 (``taskset``, one torch thread); each load generator
is a process of its own on core 1. Modes, each ``--inflight`` calls or messages in
flight (except the last):

- light unary: pre-serialized ``ModelInferRequest`` bytes over raw grpc.aio (no
  protobuf work in the client), one channel;
- light stream: the same bytes as ``ModelStreamInfer`` messages on ``--streams``
  streams, each response checked for ``error_message`` by its first byte only;
- tritonclient.grpc.aio ``infer``; tritonclient.grpc.aio ``stream_infer``;
  tritonclient.grpc ``start_stream``/``async_stream_infer`` (the sync client);
- mandant_client's ``AsyncClient(multiplex=True)`` (calls share one stream);
- mandant_client's sync ``Client``, one call at a time: p50 and p99.

Then the call path taken apart: the light unary mode against ``mandant serve`` whose
ModelInfer is answered by the bare server's handler (``benchmarks/_probe``: the whole
server, its other ports, timers, heap and gRPC options, without Mandant's call path);
with Mandant's gate and the bare answer; with the data plane and encoding too, the
model's call answering its inputs; and as served. Each of those servers runs
``--ladder-rounds`` times, in turn, and the table gives the median round with the
event loop's CPU per call and what each step added to it. Then the light unary and
stream modes against ``mandant serve`` with the steps of its call path timed in thread
CPU (the probe's ``MANDANT_PROBE_SECTIONS``): where that path's time goes under this
load. Last, the light unary mode at 1, 4, 16 and ``--inflight`` calls in flight
against Mandant with its front-end gathering on (the default) and off
(``server.front_gather_ms: 0``; ``mandant/scheduling/gather.py``): calls/s, p50, p99.

Before the stream modes, one stream is checked: 64 messages with distinct ids and
inputs must come back each with its own id and its own input. A mode that fails shows
``error: …`` in the table instead of a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks._load import (
    ECHO,
    KEYS,
    THREAD_ENV,
    Load,
    Result,
    demo_data,
    describe,
    prime,
    run_pinned,
    table,
)
from benchmarks._probe.sitecustomize import HANDLER_SECTION, HELD_SECTION, STREAM_SECTION
from benchmarks._server import (
    bare_grpc_process,
    mandant_process,
    probe_env,
    thread_cpu_s,
    write_config,
)

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MODEL = "echo"
TENANT = "acme"
#: First byte of a serialized ModelStreamInferResponse whose error_message is empty
#: and infer_response set: field 2, length-delimited (proto3 writes fields in order).
INFER_RESPONSE_TAG = b"\x12"
#: Per mode: how long past its window it may take before it counts as hung.
HANG_S = 30.0


@dataclass(frozen=True)
class Settings:
    width: int
    inflight: int
    streams: int
    warmup_s: float
    seconds: float
    #: The server's process, whose CPU the light modes read from /proc (0: none).
    server_pid: int = 0

    def load(self, client: str, concurrency: int | None = None) -> Load:
        return Load(TENANT, MODEL, concurrency or self.inflight, 1, self.width, client)

    def window(self) -> tuple[float, float]:
        """(start, end) of the measured window, from now."""
        measure_from = time.perf_counter() + self.warmup_s
        return measure_from, measure_from + self.seconds


#: A load against a target: a function, or a coroutine function run in its own loop.
Mode = Callable[[str, Settings], Result | Coroutine[Any, Any, Result]]


async def _server_cpu(pid: int, measure_from: float, end: float) -> tuple[float, float] | None:
    """The server's CPU seconds between ``measure_from`` and ``end`` (perf_counter
    times): (main thread, other threads)."""
    if not pid:
        return None
    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
    main_before, other_before = thread_cpu_s(pid)
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    main_after, other_after = thread_cpu_s(pid)
    return main_after - main_before, other_after - other_before


def _metadata() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[TENANT]}"),)


def _request(width: int, request_id: str, value: float = 0.0) -> Any:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.full((1, width), value, np.float32).tobytes())
    return request


# -- light client: pre-serialized bytes over raw grpc.aio ------------------------------


async def _light_unary(target: str, settings: Settings) -> Result:
    payload = _request(settings.width, "0").SerializeToString()
    result = Result(settings.load("light"), settings.seconds)
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(INFER)  # no serializers: bytes in, bytes out
        metadata = _metadata()
        measure_from, end = settings.window()
        cpu = asyncio.create_task(_server_cpu(settings.server_pid, measure_from, end))

        async def worker() -> None:
            while (now := time.perf_counter()) < end:
                try:
                    await infer(payload, metadata=metadata, timeout=HANG_S)
                except grpc.aio.AioRpcError as exc:
                    result.failed(exc)
                    await asyncio.sleep(0.01)
                    continue
                if now >= measure_from:
                    result.record((time.perf_counter() - now) * 1000)

        await asyncio.gather(*(worker() for _ in range(settings.inflight)))
        result.server_cpu_s = await cpu
    return result


async def _check_stream(target: str, width: int, count: int = 64) -> str:
    """ "" when ``count`` messages written at once on one stream all come back, each
    with its own id and its own input as output; else what went wrong."""
    from tritonclient.grpc import service_pb2 as pb

    async with grpc.aio.insecure_channel(target) as channel:
        stub = channel.stream_stream(
            STREAM,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        requests = [_request(width, f"check-{n}", float(n)) for n in range(count)]
        try:
            call = stub(iter(requests), metadata=_metadata(), timeout=HANG_S)
            responses = [response async for response in call]
        except grpc.aio.AioRpcError as exc:
            return describe(exc)
    errors = [r.error_message for r in responses if r.error_message]
    if errors:
        return f"error_message: {errors[0][:60]}"
    seen = {}
    for response in responses:
        infer = response.infer_response
        if not infer.raw_output_contents:
            return f"response {infer.id!r} has no raw output"
        seen[infer.id] = float(np.frombuffer(infer.raw_output_contents[0], np.float32)[0])
    expected = {f"check-{n}": float(n) for n in range(count)}
    if len(responses) != count or seen != expected:
        return f"{len(responses)} responses for {count} messages, ids or outputs mismatched"
    return ""


async def _light_stream(target: str, settings: Settings) -> Result:
    result = Result(settings.load("light-stream"), settings.seconds)
    if problem := await _check_stream(target, settings.width):
        result.failed(f"check: {problem}")
        return result
    payloads = [
        _request(settings.width, str(n)).SerializeToString() for n in range(settings.inflight)
    ]
    measure_from, end = settings.window()
    share = max(1, settings.inflight // settings.streams)

    async def one_stream(channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(STREAM)(metadata=_metadata())
        free = asyncio.Semaphore(share)

        async def write() -> None:
            sent = 0
            while time.perf_counter() < end:
                await free.acquire()
                await call.write(payloads[sent % len(payloads)])
                sent += 1
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for message in call:
                free.release()
                if message[:1] == INFER_RESPONSE_TAG:
                    if measure_from <= time.perf_counter() < end:
                        result.record()
                else:
                    result.failed(_stream_error(message))
        except grpc.aio.AioRpcError as exc:
            result.failed(exc)
        finally:
            writer.cancel()

    cpu = asyncio.create_task(_server_cpu(settings.server_pid, measure_from, end))
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.gather(*(one_stream(channel) for _ in range(settings.streams)))
    result.server_cpu_s = await cpu
    return result


def _stream_error(message: bytes) -> str:
    from tritonclient.grpc import service_pb2 as pb

    text = pb.ModelStreamInferResponse.FromString(message).error_message
    return f"error_message: {text[:60]}" if text else "empty stream response"


# -- tritonclient ----------------------------------------------------------------------


async def _tritonclient_stream(target: str, settings: Settings) -> Result:
    import tritonclient.grpc.aio as triton

    result = Result(settings.load("tritonclient-stream"), settings.seconds)
    client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("INPUT0", [1, settings.width], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, settings.width), np.float32))
    free = asyncio.Semaphore(settings.inflight)
    measure_from, end = settings.window()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        sent = 0
        while time.perf_counter() < end:
            await free.acquire()
            yield {"model_name": MODEL, "inputs": [tensor], "request_id": str(sent)}
            sent += 1

    try:
        responses = client.stream_infer(requests(), headers=dict(_metadata()))
        async for answer, error in responses:
            free.release()
            if error is not None:
                result.failed(error)
            elif answer is not None and measure_from <= time.perf_counter() < end:
                result.record()
    except Exception as exc:  # the stream itself failed: grpc or tritonclient error
        result.failed(exc)
    finally:
        await client.close()
    return result


def _tritonclient_sync_stream(target: str, settings: Settings) -> Result:
    import tritonclient.grpc as triton

    measured = Result(settings.load("tritonclient-sync-stream"), settings.seconds)
    client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("INPUT0", [1, settings.width], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, settings.width), np.float32))
    free = threading.Semaphore(settings.inflight)
    measure_from, end = settings.window()

    def answered(result: Any, error: Any) -> None:  # tritonclient passes keywords
        now = time.perf_counter()
        if error is not None and now < end:  # past the end: stop_stream's cancellations
            measured.failed(f"{type(error).__name__}: {error}"[:80])
        elif error is None and measure_from <= now < end:
            measured.record()
        free.release()

    client.start_stream(answered, headers=dict(_metadata()))
    try:
        sent = 0
        while time.perf_counter() < end:
            if not free.acquire(timeout=2):
                measured.failed(measured.error or "no answer within 2 s")
                break
            client.async_stream_infer(MODEL, [tensor], request_id=str(sent))
            sent += 1
    except Exception as exc:  # tritonclient raises its own exception type
        measured.failed(exc)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return measured


async def _mandant_client_multiplexed(target: str, settings: Settings) -> Result:
    """mandant_client's AsyncClient with ``multiplex=True``: concurrent ``infer`` calls
    share one ModelStreamInfer stream."""
    from mandant_client import AsyncClient

    result = Result(settings.load("mandant_client-multiplex"), settings.seconds)
    x = np.zeros((1, settings.width), np.float32)
    measure_from, end = settings.window()
    async with AsyncClient(
        target,
        api_key=KEYS[TENANT],
        timeout_s=HANG_S,
        multiplex=True,
        max_in_flight=settings.inflight,
    ) as client:

        async def worker() -> None:
            while (now := time.perf_counter()) < end:
                try:
                    await client.infer(MODEL, {"INPUT0": x})
                except Exception as exc:  # MandantClientError and its subclasses
                    result.failed(exc)
                    await asyncio.sleep(0.01)
                    continue
                if now >= measure_from:
                    result.record((time.perf_counter() - now) * 1000)

        await asyncio.gather(*(worker() for _ in range(settings.inflight)))
    return result


def _sync_client_latency(target: str, settings: Settings) -> Result:
    """mandant_client's sync Client, one call at a time."""
    from mandant_client import Client

    result = Result(settings.load("mandant_client", 1), settings.seconds)
    x = np.zeros((1, settings.width), np.float32)
    measure_from, end = settings.window()
    with Client(target, api_key=KEYS[TENANT], timeout_s=HANG_S) as client:
        while (now := time.perf_counter()) < end:
            try:
                client.infer(MODEL, {"INPUT0": x})
            except Exception as exc:  # MandantClientError and its subclasses
                result.failed(exc)
                time.sleep(0.01)
                continue
            if now >= measure_from:
                result.record((time.perf_counter() - now) * 1000)
    return result


# -- the run ---------------------------------------------------------------------------


def _bounded(mode: Mode, target: str, settings: Settings) -> Result:
    """Run ``mode`` (async or not) in this process; a hang or crash becomes an error."""
    limit_s = settings.warmup_s + settings.seconds + HANG_S
    try:
        # A sync mode runs in this call; an async one returns its coroutine, run below.
        outcome = mode(target, settings)
        if isinstance(outcome, Result):
            return outcome
        return asyncio.run(asyncio.wait_for(outcome, limit_s))
    except Exception as exc:  # report, do not crash the table
        result = Result(settings.load("failed"), settings.seconds)
        result.failed(f"{type(exc).__name__}: {exc}"[:80] if str(exc) else type(exc).__name__)
        return result


def _tritonclient_unary(target: str, settings: Settings) -> Result:
    from benchmarks._load import closed_loop

    return closed_loop(target, settings.load("tritonclient"), settings.warmup_s, settings.seconds)


#: (label, unit, mode, target ratio Mandant/floor or None)
MODES: list[tuple[str, str, Mode, float | None]] = [
    ("light client, unary", "calls/s", _light_unary, 0.75),
    ("light client, ModelStreamInfer", "msgs/s", _light_stream, 0.70),
    ("tritonclient.grpc.aio infer", "calls/s", _tritonclient_unary, None),
    ("tritonclient.grpc.aio stream_infer", "msgs/s", _tritonclient_stream, None),
    ("tritonclient.grpc start_stream", "msgs/s", _tritonclient_sync_stream, None),
    ("mandant_client AsyncClient(multiplex=True)", "msgs/s", _mandant_client_multiplexed, None),
]
#: Concurrency-1 p50 with the sync mandant_client: "no worse than today (≈ 0.9 ms)".
P50_TARGET_MS = 0.9


def measure(target: str, settings: Settings) -> list[Result]:
    prime(target, MODEL, settings.width)
    jobs = [(_bounded, (mode, target, settings)) for _, _, mode, _ in MODES]
    jobs.append((_bounded, (_sync_client_latency, target, settings)))
    return [run_pinned([job])[0] for job in jobs]  # one mode at a time


def _cell(result: Result, value: float, digits: int = 0) -> str:
    if result.answered == 0:
        return f"error: {result.error or 'nothing answered'}"
    text = f"{value:,.{digits}f}"
    return f"{text} ({result.errors} errors)" if result.errors else text


def _verdict(ratio: float, target: float, higher_is_better: bool = True) -> str:
    if np.isnan(ratio):
        return "not measured"
    met = ratio >= target if higher_is_better else ratio <= target
    return "met" if met else "NOT met"


def report(settings: Settings, floor: list[Result], mandant: list[Result]) -> str:
    rows: list[tuple[object, ...]] = []
    for (label, unit, _, target), bare, ours in zip(MODES, floor, mandant, strict=False):
        ratio = ours.rps / bare.rps if ours.answered and bare.answered else float("nan")
        goal = f"≥ {target:.2f}" if target else "–"
        verdict = _verdict(ratio, target) if target else ""
        rows.append(
            (
                f"{label} ({settings.inflight} in flight)",
                unit,
                _cell(bare, bare.rps),
                _cell(ours, ours.rps),
                "–" if np.isnan(ratio) else f"{ratio:.2f}",
                goal,
                verdict,
            )
        )
    bare, ours = floor[-1], mandant[-1]
    for q in (50, 99):
        ratio = ours.p(q) / bare.p(q) if ours.answered and bare.answered else float("nan")
        goal = f"Mandant ≤ {P50_TARGET_MS} ms" if q == 50 else "–"
        verdict = _verdict(ours.p(q), P50_TARGET_MS, False) if q == 50 else ""
        rows.append(
            (
                f"mandant_client sync, concurrency 1, p{q}",
                "ms",
                _cell(bare, bare.p(q), 3),
                _cell(ours, ours.p(q), 3),
                "–" if np.isnan(ratio) else f"{ratio:.2f}",
                goal,
                verdict,
            )
        )
    lines = [
        f"echo, FP32 [1, {settings.width}], {settings.seconds:g} s per mode after "
        f"{settings.warmup_s:g} s warm-up; server on core 0, client on core 1; "
        f"stream modes on {settings.streams} stream(s)",
        table(["mode", "unit", "bare floor", "Mandant", "Mandant/floor", "target", ""], rows),
    ]
    lines += ["", cpu_report(floor, mandant)]
    failures = [
        f"  {side} / {result.load.client}: {result.errors} errors, first: {result.error}"
        for side, results in (("bare", floor), ("Mandant", mandant))
        for result in results
        if result.errors and result.answered
    ]
    if failures:
        lines += ["", "errors in modes that still answered:", *failures]
    return "\n".join(lines)


def cpu_report(floor: list[Result], mandant: list[Result]) -> str:
    """Where each server's core went in the light modes: CPU µs per answered call or
    message, its main thread (the event loop: gRPC's Python layer and the handlers)
    apart from its other threads (gRPC's C core)."""
    rows: list[tuple[object, ...]] = []
    for (label, _, mode, _), bare, ours in zip(MODES, floor, mandant, strict=False):
        if mode not in (_light_unary, _light_stream):
            continue
        cells: list[object] = [label]
        per_call = []
        for result in (bare, ours):
            if result.server_cpu_s is None or not result.answered:
                cells += ["–", "–"]
                per_call.append(float("nan"))
                continue
            main, other = (s / result.answered * 1e6 for s in result.server_cpu_s)
            cells += [f"{main:.0f}", f"{other:.0f}"]
            per_call.append(main)
        cells.append(f"{per_call[1] - per_call[0]:.0f}")
        rows.append(tuple(cells))
    return "server CPU µs per answered call (from /proc, the measured window):\n" + table(
        ["mode", "floor: main thread", "floor: other threads", "Mandant: main thread",
         "Mandant: other threads", "main thread, Mandant − floor"],
        rows,
    )  # fmt: skip


#: The call path taken apart (``benchmarks/_probe``): (label, the probe's flags), from
#: the whole server without Mandant's call path to Mandant as served.
LADDER: tuple[tuple[str, dict[str, str]], ...] = (
    ("mandant serve, ModelInfer answered by the bare handler", {"MANDANT_PROBE_BARE_HANDLER": "1"}),
    ("+ Mandant's gate (key, cap, door, gathering, parse, call metrics), the bare answer",
     {"MANDANT_PROBE_BARE_ANSWER": "1"}),
    ("+ the data plane and encoding, the model's call answering its inputs",
     {"MANDANT_PROBE_NO_MODEL": "1"}),
    ("+ the model's call (torch, inline): Mandant as served", {}),
)  # fmt: skip


def ladder(config: Path, settings: Settings, rounds: int) -> list[list[Result]]:
    """The light unary mode against each server of :data:`LADDER`, ``rounds`` times
    with the servers in turn: per step, its results."""
    results: list[list[Result]] = [[] for _ in LADDER]
    for _ in range(rounds):
        for step, (_, flags) in enumerate(LADDER):
            results[step].append(probed(config, settings, _light_unary, flags))
    return results


def ladder_report(results: list[list[Result]], floor: Result, rounds: int) -> str:
    """Each step of :data:`LADDER`: calls/s and server CPU per call (the median round
    by calls/s), and what the step added to the event loop's CPU per call."""
    rows: list[tuple[object, ...]] = []
    previous: float | None = None
    for label, step in [
        ("bare floor (benchmarks/_bare_server.py)", [floor]),
        *((label, runs) for (label, _), runs in zip(LADDER, results, strict=True)),
    ]:
        answered = sorted((r for r in step if r.answered and r.server_cpu_s), key=lambda r: r.rps)
        if not answered:
            rows.append((label, "error: " + (step[0].error or "nothing answered"), *"––––"))
            previous = None
            continue
        median = answered[len(answered) // 2]
        main, other = (s / median.answered * 1e6 for s in median.server_cpu_s or ())
        calls = f"{median.rps:,.0f}"
        if len(answered) > 1:
            calls += f" ({answered[0].rps:,.0f}–{answered[-1].rps:,.0f})"
        added = "–" if previous is None or step[0] is floor else f"{main - previous:+.0f}"
        rows.append(
            (label, calls, f"{median.rps / floor.rps:.2f}", f"{main:.0f}", f"{other:.0f}", added)
        )
        previous = main
    return (
        "\nthe call path taken apart (benchmarks/_probe; light client, unary; each server "
        f"{rounds} time(s), in turn; the median round by calls/s):\n"
        + table(
            ["server", "calls/s (range)", "of the floor", "main thread µs/call",
             "other threads µs/call", "main thread, added by the step"],
            rows,
        )
    )  # fmt: skip


#: Calls in flight of the gathering table (``--inflight`` is added).
GATHER_INFLIGHT = (1, 4, 16)


def gathering(data: dict[str, Any], settings: Settings) -> list[tuple[int, Result, Result]]:
    """The light unary mode at each of :data:`GATHER_INFLIGHT` and ``settings.inflight``
    calls in flight, against the server of configuration ``data`` with gathering on
    (its default) and off (``front_gather_ms: 0``): (in flight, on, off)."""
    on = write_config(data)
    off = write_config({**data, "server": {**data["server"], "front_gather_ms": 0}})
    rows = []
    for inflight in sorted({*GATHER_INFLIGHT, settings.inflight}):
        results = []
        for path in (on, off):
            with mandant_process(path, cpus="0", env=THREAD_ENV) as served:
                prime(served.target, MODEL, settings.width)
                load = replace(settings, inflight=inflight, server_pid=served.pid)
                results.append(run_pinned([(_bounded, (_light_unary, served.target, load))])[0])
        rows.append((inflight, results[0], results[1]))
    return rows


def gathering_report(rows: list[tuple[int, Result, Result]]) -> str:
    """Gathering on against off, light unary client (``scheduling/gather.py``)."""
    lines = []
    for inflight, on, off in rows:
        gain = on.rps / off.rps if on.answered and off.answered else float("nan")
        lines.append(
            (
                inflight,
                _cell(on, on.rps),
                _cell(off, off.rps),
                "–" if np.isnan(gain) else f"{gain:.2f}",
                f"{on.p(50):.3f} / {off.p(50):.3f}",
                f"{on.p(99):.3f} / {off.p(99):.3f}",
            )
        )
    headers = ["in flight", "calls/s on", "calls/s off", "on/off", "p50 ms on / off"]
    return (
        "\ngathering at the front end (server.front_gather_ms, default on; off: 0), light "
        "client, unary, one server started per cell:\n"
        + table([*headers, "p99 ms on / off"], lines)
    )


def sections_report(path: str, timed: Result, whole: str, mode: str) -> str:
    """The probe's thread CPU per step of the call path, per call (or message) of the
    ``whole`` step."""
    spent: dict[str, float] = {}
    calls = 0
    with open(path) as lines:
        for line in lines:
            label, count, total_s = line.rstrip("\n").split("\t")
            spent[label] = float(total_s)
            if label == whole:
                calls = int(count)
    if not calls:
        return f"\nsteps of the call path ({mode}): nothing was timed"
    whole_s = spent.pop(whole)
    if whole == HANDLER_SECTION:  # a held call waited while the loop ran others' work
        whole_s -= spent.get(HELD_SECTION, 0.0)
    for other in {HANDLER_SECTION, STREAM_SECTION} - {whole}:  # the priming calls'
        spent.pop(other, None)
    rows = [
        (label, f"{spent_s / calls * 1e6:.1f}")
        for label, spent_s in [(whole, whole_s), *spent.items()]
        if spent_s
    ]
    return (
        f"\nwhere Mandant's call path spends its time under this load ({mode}, "
        f"{timed.rps:,.0f}/s with the timers on; thread CPU µs per call or message, a "
        f"step's figure includes its parts'; {calls:,} timed):\n"
        + table(["step", "µs per call"], rows)
    )


def probed(config: Path, settings: Settings, mode: Mode, flags: dict[str, str]) -> Result:
    """Run ``mode``'s load against ``mandant serve`` loading the probe with ``flags``
    (``benchmarks/_probe``); with ``MANDANT_PROBE_SECTIONS``, its file of step totals is
    written (SIGUSR1) before the server stops."""
    with mandant_process(config, cpus="0", env=probe_env(flags, THREAD_ENV)) as served:
        prime(served.target, MODEL, settings.width)
        [result] = run_pinned(
            [(_bounded, (mode, served.target, replace(settings, server_pid=served.pid)))]
        )
        sections = flags.get("MANDANT_PROBE_SECTIONS")
        if sections:
            os.kill(served.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not os.path.exists(sections) and time.monotonic() < deadline:
                time.sleep(0.05)  # the probe renames the file into place when written
    return result


def timed_steps(config: Path, settings: Settings, mode: Mode) -> tuple[str, Result]:
    """Run ``mode``'s load against ``mandant serve`` with the probe's step timers;
    the file of their totals and the load's result."""
    sections = os.path.join(tempfile.mkdtemp(prefix="mandant-sections-"), "sections.tsv")
    return sections, probed(config, settings, mode, {"MANDANT_PROBE_SECTIONS": sections})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--ladder-rounds", type=int, default=3)
    args = parser.parse_args()
    settings = Settings(args.width, args.inflight, args.streams, args.warmup, args.seconds)
    with bare_grpc_process(cpus="0") as bare:
        floor = measure(bare.target, replace(settings, server_pid=bare.pid))
    data = demo_data([ECHO])
    config = write_config(data)
    with mandant_process(config, cpus="0", env=THREAD_ENV) as served:
        mandant = measure(served.target, replace(settings, server_pid=served.pid))
    steps = ladder(config, settings, args.ladder_rounds)
    unary_steps = timed_steps(config, settings, _light_unary)
    stream_steps = timed_steps(config, settings, _light_stream)
    gathered = gathering(data, settings)
    print(report(settings, floor, mandant))
    print(ladder_report(steps, floor[0], args.ladder_rounds))
    print(gathering_report(gathered))
    print(sections_report(*unary_steps, HANDLER_SECTION, "light client, unary"))
    print(sections_report(*stream_steps, STREAM_SECTION, "light client, ModelStreamInfer"))


if __name__ == "__main__":
    main()
