"""The report opened in headless Chromium: no console error, nothing fetched, the plot drawn,
the tooltip shown on hover, the trials table sorted by a header click, the detail panel opened
by a click on a point or a row; and the comparison page drawn with one series per run.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), with the
standard library only.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from test_reports import LAYERS, POINTS, make_run
from test_reports_compare import WORSE

from reports import write_comparison, write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1000",
    "--remote-debugging-pipe",
]


class DevTools:
    """A Chromium process and one page, spoken to over the DevTools pipe (fds 3 and 4)."""

    def __init__(self, profile_dir: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Park the child's ends above fd 10 so moving them onto 3 and 4 cannot clobber them.
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def onto_3_and_4() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
            preexec_fn=onto_3_and_4,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self._next_id = 0
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer, keeping the events that arrive meanwhile."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=True, **params)

    def wait_for(self, event: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._messages.get(timeout=max(deadline - time.monotonic(), 0.01)))
        return next(e for e in self.events if e.get("method") == event)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, queue.Empty, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB or RGBA PNG into (width, channels, rows of raw pixel bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    channels = 4 if color == 6 else 3
    stride = width * channels
    raw = zlib.decompress(idat)
    rows: list[bytes] = []
    previous = bytearray(stride)
    for r in range(height):
        kind, line = (
            raw[r * (stride + 1)],
            bytearray(raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                corner = previous[i - channels] if i >= channels else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + best) & 255
        rows.append(bytes(line))
        previous = line
    return width, channels, rows


@pytest.fixture
def browser(tmp_path: Path):
    devtools = DevTools(tmp_path / "chromium-profile")
    yield devtools
    devtools.close()


def open_page(browser: DevTools, page: Path) -> list[dict[str, Any]]:
    """Load ``page`` and return the errors it raised (exceptions, console and log errors)."""
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.page(f"{domain}.enable")
    browser.page("Page.navigate", url=page.as_uri())
    browser.wait_for("Page.loadEventFired")
    browser.evaluate("document.readyState")  # drains the events raised while loading
    return [
        e
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]


def centre_of(browser: DevTools, selector: str) -> list[float]:
    """The viewport coordinates of the middle of the first element matching ``selector``."""
    return browser.evaluate(
        f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
        " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
        " return [r.left + Math.min(r.width / 2, 20), r.top + r.height / 2]; })()"
    )


def screenshot(browser: DevTools, element_id: str, path: Path) -> tuple[int, int, list[bytes]]:
    """A PNG of one element, saved to ``path`` for a person to look at, and its pixels."""
    box = browser.evaluate(
        f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect();"
        " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()"
    )
    shot = browser.page(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1},
    )
    png = base64.b64decode(shot["data"])
    path.write_bytes(png)
    return png_pixels(png)


def test_report_in_headless_chromium(tmp_path: Path, browser: DevTools) -> None:
    report = write_report(make_run(tmp_path / "runs"))
    assert open_page(browser, report) == []
    requested = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requested and all(url.startswith(("file:", "data:")) for url in requested), requested

    # Every completed trial is drawn as a visible point.
    drawn = browser.evaluate(
        "Array.from(document.querySelectorAll('#scatter circle[data-trial]')).filter(c => {"
        " const r = c.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length"
    )
    assert drawn == len(POINTS)

    # The screenshot of the plot is not blank and shows the front's colour.
    width, channels, rows = screenshot(browser, "scatter", tmp_path / "scatter.png")
    inked = red = 0
    for row in rows:
        for i in range(0, width * channels, channels):
            r, g, b = row[i], row[i + 1], row[i + 2]
            inked += min(r, g, b) < 200
            red += r > 170 and g < 110 and b < 110
    assert inked > 0.01 * width * len(rows)
    assert red > 50

    # Hovering a point shows its trial in the tooltip.
    point = browser.evaluate(
        "(() => { const r = document.querySelector('#scatter circle[data-trial=\"3\"]')"
        ".getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    browser.page("Input.dispatchMouseEvent", type="mouseMoved", x=point[0], y=point[1])
    tooltip = browser.evaluate(
        "(() => { const t = document.getElementById('tooltip');"
        " return t.hidden ? null : t.textContent; })()"
    )
    assert tooltip is not None and "trial 3" in tooltip and "<script>" in tooltip

    # Clicking the latency header sorts the table numerically; a second click reverses it.
    header = browser.evaluate(
        "(() => { const th = Array.from(document.querySelectorAll('#trials th'))"
        ".find(h => h.textContent === 'latency ms'); th.scrollIntoView();"
        " const r = th.getBoundingClientRect(); return [r.left + 5, r.top + r.height / 2]; })()"
    )
    column = (
        "Array.from(document.querySelectorAll('#trials tbody tr'))"
        ".map(tr => parseFloat(tr.cells[2].getAttribute('data-v')))"
    )
    latencies = sorted(lat for _, lat in POINTS)
    browser.click(*header)
    assert browser.evaluate(column) == latencies
    browser.click(*header)
    assert browser.evaluate(column) == latencies[::-1]
    assert browser.evaluate("document.querySelector('#trials th[aria-sort]').textContent") == (
        "latency ms"
    )

    # Clicking a point opens the detail panel for that trial, with its layers and commands.
    assert browser.evaluate("document.getElementById('detail').hidden") is True
    browser.click(*centre_of(browser, "#scatter circle[data-trial='3']"))
    detail = (
        "(() => { const d = document.getElementById('detail'); if (d.hidden) return null;"
        " const r = d.getBoundingClientRect(); return [r.width,"
        " d.querySelector('.detail-number').textContent,"
        " d.querySelectorAll('.layer-row').length, d.querySelectorAll('.time-bar').length,"
        " d.querySelector('.export-cmd').textContent]; })()"
    )
    width_px, number, layer_rows, time_bars, export = browser.evaluate(detail)
    assert width_px > 300 and number == "3"
    assert layer_rows == len(LAYERS) + 1 and time_bars == len(LAYERS)
    assert "--trial 3" in export
    screenshot(browser, "detail", tmp_path / "detail.png")
    assert browser.evaluate(
        "document.querySelector('#scatter circle.selected').dataset.trial"
    ) == ("3")

    # Clicking a table row shows that row's trial instead; Escape closes the panel.
    browser.click(*centre_of(browser, "#trials tbody tr[data-trial='5'] td"))
    assert browser.evaluate(detail)[1] == "5"
    browser.page("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape")
    assert browser.evaluate(detail) is None


def test_comparison_in_headless_chromium(tmp_path: Path, browser: DevTools) -> None:
    runs = [
        make_run(tmp_path / "runs", "better"),
        make_run(tmp_path / "runs", "worse", points=WORSE, with_others=False),
    ]
    page = write_comparison(runs, tmp_path / "compare.html")
    assert open_page(browser, page) == []
    for svg_id in ("compare-scatter", "compare-hv"):
        # One visible series per run, each with a visible point per front or history entry.
        drawn = browser.evaluate(
            f"Array.from(document.querySelectorAll('#{svg_id} g.series')).map(g =>"
            " Array.from(g.querySelectorAll('circle')).filter(c => {"
            " const r = c.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length)"
        )
        assert len(drawn) == len(runs) and all(n > 0 for n in drawn), drawn
    # Both runs' colours (blue, then red) are on the fronts plot.
    width, channels, rows = screenshot(browser, "compare-scatter", tmp_path / "compare.png")
    blue = red = 0
    for row in rows:
        for i in range(0, width * channels, channels):
            r, g, b = row[i], row[i + 1], row[i + 2]
            blue += b > 170 and r < 90 and g < 140
            red += r > 170 and g < 90 and b < 90
    assert blue > 50 and red > 50
    # The runs table sorts by hypervolume: the better run first when descending.
    header = centre_of(browser, "#runs th:nth-child(8)")
    browser.click(*header)
    browser.click(*header)
    first = browser.evaluate("document.querySelector('#runs tbody tr').cells[0].textContent")
    assert first == "better"
