"""What the aiohttp ports (REST, and the dashboard's and metrics' HTTP port) share."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

#: How long a connection's handler may take to end once a server's own drain is over;
#: then it is cancelled. aiohttp reads a shutdown timeout of 0 as none at all, so a
#: client stalled halfway through its body held a shutdown for as long as it liked, and
#: its default (60 s, and 10 s of reading what is left of a refused body) outlasts
#: a pod's termination grace.
CLOSE_WAIT_S = 0.05


class _ClientMistakes(logging.Filter):
    """aiohttp logs every request it cannot parse (a header line over 8190 bytes, too
    many headers, a bad request line; a body not in its ``Content-Encoding``, met when
    it reads what a handler left of a body, wrapped in its ``RequestPayloadError``) as
    an ERROR with a traceback, after answering it 400: any client could fill the
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


def runner(app: web.Application) -> web.AppRunner:
    """A runner for ``app`` that closes every connection at once when cleaned up, and
    cancels a handler whose client has gone (as gRPC cancels a call): a REST call
    whose client left is counted CANCELLED and leaves its queue, not run and counted
    OK for nobody (aiohttp no longer does this by default)."""
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_MISTAKES)  # once: a set
    return web.AppRunner(
        app, access_log=None, shutdown_timeout=CLOSE_WAIT_S, handler_cancellation=True
    )
