"""A headless Chromium driven over the DevTools protocol, enough to test the MLflow UI: open a page, wait for
what it renders, run JavaScript in it, take a screenshot. The websocket is aiohttp's, which MLflow installs.

Also a command, to take the docs' screenshots of a running `mlflow ui`:
    python tests/browser.py URL OUT.png [--expand RUN_NAME_PREFIX] [--text TEXT_THE_PAGE_SHOWS]
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request


def chromium() -> str | None:
    """The Chromium on PATH (Debian's `chromium`, or another build's name), or None."""
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Page:
    """One tab of a fresh headless Chromium (its own profile: no saved UI state) showing `url`."""

    def __init__(self, url: str, width: int = 1600, height: int = 900):
        self.url, self.size = url, (width, height)
        self.ids = itertools.count(1)

    async def __aenter__(self) -> Page:
        import aiohttp

        self.profile = tempfile.mkdtemp(prefix="cfae-chromium-")
        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        for line in self.process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = found.group(1)
                break
        if port is None:
            raise RuntimeError(f"{chromium()} exited ({self.process.wait()}) without a DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.socket = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.socket.close()
        await self.session.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events arriving meanwhile are passed over)."""
        sent = next(self.ids)
        await self.socket.send_json({"id": sent, "method": method, "params": params})
        while True:
            message = await self.socket.receive_json()
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        """The first truthy value of `expression`, polled until `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                text = await self.evaluate("document.body.innerText")
                raise TimeoutError(f"{expression[:120]} stayed false for {timeout:.0f} s; the page says: "
                                   f"{' '.join(str(text).split())[:1500]}")
            await asyncio.sleep(0.25)
        return value

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])


# The MLflow runs table (AG Grid) as a reader sees it: its rows top to bottom (a row's cells may sit in
# several containers, joined by row index), each with the run's name, id and shown test RMSE.
ROWS = """(() => {
  const rows = {};
  for (const r of document.querySelectorAll('.ag-row[row-index]')) {
    const row = rows[r.getAttribute('row-index')] ??= {};
    const link = r.querySelector('a[href*="/runs/"]');
    if (link) Object.assign(row, {name: link.textContent.trim(),
                                  id: link.getAttribute('href').split('/runs/')[1].split(/[?/]/)[0]});
    const cell = r.querySelector('[col-id="metrics.`test/rmse`"]');
    if (cell) row.test_rmse = cell.textContent.trim();
  }
  return Object.keys(rows).sort((a, b) => a - b).map(k => rows[k]).filter(row => row.id);
})()"""
HEADERS = "[...document.querySelectorAll('.ag-header-cell[col-id]')].map(e => e.innerText.trim())"
CLOSE_ASSISTANT = """(() => {
  const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) b.click();
  return true; })()"""


def expand(prefix: str) -> str:
    """JavaScript that clicks the expand button of the run whose name starts with `prefix`."""
    return f"""(() => {{
  const link = [...document.querySelectorAll('a[href*="/runs/"]')]
    .find(a => a.textContent.trim().startsWith({json.dumps(prefix)}));
  const button = link && link.closest('.ag-cell').querySelector('button');
  if (button) button.click();
  return Boolean(button); }})()"""


async def _shoot(url: str, out: str, prefix: str | None, text: str | None = None) -> None:
    async with Page(url, 1600, 900) as page:
        if text:  # a page other than the runs table: wait for what it shows
            await page.wait_for(f"document.body.innerText.includes({json.dumps(text)})")
        else:
            await page.wait_for(f"{ROWS}.length > 0")
        await page.evaluate(CLOSE_ASSISTANT)
        if prefix:
            before = len(await page.evaluate(ROWS))
            await page.wait_for(expand(prefix))
            await page.wait_for(f"{ROWS}.length > {before}")
        await asyncio.sleep(1)
        with open(out, "wb") as f:
            f.write(await page.screenshot())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot an MLflow UI page in headless Chromium.")
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--expand", help="expand the run whose name starts with this")
    parser.add_argument("--text", help="wait until the page shows this text (a page other than the runs table)")
    args = parser.parse_args()
    asyncio.run(_shoot(args.url, args.out, args.expand, args.text))
