"""A real browser on a page: headless Chromium (Debian's `chromium`) over its DevTools protocol.

    text = render("http://127.0.0.1:5000/#/models/adapter-faq", Path("page.png"),
                  headers={"Authorization": "Basic ..."}, wait_for="demo/v3")

The DevTools protocol, rather than `chromium --screenshot`, because a server with auth on needs its
Authorization header on every request the page's scripts make, and because a single-page UI such
as MLflow's draws its content after the page has loaded: ``render`` waits until the text it looks
for is on the page, then takes the screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

from servers import free_port


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: Path, headers: dict | None = None, wait_for: str = "", timeout: float = 90,
           size: tuple[int, int] = (1400, 1000)) -> str:
    """The page's rendered text once ``wait_for`` is in it; its screenshot (PNG) written to ``screenshot``."""
    port, profile = free_port(), tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                                f"--window-size={size[0]},{size[1]}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with connect(_page_socket(port, timeout), max_size=None, open_timeout=timeout) as socket:
            call = _caller(socket)
            call("Network.enable")
            call("Network.setExtraHTTPHeaders", headers=headers or {})
            call("Page.navigate", url=url)
            deadline, text = time.monotonic() + timeout, ""
            while time.monotonic() < deadline:
                text = call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                            returnByValue=True)["result"].get("value", "")
                if wait_for in text:
                    break
                time.sleep(0.5)
            else:
                raise TimeoutError(f"{url}: {wait_for!r} not on the page after {timeout:.0f} s; it shows:\n"
                                   f"{text[:2000]}")
            time.sleep(1)  # the last frame of the table's layout
            screenshot.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
            return text
    finally:
        browser.terminate()
        browser.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def _page_socket(port: int, timeout: float) -> str:
    """The DevTools WebSocket of the browser's first page, once the browser answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                pages = [p for p in json.load(answer) if p.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium's DevTools did not answer on port {port} within {timeout:.0f} s")
        time.sleep(0.2)


def _caller(socket):
    """``call(method, **params)``: one DevTools command and its result, skipping the events between."""
    ids = itertools.count(1)

    def call(method: str, **params) -> dict:
        number = next(ids)
        socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(socket.recv())
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"chromium: {method}: {message['error']}")
                return message.get("result", {})

    return call
