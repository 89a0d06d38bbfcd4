"""Headless Chromium driven over the DevTools protocol (websocket-client), so a test can click and read the page."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

START_TIMEOUT_S = 60
READY_TIMEOUT_S = 60


class Browser:
    """One headless Chromium with one page; `evaluate` runs JavaScript in it and returns the JSON value."""

    def __init__(self, binary: str, profile_dir: Path, width: int = 1280, height: int = 900):
        self.binary, self.profile_dir, self.width, self.height = binary, profile_dir, width, height
        self.process: subprocess.Popen | None = None
        self.ws: websocket.WebSocket | None = None
        self._next_id = 0

    def __enter__(self) -> "Browser":
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile_dir}",
                f"--window-size={self.width},{self.height}", "--hide-scrollbars", "about:blank"]
        # Own session, so the browser is ended with all its renderer and GPU children.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "HOME": str(self.profile_dir)}, start_new_session=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.load(resp) if t.get("type") == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def send(self, method: str, **params: Any) -> dict:
        """One DevTools command; events that arrive meanwhile are dropped."""
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_ready()

    def wait_ready(self, path: str | None = None) -> None:
        """Until the page says data-state=ready (its data arrived and was drawn), or error."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.evaluate("[location.pathname, document.body ? document.body.dataset.state : null]")
            if state and (path is None or state[0] == path):
                if state[1] == "ready":
                    return
                if state[1] == "error":
                    raise AssertionError(self.evaluate("document.getElementById('banner').textContent"))
            time.sleep(0.1)
        raise TimeoutError(f"page never became ready: {self.evaluate('location.href')}")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))
