"""A headless Chromium driven over the DevTools protocol (aiohttp's websocket client):
load a page, evaluate JavaScript, click with the mouse and type with the keyboard as
a user would. Only what the dashboard tests need."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1400,1000", "--remote-debugging-port=0",
)  # fmt: skip
LISTENING = re.compile(r"DevTools listening on (ws://[^\s]+)")


class Page:
    """One browser tab; every call waits for the browser's answer."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        message_id = self._ids
        await self._socket.send_json({"id": message_id, "method": method, "params": params})
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(await self._socket.receive_str())
            if message.get("id") == message_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited), JSON-copied."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Poll until the expression is truthy; its value. An expression that throws
        (e.g. ``document.body`` while a navigation has not made it yet) counts as not
        yet true."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        last_error = ""
        while True:
            try:
                value = await self.eval(expression)
            except AssertionError as exc:
                value, last_error = None, str(exc)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"never true within {timeout_s}s: {expression} {last_error}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """A left click with the mouse at the middle of the element (scrolled to)."""
        box = await self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def type(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as keyboard input."""
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)


@asynccontextmanager
async def browser_page(profile: Path) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its own profile folder) and its first tab."""
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    drain: asyncio.Task[bytes] | None = None
    try:
        assert process.stderr is not None
        seen = []
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
            if not line:
                raise AssertionError("chromium exited: " + "".join(seen)[-2000:])
            seen.append(line)
            match = LISTENING.search(line)
            if match:
                break
        origin = "http://" + match.group(1).split("/")[2]
        drain = asyncio.create_task(process.stderr.read())  # a full pipe would stall it
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{origin}/json/list") as response:
                targets = await response.json()
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        if drain is not None:
            await drain
