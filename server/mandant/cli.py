"""``mandant``: serve, keygen, check-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mandant.config import MandantConfig, load_config
from mandant.errors import ConfigError
from mandant.tenancy.keys import generate_key

if TYPE_CHECKING:
    from mandant.app import App

logger = logging.getLogger("mandant")

#: The built-in demo: ``mandant serve`` without --config serves exactly this file.
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo" / "mandant.yaml"

DEMO_EXAMPLE = """\
Try it (demo keys are public and for the demo only):

  python - <<'PY'
  import numpy as np
  from mandant_client import Client
  with Client("{target}", api_key="acme-demo-key") as client:
      out = client.infer("classifier", {{"INPUT0": np.ones((1, 256), np.float32)}})
      print(out["OUTPUT0"])
  PY
"""


def _with_overrides(config: MandantConfig, args: argparse.Namespace) -> MandantConfig:
    changes = {
        key: value
        for key, value in (
            ("host", args.host),
            ("grpc_port", args.grpc_port),
            ("http_port", args.http_port),
            ("rest_port", args.rest_port),
        )
        if value is not None
    }
    if not changes:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=changes)})


def _reload(app: App, path: Path, overrides: argparse.Namespace) -> None:
    """SIGHUP: read the configuration file again; a file that does not validate is
    refused with its errors and the server keeps the configuration it runs."""
    try:
        config = _with_overrides(load_config(path), overrides)
        config.model_specs(path.resolve().parent)
    except ConfigError as exc:
        logger.error("configuration reload refused, keeping the running one: %s", exc)
        return
    result = app.reload(config)
    for note in result.deferred:
        logger.warning("configuration reload: %s", note)
    logger.info(
        "configuration reloaded from %s: %s",
        path,
        "; ".join(result.applied) or "no tenant or key changes",
    )


async def _serve(
    config: MandantConfig, path: Path, demo: bool, overrides: argparse.Namespace
) -> None:
    """``path``: the configuration file, absolute (models resolve against its folder)."""
    from mandant.app import App

    app = App(config, path.parent, config_path=path)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app, path, overrides)
    target = f"{config.server.host}:{app.grpc_port}"
    print(f"Mandant listening: gRPC (KServe v2) on {target}", flush=True)
    tls = config.server.tls
    http_scheme = "https" if tls is not None and tls.http else "http"
    rest_scheme = "https" if tls is not None else "http"
    http = f"{http_scheme}://{config.server.host}:{app.http_port}"
    print(
        f"KServe v2 REST on {rest_scheme}://{config.server.host}:{app.rest_port}/v2", flush=True
    )
    access = "" if config.server.metrics_auth == "none" else "; an admin or tenant key"
    print(f"Dashboard: {http}/  (metrics: {http}/metrics{access})", flush=True)
    internal = config.server.internal_http
    if internal is not None:
        print(
            f"Internal HTTP (no key): http://{internal.host}:{app.internal_http_port}/", flush=True
        )
    if demo:
        print(DEMO_EXAMPLE.format(target=target), flush=True)
    await stop.wait()
    logger.info("stopping: finishing in-flight calls (grace %.1fs)", config.server.grace_s)
    await app.aclose()
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
    path = Path(args.config) if args.config else DEMO_CONFIG
    try:
        config = _with_overrides(load_config(path), args)
    except ConfigError as exc:
        print(f"mandant: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    demo = path.resolve() == DEMO_CONFIG
    try:
        _run(_serve(config, path.resolve(), demo, args))
    except (ConfigError, RuntimeError, ValueError, OSError) as exc:
        print(f"mandant: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    key, key_hash = generate_key()
    print(f"key:  {key}")
    print(f"hash: {key_hash}")
    print("Give the key to the tenant; put only the hash in the configuration (api_keys).")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        config = load_config(path)
        config.model_specs(path.resolve().parent)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.tenants)} tenants, {len(config.models)} models)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mandant", description="Multi-tenant inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (the demo without --config)")
    serve.add_argument("--config", help="YAML configuration (default: the built-in demo)")
    serve.add_argument("--host")
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--rest-port", type=int, help="KServe v2 REST port (0: a free one)")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(run=cmd_serve)
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
