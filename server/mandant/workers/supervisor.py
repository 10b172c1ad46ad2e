"""``mandant serve`` with ``workers: N > 1``: the supervisor that starts, watches and
stops one engine and N front ends (DESIGN.md, "One host, every core").

- Start: the engine first (it loads the models and binds the REST and HTTP ports),
  then the front ends, each binding the gRPC port with SO_REUSEPORT (port 0: the
  supervisor reserves a free port for them first).
- Watch: a child that exits is started again (backoff 0.2 s doubling to 5 s; reset
  once it has run 10 s). A front end's own calls fail with it (its clients'
  connections close: UNAVAILABLE) and nothing else; while the engine is away the
  front ends answer UNAVAILABLE, and serve again once it is back.
- SIGTERM / SIGINT (taken by ``mandant serve``, ``cli.py``): the front ends drain
  first (their calls finish on the running engine), then the engine; no accepted call
  is lost. One that comes while they start (the engine loading its models) cancels
  :meth:`Supervisor.start`, which stops those started. SIGHUP: the supervisor reads
  and checks the configuration file, keeps it as the one applied, and every child
  reloads it (one still starting, once it serves: a SIGHUP before it handles signals
  would kill it); a file that does not validate is refused and nothing changes.
- The configuration applied (at the start, at each SIGHUP) is a copy in the private
  folder, which is what children read: a child started again after it died serves
  what its siblings serve, whatever the file says now (an edit not yet signalled, a
  key revoked in the file and no SIGHUP yet, is applied to all at the next SIGHUP,
  never to one restarted process alone). Models loaded or unloaded through the
  model-control API since are not part of it: an engine started again serves the
  models of the configuration applied.

Children run in a session of their own (a terminal's Ctrl-C reaches only the
supervisor, which stops them in order) and die with the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mandant.transport.listeners import Listener, bare
from mandant.workers.process import ANNOUNCE
from mandant.workers.sockets import EngineSockets

if TYPE_CHECKING:
    from mandant.config import MandantConfig

logger = logging.getLogger(__name__)

_BACKOFF_S = (0.2, 5.0)
_HEALTHY_AFTER_S = 10.0
#: What an engine started again does not keep (module doc).
_ENGINE_RESTART_NOTE = (
    ", with the models of the configuration applied (loads and unloads made through"
    " the model-control API since are not kept)"
)
#: Beyond the configured grace, how long a stopping child may take before it is killed.
_STOP_SLACK_S = 10.0


class ChildFailed(RuntimeError):
    """A child exited before it said it serves."""


@dataclass
class Child:
    role: str  # "engine" or "front-end"
    index: int = 0
    process: asyncio.subprocess.Process | None = None
    facts: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    failures: int = 0
    relay: asyncio.Task[None] | None = None
    serving: bool = False  # it said so, and it reloads on SIGHUP
    reload_pending: bool = False  # a reload was asked while it started

    @property
    def name(self) -> str:
        return "engine" if self.role == "engine" else f"front end {self.index}"


def reserve_port(host: str, port: int = 0) -> socket.socket:
    """A socket bound to ``port`` (0: a free one) with SO_REUSEPORT, never listening:
    it keeps the port for the front ends, which bind it the same way, and from anyone
    else. A port something else holds already is refused (OSError, EADDRINUSE): with
    SO_REUSEPORT alone a second server of the same user would share it, the kernel
    spreading connections over both servers' front ends."""
    if port:  # a socket bound or listening there fails the check (it has no SO_REUSEPORT)
        Listener("gRPC port", "server.host", host, port).check()
    host = bare(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR for the bind, as gRPC's listeners have it: a connection of a server
    # stopped a moment ago, in TIME_WAIT, refused it (the check above passed it). Off
    # again after: two sockets with it that do not listen may share a port, and a
    # second server's check then passed while this one's front ends were starting.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return sock


class Supervisor:
    """``command``: how to start a child (``mandant worker``'s arguments are added:
    role, sockets folder, parent pid, then ``child_args``, and for the engine its
    ports once known)."""

    def __init__(
        self,
        workers: int,
        grpc_port: int,
        host: str,
        grace_s: float,
        command: list[str],
        child_args: list[str],
        config_path: Path,
        load: Callable[[Path], MandantConfig] | None = None,
    ) -> None:
        """``config_path``: the configuration file (absolute), read again at SIGHUP.
        ``load``: a file as the children read it, with the command line's server
        flags (None: as it is)."""
        self.workers = workers
        self.grpc_port = grpc_port
        self._host = host
        self.grace_s = grace_s
        self._command = command
        self._child_args = child_args
        self._folder = Path(tempfile.mkdtemp(prefix="mandant-"))
        self.sockets = EngineSockets(self._folder)
        self._config_path = config_path
        self._load = load
        #: The configuration applied, which children read (module doc).
        self.applied = self._folder / "applied.yaml"
        #: The configuration as the server started: what a child started again keeps
        #: of it (the settings a reload leaves to a restart, ``app.as_reloaded``).
        self.started = self._folder / "started.yaml"
        self._reserved: socket.socket | None = None
        self.engine = Child("engine")
        self.front_ends = [Child("front-end", i + 1) for i in range(workers)]
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def children(self) -> list[Child]:
        return [self.engine, *self.front_ends]

    # -- start ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, then every front end; one that fails to start (or the
        file, or the port) stops the others, removes the private folder (its copies of
        the configuration were left in /tmp) and raises :class:`ChildFailed`."""
        try:
            os.chmod(self._folder, 0o700)
            if not self._apply_file():
                raise ChildFailed(f"the configuration file {self._config_path} does not validate")
            shutil.copyfile(self.applied, self.started)
            try:
                self._reserved = reserve_port(self._host, self.grpc_port)
            except OSError as exc:
                reason = exc.strerror or exc  # the check's error says which setting, and why
                raise ChildFailed(f"cannot use gRPC port {self.grpc_port}: {reason}") from None
            self.grpc_port = self._reserved.getsockname()[1]
            await self._start(self.engine)
            await asyncio.gather(*(self._start(front) for front in self.front_ends))
        except BaseException:
            await self.stop()
            raise
        self._watchers = [
            asyncio.create_task(self._watch(child), name=f"watch {child.name}")
            for child in self.children
        ]

    def _arguments(self, child: Child) -> list[str]:
        args = [
            "worker",
            child.role,
            "--sockets",
            str(self._folder),
            "--parent",
            str(os.getpid()),
            *self._child_args,
            "--applied",
            str(self.applied),
            "--started",
            str(self.started),
            "--grpc-port",
            str(self.grpc_port),
        ]
        if child.role == "engine" and child.facts:  # a restart: the ports it had
            args += ["--http-port", str(child.facts["http_port"])]
            args += ["--rest-port", str(child.facts["rest_port"])]
            if child.facts.get("internal_http_port"):
                args += ["--internal-http-port", str(child.facts["internal_http_port"])]
        return args

    async def _start(self, child: Child) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._command,
            *self._arguments(child),
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        child.process = process
        child.serving = False
        child.started_at = time.monotonic()
        assert process.stdout is not None
        while True:
            line = (await process.stdout.readline()).decode(errors="replace")
            if not line:
                await process.wait()
                raise ChildFailed(f"{child.name} exited with {process.returncode} while starting")
            if line.startswith(ANNOUNCE):
                _, _, facts = line.split(" ", 2)
                child.facts = {**child.facts, **json.loads(facts)}
                break
            sys.stdout.write(line)
        child.relay = asyncio.create_task(_relay(process.stdout), name=f"relay {child.name}")
        child.serving = True
        if child.reload_pending:  # it may have read the file before it changed
            child.reload_pending = False
            _signal(child, signal.SIGHUP)
        logger.info("%s serving (pid %d)", child.name, process.pid)

    # -- watch ----------------------------------------------------------------------

    async def _watch(self, child: Child) -> None:
        while not self._stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            lived_s = time.monotonic() - child.started_at
            child.failures = 0 if lived_s > _HEALTHY_AFTER_S else child.failures + 1
            delay_s = min(_BACKOFF_S[1], _BACKOFF_S[0] * 2 ** max(0, child.failures - 1))
            logger.error(
                "%s exited (code %s); starting it again in %.1fs%s",
                child.name,
                code,
                delay_s,
                _ENGINE_RESTART_NOTE if child.role == "engine" else "",
            )
            await asyncio.sleep(delay_s)
            if self._stopping:
                return
            with contextlib.suppress(ChildFailed):
                await self._start(child)

    # -- signals --------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply the configuration file again, every child with it."""
        if not self._apply_file():
            return
        for child in self.children:
            if child.serving:
                _signal(child, signal.SIGHUP)
            else:
                child.reload_pending = True

    def _apply_file(self) -> bool:
        """Copy the configuration file to :attr:`applied` if it validates as every child
        will read it: with the command line's flags and the gRPC port they are given
        (the copy is what is checked, so what children read is what passed). Checked
        without them, a file the children refused (its REST port the flags' HTTP port)
        became the applied copy, which a child restarted later served, or could not
        start with."""
        from mandant.config import config_folder, load_config, reloaded
        from mandant.errors import ConfigError

        load = self._load or load_config

        checked = self.applied.with_suffix(".checking")
        try:
            shutil.copyfile(self._config_path, checked)
        except OSError as exc:
            logger.error("configuration reload refused, keeping the running one: %s", exc)
            return False

        def check() -> MandantConfig:
            try:
                return load(checked).with_server({"grpc_port": self.grpc_port})
            except ConfigError as exc:  # name the operator's file, not the copy checked
                raise ConfigError(str(self._config_path), exc.errors) from None

        if reloaded(check, config_folder(self._config_path)) is None:
            checked.unlink(missing_ok=True)
            return False
        os.replace(checked, self.applied)
        return True

    async def stop(self) -> None:
        """Drain the front ends, then the engine; remove the sockets' folder, also
        where the stop itself is cancelled (a second Ctrl-C: the children die with
        this process)."""
        self._stopping = True
        try:
            for watcher in self._watchers:
                watcher.cancel()
            await asyncio.gather(*self._watchers, return_exceptions=True)
            await asyncio.gather(*(self._stop(front) for front in self.front_ends))
            await self._stop(self.engine)
        finally:
            if self._reserved is not None:
                self._reserved.close()
            shutil.rmtree(self._folder, ignore_errors=True)

    async def _stop(self, child: Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        _signal(child, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.grace_s + _STOP_SLACK_S)
        except TimeoutError:
            logger.error("%s did not stop in time; killing it", child.name)
            process.kill()
            await process.wait()
        if child.relay is not None:
            await asyncio.gather(child.relay, return_exceptions=True)


def _signal(child: Child, signum: int) -> None:
    process = child.process
    if process is not None and process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


async def _relay(stream: asyncio.StreamReader) -> None:
    """A child's later stdout, on ours."""
    while line := await stream.readline():
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()
