"""The web view's page in a real headless browser (Debian's chromium + chromium-driver, driven by
Selenium): no console errors, the receivers, rates that move, the camera picture of a readout sent
by `daqd sim slowsignal` (pixel colours of its known pattern), run control with and without the
token. The browser is installed here when missing (CI runs as root on Debian); without it these
tests are skipped with the reason."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daqd.protocols.slowsignal import MV_PER_COUNT

from .conftest import DAQD, Daemon, wait_until

# the first test may install the browser (apt-get): more than the default 120 s per test
pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token-0123456789"
PRESENT = 28  # modules the simulator sends; 28..31 are missing from the picture
STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
MISSING = (58, 58, 58)


def _install_browser() -> str | None:
    """Install chromium + chromium-driver with apt when missing; the reason if that cannot be."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if shutil.which("apt-get") is None:
        return "no chromium/chromedriver and no apt-get to install them"
    if os.geteuid() != 0:
        return "no chromium/chromedriver, and installing them needs root"
    try:
        for cmd in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
        ):
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=900,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"installing chromium failed: {exc}"
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "chromium-driver installed, but no /usr/bin/chromium or /usr/bin/chromedriver"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra)")
    why = _install_browser()
    if why:
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1200",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def web_daemon() -> Iterator[tuple[Daemon, str]]:
    workdir = Path(tempfile.mkdtemp(prefix="daqd-w"))
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    (workdir / "token").write_text(TOKEN + "\n")
    modules = ", ".join(str(m) for m in range(PRESENT))
    config = f"""
[daemon]
name = "webb"
http = "127.0.0.1:0"
http_token_file = "{workdir / "token"}"

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[receiver]]
type = "slowsignal"
name = "cam"
listen = "127.0.0.1:0"
modules = [{modules}]
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{workdir / "out"}"
fsync = "never"
"""
    d = Daemon(workdir, runtime, config, "webb").start()
    try:
        address = wait_until(lambda: d.status().get("http"), 10, "the web view's address")
        yield d, str(address)
    finally:
        d.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _open(driver: Any, address: str, query: str = "") -> None:
    driver.get(address + query)
    wait_until(
        lambda: (
            driver.execute_script("return document.getElementById('link').textContent") == "live"
        ),
        30,
        "the page's event stream",
    )


def _text(driver: Any, css: str) -> str:
    return str(
        driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", css
        )
    )


def test_page_loads_and_rates_move(browser: Any, web_daemon: tuple[Daemon, str]) -> None:
    d, address = web_daemon
    browser.get_log("browser")  # drop what earlier pages logged
    _open(browser, address, "?watch=raw")
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr')).map("
        "r => r.dataset.kind + '/' + r.dataset.name)"
    )
    assert rows == ["receiver/raw", "receiver/cam", "publisher/disk"]
    assert _text(browser, "#state") == "ORBIT"
    assert _text(browser, "#daemon-name") == "webb"
    port = int(d.status()["receivers"]["raw"]["addresses"]["listen"].rsplit(":", 1)[1])
    stop = threading.Event()

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            i = 0
            while not stop.is_set():
                s.sendto(i.to_bytes(8, "big"), ("127.0.0.1", port))
                i += 1
                if i % 100 == 0:
                    stop.wait(0.01)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        rate = wait_until(
            lambda: (
                float(_text(browser, "tr[data-name='raw'] td.rate") or 0) > 0
                and float(_text(browser, "tr[data-name='raw'] td.rate"))
            ),
            30,
            "the raw receiver's rate to move on the page",
        )
        assert rate > 0
        first = int(_text(browser, "tr[data-name='raw'] td.records").replace(",", ""))
        wait_until(
            lambda: int(_text(browser, "tr[data-name='raw'] td.records").replace(",", "")) > first,
            30,
            "the record count to go up",
        )
        # the watched receiver's last records, as `daqctl tap` shows them
        wait_until(lambda: _text(browser, "#taprows tr td:nth-child(2)") == "raw", 30, "tap rows")
        points = browser.execute_script(
            "return document.querySelector(\"tr[data-name='raw'] svg polyline\")"
            ".getAttribute('points')"
        )
        assert len(points.split()) >= 2
    finally:
        stop.set()
        sender.join()
    assert _console_errors(browser) == []


def _expected_colour(v: float, lo: float, hi: float) -> tuple[int, ...]:
    f = (v - lo) / (hi - lo) if hi > lo else 0.5
    f = min(1.0, max(0.0, f))
    x = f * (len(STOPS) - 1)
    i = min(math.floor(x), len(STOPS) - 2)
    t = x - i
    a, b = STOPS[i], STOPS[i + 1]
    return tuple(math.floor(a[k] + (b[k] - a[k]) * t + 0.5) for k in range(3))


def test_camera_picture_of_a_simulated_readout(
    browser: Any, web_daemon: tuple[Daemon, str]
) -> None:
    d, address = web_daemon
    browser.get_log("browser")
    _open(browser, address)  # the first slow-signal receiver is watched by default
    assert browser.execute_script("return document.getElementById('watch').value") == "cam"
    port = d.status()["receivers"]["cam"]["addresses"]["listen"].rsplit(":", 1)[1]
    sim = subprocess.run(
        [
            DAQD,
            "sim",
            "slowsignal",
            "--target",
            f"127.0.0.1:{port}",
            "--modules",
            str(PRESENT),
            "--blocks-per-packet",
            "1",
            "--count",
            str(PRESENT),
            "--rate",
            "1000",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sim.returncode == 0, sim.stderr
    wait_until(
        lambda: (
            browser.execute_script("return document.getElementById('camera-info').dataset.readout")
            == "1"
        ),
        30,
        "readout 1 on the camera picture",
    )
    assert browser.execute_script(
        "return document.getElementById('camera-info').dataset.missing"
    ) == str(32 - PRESENT)
    # readout 1 is the simulator's readout k = 0: counts = (m * 4099 + ch * 257) & 0xFFFF
    mv = {
        (m, ch): (m * 4099 + ch * 257 & 0xFFFF) * MV_PER_COUNT
        for m in range(PRESENT)
        for ch in range(64)
    }
    lo, hi = round(min(mv.values()), 2), round(max(mv.values()), 2)
    assert _text(browser, "#scale-min") == f"{lo:.1f}"
    assert _text(browser, "#scale-max") == f"{hi:.1f}"
    probes = [(0, 0), (0, 63), (1, 8), (5, 17), (13, 40), (20, 2), (27, 63), (27, 31), (9, 55)]
    pixels = browser.execute_script(
        """
        const ctx = document.getElementById('camera').getContext('2d');
        return arguments[0].map(([m, ch]) => {
          const [x, y] = window.daqdCamera.pixelAt(m, ch);
          return Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
        });
        """,
        [list(p) for p in [*probes, (29, 0), (31, 63)]],
    )
    for (m, ch), got in zip(probes, pixels, strict=False):
        want = _expected_colour(round(mv[(m, ch)], 2), lo, hi)
        assert all(abs(g - w) <= 2 for g, w in zip(got, want, strict=True)), (m, ch, got, want)
    assert [tuple(p) for p in pixels[-2:]] == [MISSING, MISSING]  # modules 29, 31: missing
    distinct = {tuple(p) for p in pixels[: len(probes)]}
    assert len(distinct) >= 5  # a pattern, not one colour
    # once nobody watches, the tap is let go; a page opened later shows the last picture at
    # once, with nothing more sent
    browser.get("about:blank")
    wait_until(
        lambda: (
            json.loads(urllib.request.urlopen(address + "api/status", timeout=10).read())[
                "watching"
            ]
            == {}
        ),
        30,
        "nobody watching",
    )
    _open(browser, address)
    wait_until(
        lambda: (
            browser.execute_script("return document.getElementById('camera-info').dataset.readout")
            == "1"
        ),
        30,
        "the last readout on a page opened later",
    )
    assert _console_errors(browser) == []


def test_start_button_needs_the_token(browser: Any, web_daemon: tuple[Daemon, str]) -> None:
    d, address = web_daemon
    browser.get_log("browser")
    _open(browser, address)
    assert browser.execute_script("return document.getElementById('control').hidden") is False
    browser.execute_script("document.getElementById('token').value = 'not-the-token-at-all'")
    browser.find_element("css selector", "#run-id-input").send_keys("browser-1")
    browser.find_element("css selector", "button[data-transition='start']").click()
    wait_until(lambda: "refused" in _text(browser, "#control-result"), 30, "the refusal")
    assert (
        browser.execute_script("return document.getElementById('control-result').dataset.status")
        == "403"
    )
    assert d.status()["state"] == "ORBIT"
    browser.execute_script(f"document.getElementById('token').value = '{TOKEN}'")
    browser.find_element("css selector", "button[data-transition='start']").click()
    wait_until(lambda: d.status()["state"] == "RUN", 30, "the run to start")
    assert d.status()["run"]["run_id"] == "browser-1"
    wait_until(lambda: _text(browser, "#run-id") == "browser-1", 30, "the run id on the page")
    wait_until(lambda: _text(browser, "#state") == "RUN", 30, "RUN on the page")
    browser.find_element("css selector", "button[data-transition='stop']").click()
    wait_until(lambda: d.status()["state"] == "ORBIT", 30, "the run to stop")
    wait_until(
        lambda: _text(browser, "#runrows tr[data-run='browser-1'] td:nth-child(4)") == "GOOD",
        30,
        "the run in the last runs",
    )
    # the refused request was counted; the browser logs the 403 as a failed resource only
    errors = [e for e in _console_errors(browser) if "403" not in e]
    assert errors == []
