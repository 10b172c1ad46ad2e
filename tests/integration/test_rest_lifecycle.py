"""The REST port's lifecycle: ``mandant serve --rest-port`` binds it, and on shutdown
it stops taking connections while the calls in progress finish."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from tests.servers import (
    ECHO_MODEL,
    MANDANT,
    SUBPROCESS_ENV,
    ServerThread,
    demo_config,
    free_port,
    wait_for,
)

SLEEPY = {
    **ECHO_MODEL,
    "name": "sleepy",
    "factory": "tests.integration.slow_models:sleepy",
    "factory_args": {"seconds": 1.5},
}


def _infer(port: int, data: list[list[float]], model: str = "sleepy") -> tuple[int, Any]:
    """One JSON call of ``data`` (rows of FP32) to ``model`` as tenant t; its status
    and answer."""
    shape = [len(data), len(data[0])]
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "data": data}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer k"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _server(tmp_path: Path, model: dict[str, Any], **settings: Any) -> ServerThread:
    """``model`` served on free ports to tenant ``t`` (key ``k``), with the server
    ``settings``; not started."""
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, **settings},
            "tenants": [{"id": "t", "api_keys": [hash_key("k")]}],
            "models": [model],
        }
    )
    return ServerThread(config, tmp_path)


def test_shutdown_stops_listening_and_lets_calls_in_progress_finish(tmp_path: Path) -> None:
    server = _server(tmp_path, SLEEPY).start()
    assert server.app is not None
    rest, port = server.app.rest, server.app.rest_port
    results: list[tuple[int, Any]] = []
    caller = threading.Thread(target=lambda: results.append(_infer(port, [[1.0, 2.0, 3.0]])))
    caller.start()
    for _ in range(500):  # until the call is in the server (bounded, not timed)
        if rest.calls:
            break
        time.sleep(0.01)
    assert rest.calls == 1
    stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 30})
    stopper.start()
    for _ in range(500):
        if _refused(port):
            break
        time.sleep(0.01)
    assert caller.is_alive(), "the call should still be running while the port is closed"
    assert _refused(port)
    caller.join(30)
    stopper.join(30)
    ((status, answer),) = results
    assert status == 200
    assert answer["outputs"][0]["data"] == [2.0, 4.0, 6.0]


_STALLED = (
    b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
    b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs": ['
)


def test_shutdown_does_not_wait_for_a_body_that_never_arrives(tmp_path: Path) -> None:
    """Clients that stop sending halfway through their bodies do not hold the server's
    shutdown: on the REST port it waited for as long as the client kept its
    connection, on the HTTP port 10 s (aiohttp reading what is left of the body)."""
    server = _server(tmp_path, ECHO_MODEL).start()
    assert server.app is not None
    metrics = _STALLED.replace(b"POST /v2/models/echo/infer", b"GET /metrics")
    with (
        socket.create_connection(("127.0.0.1", server.app.rest_port)) as inference,
        socket.create_connection(("127.0.0.1", server.app.http_port)) as figures,
    ):
        inference.sendall(_STALLED)
        figures.sendall(metrics)
        time.sleep(0.3)
        started = time.monotonic()
        server.stop(grace_s=1)
        assert time.monotonic() - started < 5


def test_a_client_leaving_mid_body_is_no_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _server(tmp_path, ECHO_MODEL) as server:
        assert server.app is not None
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.app.rest_port)) as leaving:
                leaving.sendall(_STALLED)
                time.sleep(0.1)
        time.sleep(0.3)
        status, _ = _infer(server.app.rest_port, [[1.0]], model="echo")
        assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_rest_uses_the_servers_tls_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = demo_config(tls={"cert": str(cert), "key": str(key)})
    with ServerThread(config, tmp_path) as server:
        assert server.app is not None
        base = f"127.0.0.1:{server.app.rest_port}"
        trusted = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://{base}/v2/health/ready", context=trusted) as answer:
            assert answer.status == 200
        with pytest.raises(OSError):  # no plain HTTP beside it (the server hangs up)
            urllib.request.urlopen(f"http://{base}/v2/health/ready", timeout=10)


def test_mandant_serve_rest_port_flag(tmp_path: Path) -> None:
    config = {
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
        "tenants": [{"id": "t", "api_keys": [hash_key("k")]}],
        "models": [ECHO_MODEL],
    }
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [*MANDANT, "serve", "--config", str(path), "--rest-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=SUBPROCESS_ENV,
    )
    try:
        out = wait_for(proc, "KServe v2 REST")
        assert f"KServe v2 REST on http://127.0.0.1:{port}/v2" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready") as answer:
            assert answer.status == 200
        x = np.arange(3, dtype=np.float32).reshape(1, 3)
        body = {
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": x.tolist()}]
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/models/echo/infer",
            data=json.dumps(body).encode(),
            headers={"Authorization": "Bearer k"},
        )
        with urllib.request.urlopen(request) as answer:
            assert json.loads(answer.read())["outputs"][0]["data"] == [0.0, 1.0, 2.0]
    finally:
        proc.kill()
        proc.wait()


def test_a_client_leaving_while_its_call_runs_is_counted_cancelled(tmp_path: Path) -> None:
    """As on gRPC: the call is cancelled when its client goes (it was run to its end
    and counted OK, for nobody)."""
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    raw = json.dumps(body).encode()
    with _server(tmp_path, SLEEPY) as server:
        assert server.app is not None
        app = server.app
        with socket.create_connection(("127.0.0.1", app.rest_port)) as leaving:
            leaving.sendall(
                b"POST /v2/models/sleepy/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw)
            )
            for _ in range(500):  # until the call is in the server (bounded, not timed)
                if app.rest.calls:
                    break
                time.sleep(0.01)
            assert app.rest.calls == 1
        for _ in range(500):  # the client is gone: the call ends
            if not app.rest.calls:
                break
            time.sleep(0.01)
        counted = {
            labels["code"]: value
            for name, labels, value in server.call(_counts(app))
            if name == "mandant_requests_total" and labels["tenant"] == "t"
        }
    assert counted == {"CANCELLED": 1.0}


async def _counts(app: Any) -> list[tuple[str, dict[str, str], float]]:
    """The server's counters, read on its event loop."""
    return list(app.prometheus.usage_counts())


def test_requests_aiohttp_cannot_parse_log_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A header line over aiohttp's 8190 bytes is answered 400, on both HTTP ports; it
    once logged an ERROR with a traceback each time (any client could fill the log)."""
    with _server(tmp_path, ECHO_MODEL) as server:
        assert server.app is not None
        too_long = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
        for port in (server.app.rest_port, server.app.http_port):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(too_long)
                assert client.recv(64).startswith(b"HTTP/1.0 400")
        # A body that is not gzip as it says: read by the handler (a key), or by
        # aiohttp after a refusal (none) - each logged an ERROR with a traceback.
        for key, status in (({"Authorization": "Bearer k"}, 400), ({}, 401)):
            connection = http.client.HTTPConnection("127.0.0.1", server.app.rest_port)
            headers = {"Content-Encoding": "gzip", **key}
            connection.request("POST", "/v2/models/echo/infer", b"not gzip", headers)
            assert connection.getresponse().status == status
            connection.close()
        time.sleep(0.2)  # the server logs after answering
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_bodies_on_their_way_count_what_came_until_their_read_times_out(
    tmp_path: Path,
) -> None:
    """Uploads that never finish hold the memory of what came of their bodies: a
    caller's body that would pass two of the largest with it is refused (429, with
    pushback) where 20 of 64 MiB held 1.2 GB. Headers alone hold
    nothing: eight that announced the largest bodies and sent none held every tenant's
    REST bodies refused (server busy) for as long as their connections stayed. And a
    body not all come within ``message_read_timeout_s`` is answered 504 and freed."""
    largest = 1 << 20
    with _server(
        tmp_path, ECHO_MODEL, max_message_bytes=largest, message_read_timeout_s=4
    ) as server:
        assert server.app is not None
        port = server.app.rest_port

        def upload(sent: int) -> socket.socket:
            """A body of ``largest`` bytes announced, ``sent`` of them sent."""
            connection = socket.create_connection(("127.0.0.1", port))
            head, _, _ = _STALLED.partition(b"\r\n\r\n")
            head = head.replace(b"Content-Length: 1000", f"Content-Length: {largest}".encode())
            connection.sendall(head + b"\r\n\r\n" + b" " * sent)
            return connection

        announced = [upload(0) for _ in range(8)]
        nearly_whole: list[socket.socket] = []
        try:
            time.sleep(0.3)  # they are being read
            assert _infer(port, [[1.0]], model="echo")[0] == 200
            nearly_whole += [upload(largest - 4096) for _ in range(2)]
            time.sleep(0.3)
            with upload(largest // 2) as third:
                answer = _answer_of(third)
            assert answer.startswith(b"HTTP/1.1 429"), answer
            assert b"still on their way" in answer and b"Retry-After" in answer
            labels = {"tenant": "t", "reason": "request_bodies", "model": ""}
            assert server.app.metrics.get_sample_value("mandant_rejections_total", labels) == 1
            for stalled in announced + nearly_whole:
                answer = _answer_of(stalled)
                assert answer.startswith(b"HTTP/1.1 504"), answer
                assert b"the request message did not arrive within 4 s" in answer
        finally:
            for stalled in announced + nearly_whole:
                stalled.close()
        status, _ = _infer(port, [[1.0]], model="echo")
        assert status == 200


def test_the_server_wide_bound_on_bodies_tells_no_caller_what_the_others_send(
    tmp_path: Path,
) -> None:
    """Four tenants hold two uploads each, nearly whole, near the server's bound on
    bodies on their way (eight ``max_message_bytes``): a fifth's body is refused 429
    "server busy". The refusal quoted the total on its way, every caller's bytes to the
    byte, so one tenant could watch the others' uploads grow; it quotes the bound."""
    largest = 1 << 20
    holders = ["a", "b", "c", "d"]
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0,
                       "max_message_bytes": largest},
            "tenants": [{"id": name, "api_keys": [hash_key(f"{name}-key")]}
                        for name in [*holders, "probe"]],
            "models": [ECHO_MODEL],
        }
    )  # fmt: skip
    sent = largest - 12_345
    with ServerThread(config, tmp_path) as server:
        assert server.app is not None
        port = server.app.rest_port
        held = []
        try:
            for name in holders:
                for _ in range(2):
                    upload = socket.create_connection(("127.0.0.1", port))
                    upload.sendall(
                        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n"
                        + f"Authorization: Bearer {name}-key\r\n".encode()
                        + f"Content-Length: {largest}\r\n\r\n".encode()
                        + b" " * sent
                    )
                    held.append(upload)
            time.sleep(0.5)  # their bytes are counted as they come
            with socket.create_connection(("127.0.0.1", port)) as probe:
                probe.sendall(
                    b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer probe-key\r\nExpect: 100-continue\r\n"
                    + f"Content-Length: {largest}\r\n\r\n".encode()
                )
                answer = _answer_of(probe, timeout_s=10)
        finally:
            for upload in held:
                upload.close()
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert b"server busy" in answer
    assert str(8 * sent).encode() not in answer
    assert f"({8 * largest} bytes)".encode() in answer


def _answer_of(connection: socket.socket, timeout_s: float = 30) -> bytes:
    """What the server sends on ``connection`` until it closes it (at most 64 KiB)."""
    connection.settimeout(timeout_s)
    answer = b""
    while len(answer) < 1 << 16 and (piece := connection.recv(1 << 16)):
        answer += piece
    return answer


def _gzip_bomb(size: int) -> bytes:
    return gzip.compress(bytes(size), compresslevel=9)


def _gzip_head(length: int, *more: bytes) -> bytes:
    """The head of tenant t's gzip-encoded inference call announcing ``length`` bytes,
    with ``more`` header lines."""
    return (
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Content-Encoding: gzip\r\n"
        + b"".join(line + b"\r\n" for line in more)
        + f"Content-Length: {length}\r\n\r\n".encode()
    )


def test_compressed_bodies_are_counted_as_they_inflate(tmp_path: Path) -> None:
    """A gzip body of 60 KiB inflates to 60 MiB: counted by its Content-Length, eight
    stalled ones held about a gigabyte unrefused. Counted by what they inflate to,
    the third of a caller's is refused part way (429) and its connection closed."""
    with _server(tmp_path, ECHO_MODEL) as server:
        assert server.app is not None
        port = server.app.rest_port
        bomb = _gzip_bomb(60 << 20)
        head = _gzip_head(len(bomb) + 1)  # one byte never comes
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            for connection in held:
                connection.sendall(head + bomb)
            # The refused one answers once its body is inflated that far (seconds on a
            # loaded machine), a held one not at all: the first answer is awaited 30 s,
            # then the others 1 s more.
            first, _, _ = select.select(held, [], [], 30)
            if first:
                select.select([c for c in held if c not in first], [], [], 1)
            answers = []
            for connection in held:
                connection.setblocking(False)
                try:
                    answers.append(connection.recv(4096))
                except BlockingIOError:
                    answers.append(b"")  # still reading: held
            refused = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
            assert len(refused) == 1, answers
            assert b"still on their way" in refused[0]
            assert b"Connection: close" in refused[0]
        finally:
            for connection in held:
                connection.close()
        time.sleep(0.3)
        status, _ = _infer(port, [[1.0]], model="echo")
        assert status == 200


def test_compressed_bodies_inflating_together_are_counted_at_every_step(tmp_path: Path) -> None:
    """Whole gzip bodies of 60 KiB, each inflating to 60 MiB, sent at once by one
    tenant: each was counted once its piece had inflated whole, so every one inflated
    together uncounted (sixteen held 1.3 GB where a caller may have two bodies' worth on
    their way; all were answered 413 in the end). Counted at each step, those past the
    caller's two bodies' worth are refused 429 part way."""
    with _server(tmp_path, ECHO_MODEL) as server:
        assert server.app is not None
        port = server.app.rest_port
        bomb = _gzip_bomb(60 << 20)
        request = _gzip_head(len(bomb), b"Connection: close") + bomb
        connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            for connection in connections:
                connection.sendall(request)
            answers = [_answer_of(connection) for connection in connections]
        finally:
            for connection in connections:
                connection.close()
        statuses = sorted(answer.split(b" ", 2)[1].decode() for answer in answers)
        assert set(statuses) <= {"413", "429"} and "429" in statuses, statuses
        refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 429")]
        assert all(b"still on their way" in answer for answer in refused), refused
        status, _ = _infer(port, [[1.0]], model="echo")
        assert status == 200


def test_a_get_with_a_body_is_answered_without_reading_it(tmp_path: Path) -> None:
    """The probes and other GETs take no body: one that never finishes arriving is
    not waited for (nor held: without a key, anyone could send them)."""
    with _server(tmp_path, ECHO_MODEL) as server:
        assert server.app is not None
        connection = socket.create_connection(("127.0.0.1", server.app.rest_port))
        try:
            connection.sendall(
                b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
            )
            connection.settimeout(5)
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            connection.close()


def test_a_body_that_does_not_decode_closes_its_connection(tmp_path: Path) -> None:
    """The rest of such a body cannot be read past: the answer says Connection: close
    (the connection was closed without it, and a pooled client's next request on it
    failed)."""
    with _server(tmp_path, ECHO_MODEL) as server:
        assert server.app is not None
        connection = http.client.HTTPConnection("127.0.0.1", server.app.rest_port, timeout=10)
        headers = {"Authorization": "Bearer k", "Content-Encoding": "gzip"}
        connection.request("POST", "/v2/models/echo/infer", b"not gzip at all", headers)
        answer = connection.getresponse()
        assert answer.status == 400
        assert answer.getheader("Connection") == "close"
        answer.read()
        connection.close()
