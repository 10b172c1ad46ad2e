"""What the aiohttp ports (REST, and the dashboard's and metrics' HTTP port) share."""

from __future__ import annotations

from aiohttp import web

#: How long a connection's handler may take to end once a server's own drain is over;
#: then it is cancelled. aiohttp reads a shutdown timeout of 0 as none at all, so a
#: client stalled halfway through its body held a shutdown for as long as it liked, and
#: its default (60 s, and 10 s of reading what is left of a refused body) outlasts
#: a pod's termination grace.
CLOSE_WAIT_S = 0.05


def runner(app: web.Application) -> web.AppRunner:
    """A runner for ``app`` that closes every connection at once when cleaned up, and
    cancels a handler whose client has gone (as gRPC cancels a call): a REST call
    whose client left is counted CANCELLED and leaves its queue, not run and counted
    OK for nobody (aiohttp no longer does this by default)."""
    return web.AppRunner(
        app, access_log=None, shutdown_timeout=CLOSE_WAIT_S, handler_cancellation=True
    )
