"""A real L7 gRPC load balancer: Debian's nginx (``make test`` installs it) with
``grpc_pass`` to HTTP/2 upstreams, on a free port, its configuration, pid file, logs
and temporary files in a directory of the test's (no root needed). The
configuration is ``deploy/nginx/mandant-grpc.conf``'s ``upstream``/``server`` part,
the example the README shows."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.servers import ROOT

#: The example configuration (``deploy/``): the test fills in ports and paths.
EXAMPLE = ROOT / "deploy" / "nginx" / "mandant-grpc.conf"

#: What runs nginx as an ordinary user in a directory of its own, around the example.
_WRAPPER = """
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log notice;
events {{ worker_connections 4096; }}
http {{
  client_body_temp_path {directory}/body;
  proxy_temp_path {directory}/proxy;
  fastcgi_temp_path {directory}/fastcgi;
  uwsgi_temp_path {directory}/uwsgi;
  scgi_temp_path {directory}/scgi;
  log_format upstreams '$msec $status $upstream_addr';
  access_log {directory}/access.log upstreams;
{example}
}}
"""


def nginx_config(directory: Path, listen_port: int, upstreams: list[str]) -> str:
    """The example with this test's listening port and upstream servers."""
    example = EXAMPLE.read_text()
    servers = "".join(f"    server {target} max_fails=1 fail_timeout=5s;\n" for target in upstreams)
    example = example.replace("    server mandant-0:8001 max_fails=1 fail_timeout=5s;\n", servers)
    example = example.replace("listen 8001 http2;", f"listen 127.0.0.1:{listen_port} http2;")
    return _WRAPPER.format(directory=directory, example=example)


class NginxBalancer:
    def __init__(self, directory: Path, upstreams: list[str]) -> None:
        executable = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if executable is None:
            pytest.skip(
                "nginx is not installed: run `make test` (it installs Debian's nginx) "
                "or `apt-get install -y nginx`"
            )
        self._executable = executable
        self._directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.config = directory / "nginx.conf"
        self.config.write_text(nginx_config(directory, self.port, upstreams))
        self._process: subprocess.Popen[bytes] | None = None
        self._reloads = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NginxBalancer:
        command = [self._executable, "-e", str(self._directory / "error.log")]
        command += ["-p", str(self._directory), "-c", str(self.config)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.errors()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not listen on port {self.port} in {timeout_s}s")

    def reload(self, upstreams: list[str], timeout_s: float = 10.0) -> None:
        """Serve ``upstreams`` from now on: a new configuration and SIGHUP, as an
        operator (or an ingress controller) reloads nginx. New calls go to the new
        set at once; calls in progress finish where they are."""
        assert self._process is not None
        self.config.write_text(nginx_config(self._directory, self.port, upstreams))
        self._process.send_signal(signal.SIGHUP)
        self._reloads += 1
        deadline = time.monotonic() + timeout_s
        while self.errors().count("reconfiguring") < self._reloads or not self.errors().split(
            "reconfiguring"
        )[-1].count("start worker process"):
            assert time.monotonic() < deadline, f"nginx did not reload: {self.errors()}"
            time.sleep(0.01)

    def answers(self) -> list[tuple[float, str, int]]:
        """Every call the balancer answered: when (epoch seconds), the replica(s) it
        tried (``a, b`` where it went on to the next) and the HTTP status."""
        answers = []
        for line in (self._directory / "access.log").read_text().splitlines():
            when, status, upstreams = line.split(" ", 2)
            answers.append((float(when), upstreams, int(status)))
        return answers

    def errors(self) -> str:
        log = self._directory / "error.log"
        return log.read_text() if log.exists() else ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
