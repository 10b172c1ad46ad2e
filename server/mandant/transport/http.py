"""What the aiohttp ports (REST, and the dashboard's and metrics' HTTP port) share."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from mandant.transport.listeners import Listener, bare, reason_of

#: How long a connection's handler may take to end once a server's own drain is over;
#: then it is cancelled. aiohttp reads a shutdown timeout of 0 as none at all, so a
#: client stalled halfway through its body held a shutdown for as long as it liked, and
#: its default (60 s, and 10 s of reading what is left of a refused body) outlasts
#: a pod's termination grace.
CLOSE_WAIT_S = 0.05


class _ClientMistakes(logging.Filter):
    """aiohttp logs every request it cannot parse (a header line over 8190 bytes, too
    many headers, a bad request line; a malformed chunked body, met when it reads what
    a handler left of a body, wrapped in its ``RequestPayloadError``) as an ERROR with
    a traceback, after answering it 400: any client could fill the
    server's error log. Such a record goes out at DEBUG, without the traceback; the
    server's own errors stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not isinstance(exc, BadHttpMessage):
            exc = exc.__cause__
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg = f"{record.msg}: {type(exc).__name__} (answered {exc.code})"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_CLIENT_MISTAKES = _ClientMistakes()


#: How long a connection may go without a request whole (aiohttp's default: an hour,
#: and its timer also runs while a request's headers are coming, so a client sending
#: 127 headers of 8 KB and never their end held 2 MB a connection for that long).
KEEPALIVE_S = 75.0
#: How long the rest of a refused body is read (and dropped) before the connection
#: closes, so that the client reads the refusal (aiohttp's default: 10 s).
LINGER_S = 1.0


def runner(app: web.Application) -> web.AppRunner:
    """A runner for ``app`` that closes every connection at once when cleaned up, and
    cancels a handler whose client has gone (as gRPC cancels a call): a REST call
    whose client left is counted CANCELLED and leaves its queue, not run and counted
    OK for nobody (aiohttp no longer does this by default). Bodies are not inflated by
    aiohttp: the REST gate does it, a step at a time (``rest/gate.py``); aiohttp
    inflated whatever came in one go, also what it read of a body after answering,
    before any key was checked."""
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_MISTAKES)  # once: a set
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=CLOSE_WAIT_S,
        handler_cancellation=True,
        auto_decompress=False,
        keepalive_timeout=KEEPALIVE_S,
        lingering_time=LINGER_S,
    )


async def serve(
    runner: web.AppRunner, listener: Listener, ssl_context: ssl.SSLContext | None = None
) -> int:
    """Set ``runner`` up and serve it on ``listener``'s host and port; returns the bound
    port (0 binds a free one). A failure to bind (a host that does not resolve, an
    address not on this machine, a port in use) is ``listener``'s
    :meth:`~Listener.bind_error`."""
    await runner.setup()
    site = web.TCPSite(runner, bare(listener.host), listener.port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise listener.bind_error(reason_of(exc)) from exc
    except BaseException:
        await runner.cleanup()
        raise
    return int(runner.addresses[0][1])
