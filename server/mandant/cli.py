"""``mandant``: serve, keygen, check-config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

from mandant.config import MandantConfig, config_folder, load_config, reloaded
from mandant.errors import ConfigError
from mandant.tenancy.keys import generate_key
from mandant.transport.listeners import bare, host_port

if TYPE_CHECKING:
    from mandant.app import App
    from mandant.config.specs import ModelSpec

logger = logging.getLogger("mandant")

#: The built-in demo: ``mandant serve --demo`` serves exactly this file (public keys).
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo" / "mandant.yaml"

#: Flush left, to paste into a shell as it is: indented, bash never found the end of
#: the here-document, and Python refused the indented first line.
DEMO_EXAMPLE = """\
Try it (demo keys are public and for the demo only):

{python} - <<'PY'
import numpy as np
from mandant_client import Client
with Client("{target}", api_key="acme-demo-key") as client:
    out = client.infer("classifier", {{"INPUT0": np.ones((1, 256), np.float32)}})
    print(out["OUTPUT0"])
PY
"""


NO_DEMO = """\
mandant serve: --demo needs a source checkout of Mandant: it serves {path},
which an installed package (a wheel, the container image) does not include.
Serve your own file: mandant serve --config mandant.yaml"""

DEMO_EXPOSED = """\
mandant serve: the demo's keys are public: it listens on loopback addresses only,
not on {host}. To listen there, serve a file with keys of your own:
  mandant serve --config mandant.yaml"""

NO_CONFIG = """\
mandant serve: no configuration given.
  mandant serve --config mandant.yaml   serve your configuration
  mandant serve --demo                  the built-in demo (public demo keys, local use only)
  mandant check-config mandant.yaml     validate a file first"""


#: The ``serve`` flags that override a ``server`` setting: field → flag.
SERVER_FLAGS = {
    "host": "--host",
    "http_host": "--http-host",
    "grpc_port": "--grpc-port",
    "http_port": "--http-port",
    "rest_port": "--rest-port",
    "workers": "--workers",
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _with_overrides(config: MandantConfig, args: argparse.Namespace) -> MandantConfig:
    """``config`` with the server flags given, each validated as its setting in the
    file is; ConfigError naming the flag (and its value) if one is refused."""
    changes = {
        field: value for field in SERVER_FLAGS if (value := getattr(args, field, None)) is not None
    }
    if not changes:
        return config
    try:
        return config.with_server(changes)
    except ConfigError as exc:
        refused: dict[str, list[str]] = {}
        for path, why in exc.errors:
            field = path.split(".")[1] if path.count(".") else ""
            where = (
                f"{SERVER_FLAGS[field]} {changes[field]}"
                if field in changes
                else f"{path} (with {', '.join(SERVER_FLAGS[f] for f in changes)})"
            )
            refused.setdefault(where, []).append(why)
        errors = [(where, ", or ".join(whys)) for where, whys in refused.items()]
        raise ConfigError("the command line", errors) from None


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is reachable from this machine
    only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare(host)).is_loopback
    except ValueError:
        return False


def _log_warnings(config: MandantConfig) -> None:
    for where, why in config.warnings():
        logger.warning("configuration: %s: %s", where, why)


def _reload(app: App, path: Path, overrides: argparse.Namespace) -> None:
    """SIGHUP: read the configuration file again; a file that does not validate is
    refused with its errors and the server keeps the configuration it runs."""
    config = reloaded(lambda: _with_overrides(load_config(path), overrides), config_folder(path))
    if config is None:
        return
    _log_warnings(config)
    result = app.reload(config)
    for note in result.deferred:
        logger.warning("configuration reload: %s", note)
    logger.info(
        "configuration reloaded from %s: %s",
        path,
        "; ".join(result.applied) or "no tenant or key changes",
    )


def banner(
    config: MandantConfig,
    grpc_port: int,
    rest_port: int,
    http_port: int,
    internal_http_port: int,
    demo: bool,
    processes: str = "",
) -> None:
    """What a user reads once the server serves: where each port is."""
    host = config.server.host
    target = host_port(host, grpc_port)
    http_host = config.server.http_bind_host
    print(f"Mandant listening: gRPC (KServe v2) on {target}{processes}", flush=True)
    tls = config.server.tls
    http_scheme = "https" if tls is not None and tls.http else "http"
    rest_scheme = "https" if tls is not None else "http"
    http = f"{http_scheme}://{host_port(http_host, http_port)}"
    print(f"KServe v2 REST on {rest_scheme}://{host_port(host, rest_port)}/v2", flush=True)
    if config.server.metrics_auth == "none":
        print(f"Dashboard: {http}/  (metrics: {http}/metrics; open)", flush=True)
    elif not config.server.admin_keys:  # /metrics then refuses everyone
        print(
            f"Dashboard: {http}/  (a tenant's key, for its own figures; no admin keys "
            f"configured: {http}/metrics answers 403, /usage a tenant's own only; see "
            "server.admin_keys)",
            flush=True,
        )
    else:
        print(
            f"Dashboard: {http}/  (an admin key, or a tenant's key for its own figures; "
            f"metrics: {http}/metrics, an admin key)",
            flush=True,
        )
    internal = config.server.internal_http
    if internal is not None:
        internal_url = f"http://{host_port(internal.host, internal_http_port)}/"
        print(f"Internal HTTP (no key): {internal_url}", flush=True)
    if demo:
        # This interpreter: the one that has mandant_client (a venv's, not the PATH's).
        print(DEMO_EXAMPLE.format(target=target, python=shlex.quote(sys.executable)), flush=True)


class StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT came before the server served (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """SIGTERM and SIGINT from before the server starts: a stop asked while it starts
    (its models loading, which may take minutes) cancels the start at once, instead of
    killing the process by the default action (one process) or serving first and then
    stopping (``workers``)."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal
        self._asked = asyncio.Event()
        self._starting: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._ask, signum)

    def _ask(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self._asked.set()
        if self._starting is not None:  # each signal: a start that outlives one gets another
            self._starting.cancel()

    async def wait(self) -> None:
        await self._asked.wait()

    async def start(self, starting: Awaitable[None]) -> None:
        """Await ``starting``; a stop signal cancels it (which stops whatever it
        started), and then :class:`StoppedWhileStarting` is raised."""
        start = self._starting = asyncio.ensure_future(starting)
        if self._asked.is_set():
            start.cancel()
        try:
            await asyncio.wait((start,))
        finally:
            self._starting = None
            if not start.done():  # this task itself was cancelled
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
        if start.cancelled() and self.signum is not None:
            raise StoppedWhileStarting(self.signum)
        start.result()


async def _serve(
    config: MandantConfig, path: Path, demo: bool, overrides: argparse.Namespace
) -> None:
    """``path``: the configuration file, absolute, read as given (its models resolve
    against ``config_folder(path)``, its symlinks resolved at each read)."""
    from mandant.app import App
    from mandant.heap import SettleSoon, settle

    loop = asyncio.get_running_loop()
    stop = _StopSignals()
    # A SIGHUP while the models load would end the process (the default action): it is
    # kept, and the file read again once the server serves.
    reload_asked = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
    app = App(config, config_folder(path), config_path=path, on_models_retired=SettleSoon())
    await stop.start(app.start())
    settle()  # the models are loaded: the start-up heap out of the collector's way
    loop.add_signal_handler(signal.SIGHUP, _reload, app, path, overrides)
    if reload_asked.is_set():
        _reload(app, path, overrides)
    banner(config, app.grpc_port, app.rest_port, app.http_port, app.internal_http_port, demo)
    await stop.wait()
    logger.info("stopping: finishing in-flight calls (grace %.1fs)", config.server.grace_s)
    await app.aclose()
    logger.info("stopped")


def workers_of(setting: int | str) -> int:
    """``server.workers`` as a number: ``auto`` is one front end per core this process
    may run on (its CPU affinity) but one, kept for the engine."""
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)) - 1)
    return int(setting)


def child_command() -> list[str]:
    """How the supervisor starts its children: ``python -m mandant``, with the folder
    this process started in on the import path only where it is on this process's
    (``python -m mandant`` puts it there, the ``mandant`` script does not), so that a
    model's ``factory`` imports alike in one process and with ``workers: N``."""
    cwd_importable = bool(sys.path) and sys.path[0] in ("", os.getcwd())
    return [sys.executable, *(() if cwd_importable else ("-P",)), "-m", "mandant"]


async def _supervise(
    config: MandantConfig, path: Path, demo: bool, args: argparse.Namespace, workers: int
) -> None:
    from mandant.workers.supervisor import Supervisor

    child_args = ["--config", str(path), "--log-level", args.log_level]
    overrides = (("--host", args.host), ("--http-host", args.http_host),
                 ("--http-port", args.http_port))  # fmt: skip
    for flag, value in overrides:
        if value is not None:
            child_args += [flag, str(value)]
    if args.rest_port is not None:
        child_args += ["--rest-port", str(args.rest_port)]
    supervisor = Supervisor(
        workers,
        config.server.grpc_port,
        config.server.host,
        config.server.grace_s,
        child_command(),
        child_args,
        path,
        load=lambda file: _with_overrides(load_config(file), args),
    )

    stop = _StopSignals()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, supervisor.reload)
    await stop.start(supervisor.start())
    facts = supervisor.engine.facts
    banner(
        config,
        supervisor.grpc_port,
        facts["rest_port"],
        facts["http_port"],
        facts["internal_http_port"],
        demo,
        f" ({workers} front-end processes and one engine)",
    )
    await stop.wait()
    logger.info("stopping: front ends first, then the engine (grace %.1fs)", supervisor.grace_s)
    await supervisor.stop()
    logger.info("stopped")


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, Windows lacks it
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from mandant.observability.logs import configure_logging

    configure_logging(args.log_level)
    if args.config is None and not args.demo:
        print(NO_CONFIG, file=sys.stderr)
        return 2
    if args.demo and not DEMO_CONFIG.is_file():
        print(NO_DEMO.format(path=DEMO_CONFIG), file=sys.stderr)
        return 2
    path = Path(args.config) if args.config else DEMO_CONFIG
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"mandant: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    try:
        config = _with_overrides(config, args)
    except ConfigError as exc:
        for where, why in exc.errors:
            print(f"mandant serve: {where}: {why}", file=sys.stderr)
        return 2
    try:  # what only the models' resolution finds (a torch model without tensors)
        config.model_specs(config_folder(path))
    except ConfigError as exc:
        print(
            f"mandant: invalid configuration\n{ConfigError(str(path), exc.errors)}", file=sys.stderr
        )
        return 2
    _log_warnings(config)
    missing = config.server.tls.file_problems(config_folder(path)) if config.server.tls else []
    if missing:
        print(f"mandant: cannot start: {ConfigError(str(path), missing)}", file=sys.stderr)
        return 1
    demo = path.resolve() == DEMO_CONFIG
    exposed = [h for h in (config.server.host, config.server.http_bind_host) if not _loopback(h)]
    if demo and exposed:
        print(DEMO_EXPOSED.format(host=exposed[0]), file=sys.stderr)
        return 2
    workers = workers_of(config.server.workers)
    try:
        if workers > 1:
            _run(_supervise(config, path.absolute(), demo, args, workers))
        else:
            _run(_serve(config, path.absolute(), demo, args))
    except (ConfigError, RuntimeError, ValueError, OSError) as exc:
        print(f"mandant: cannot start: {exc}", file=sys.stderr)
        return 1
    except StoppedWhileStarting as exc:
        if exc.signum == signal.SIGINT:  # Ctrl-C: the shell's code for it
            print("mandant: interrupted while starting", file=sys.stderr)
            return 130
        print("mandant: stopped while starting (SIGTERM)", file=sys.stderr)
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the stop handlers
        print("mandant: interrupted while starting", file=sys.stderr)
        return 130
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One child of ``serve --workers N`` (started by its supervisor, not by hand)."""
    from mandant.observability.logs import configure_logging
    from mandant.workers.process import die_with_parent, serve_engine, serve_front_end
    from mandant.workers.sockets import EngineSockets

    die_with_parent(args.parent)
    configure_logging(args.log_level)
    path = Path(args.config).absolute()  # read as given: config_folder resolves it
    applied = Path(args.applied) if args.applied else path  # what the supervisor applied
    sockets = EngineSockets(Path(args.sockets))

    def load(source: Path = applied) -> MandantConfig:
        config = _with_overrides(load_config(source), args)
        internal = config.server.internal_http
        if args.internal_http_port is not None and internal is not None:  # a restart
            port = {"internal_http": {**internal.model_dump(), "port": args.internal_http_port}}
            config = config.with_server(port)
        return config

    def at_start() -> MandantConfig:
        """The configuration applied, less what its siblings take only at a restart
        (after a reload, they still run the server and limits settings they started
        with: a child started again does too)."""
        if not args.started:
            return load()
        from mandant.app import as_reloaded

        return as_reloaded(load(Path(args.started)), load())[0]

    serve = serve_engine if args.role == "engine" else serve_front_end
    try:
        _run(serve(at_start(), path, sockets, load))
    except (ConfigError, RuntimeError, ValueError, OSError) as exc:
        # Logging is configured here: a JSON line, as the supervisor's own.
        logging.getLogger("mandant.workers").error("%s cannot start: %s", args.role, exc)
        return 1
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    key, key_hash = generate_key()
    print(f"key:  {key}")
    print(f"hash: {key_hash}")
    print("Give the key to the tenant; put only the hash in the configuration (api_keys).")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file, then what validation does not look at: that the files it
    names are there and its factories import (their modules are imported; no model is
    built)."""
    path = Path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    base_dir = config_folder(path)
    try:
        specs = config.model_specs(base_dir)
        errors = []
    except ConfigError as exc:
        specs, errors = [], exc.errors
    errors = [*errors, *config.file_problems(base_dir), *_import_problems(config)]
    if errors:
        print(ConfigError(str(path), sorted(errors, key=_field_order)), file=sys.stderr)
        return 1
    for where, why in [*config.warnings(), *_device_problems(specs)]:
        print(f"{path}: warning: {where}: {why}", file=sys.stderr)
    print(f"{path}: ok ({len(config.tenants)} tenants, {len(config.models)} models)")
    return 0


def _field_order(error: tuple[str, str]) -> list[tuple[int, str]]:
    """Sorts errors as the file's sections come (server, limits, tenants, models), then
    by field path, numbers as numbers (``models.10`` after ``models.9``)."""
    sections = list(MandantConfig.model_fields)
    parts = error[0].split(".")
    rank = sections.index(parts[0]) if parts[0] in sections else len(sections)
    return [(rank, ""), *((int(p), "") if p.isdigit() else (-1, p) for p in parts[1:])]


def _device_problems(specs: list[ModelSpec]) -> list[tuple[str, str]]:
    """Each model version placed on a GPU this host does not see, as (where, why): a
    warning, not an error, since a file is often checked on another host than the one
    it is for; ``serve`` here would refuse to load it."""
    from mandant.backends.placement import place  # torch only when a GPU is named

    named = [s for s in specs if s.backend == "torch" and s.devices not in (("cpu",), ("auto",))]
    if not named:
        return []
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problems = []
    for spec in named:
        missing = place(spec.devices, spec.instances, visible).missing(visible)
        if missing:
            owner = f" of tenant {spec.tenant!r}" if spec.tenant else ""
            problems.append((
                f"model {spec.name!r}{owner} version {spec.version}",
                f"placed on {', '.join(missing)}, but this host sees {visible} GPU(s): "
                "`mandant serve` here would refuse to load it",
            ))  # fmt: skip
    return problems


def _import_problems(config: MandantConfig) -> list[tuple[str, str]]:
    """Each ``factory`` / ``weights_init`` whose module does not import or has no such
    callable, as (field path, reason)."""
    from mandant.backends.base import import_ref  # what a model's start does with it

    problems = []
    for where, ref in config.callable_refs():
        try:
            import_ref(ref)
        except Exception as exc:  # the module's own code runs: anything may escape it
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            problems.append((where, f"cannot use {ref!r}: {reason}"))
    return problems


def _workers(value: str) -> int | str:
    """``--workers``: a number or ``auto`` (its range is checked as the setting's)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mandant", description="Multi-tenant inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (--config FILE, or --demo)")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML configuration")
    source.add_argument(
        "--demo",
        action="store_true",
        help="the built-in demo (public keys: loopback addresses only)",
    )
    serve.add_argument("--host", help="bind address of the gRPC and REST ports")
    serve.add_argument("--http-host", help="bind address of the HTTP port (default: --host)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (0: a free one)")
    serve.add_argument("--http-port", type=int, help="HTTP port: dashboard, metrics, probes")
    serve.add_argument("--rest-port", type=int, help="KServe v2 REST port (0: a free one)")
    serve.add_argument(
        "--workers",
        type=_workers,
        help="gRPC front-end processes (default: server.workers, 1); 'auto': cores - 1",
    )
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    serve.set_defaults(run=cmd_serve)
    worker = commands.add_parser(
        "worker", help="one process of 'serve --workers N' (started by its supervisor)"
    )
    worker.add_argument("role", choices=("engine", "front-end"))
    worker.add_argument("--config", required=True)
    worker.add_argument("--sockets", required=True, help="the supervisor's sockets folder")
    worker.add_argument(
        "--applied", help="the configuration as last applied, read at start and SIGHUP"
    )
    worker.add_argument(
        "--started", help="the configuration as the server started (its restart-only settings)"
    )
    worker.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    worker.add_argument("--host")
    worker.add_argument("--http-host")
    worker.add_argument("--grpc-port", type=int)
    worker.add_argument("--http-port", type=int)
    worker.add_argument("--rest-port", type=int)
    worker.add_argument("--internal-http-port", type=int)
    worker.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    worker.set_defaults(run=cmd_worker)
    keygen = commands.add_parser("keygen", help="print a new API key and its hash")
    keygen.set_defaults(run=cmd_keygen)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config")
    check.set_defaults(run=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
