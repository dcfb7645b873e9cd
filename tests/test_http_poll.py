"""http_poll receiver against a fake Axis camera on 127.0.0.1 that fails, stalls and asks for auth."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from daqd.config import parse_config
from daqd.errors import ConfigError, DaqdError
from daqd.host import Host
from daqd.http import GrabError, grab, image_bytes

from .conftest import wait_for

SNAPSHOT = "/axis-cgi/jpg/image.cgi"
USER, PASSWORD = "root", "s3cret-pass"
REALM = "AXIS_ACCC8E123456"


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class FakeCamera:
    """An Axis-like snapshot server. `script` holds what the next requests get: ok, fail, stall, big.

    Once the script is used up every request gets `default`.
    """

    def __init__(self, auth: str = "none") -> None:
        self.auth = auth
        self.script: list[str] = []
        self.default = "ok"
        self.hits: list[str] = []  # the action each request got
        self.authorized = 0
        self.challenges = 0  # 401 answers asking for credentials
        self.frame = 0
        self.nonces: set[str] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.stall = asyncio.Event()  # never set: a stalled request waits until the client leaves

    def image(self, n: int) -> bytes:
        return b"\xff\xd8\xff\xe0" + n.to_bytes(4, "big") + bytes(2000) + b"\xff\xd9"

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get(SNAPSHOT, self.snapshot)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self.url()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{SNAPSHOT}?camera=1"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def challenge(self) -> web.Response:
        self.challenges += 1
        if self.auth == "basic":
            value = f'Basic realm="{REALM}"'
        else:
            nonce = os.urandom(8).hex()
            self.nonces.add(nonce)
            value = f'Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'
        return web.Response(status=401, headers={"WWW-Authenticate": value})

    def authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            return header == f"Basic {expected}"
        if not header.startswith("Digest "):
            return False
        p = {k: v1 or v2 for k, v1, v2 in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]+))', header)}
        if p.get("nonce") not in self.nonces or p.get("username") != USER:
            return False
        ha1 = _md5(f"{USER}:{REALM}:{PASSWORD}")
        ha2 = _md5(f"GET:{p['uri']}")
        expected = _md5(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:{p['qop']}:{ha2}")
        return p.get("response") == expected and p["uri"] == request.path_qs

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        if self.auth != "none" and not self.authorised(request):
            return self.challenge()
        self.authorized += self.auth != "none"
        action = self.script.pop(0) if self.script else self.default
        self.hits.append(action)
        if action == "fail":
            return web.Response(status=503, text="busy")
        if action == "stall":
            await self.stall.wait()
        if action == "big":
            return web.Response(body=bytes(100_000), content_type="image/jpeg")
        self.frame += 1
        return web.Response(body=self.image(self.frame), content_type="image/jpeg")


@pytest.fixture
async def camera() -> AsyncIterator[FakeCamera]:
    cam = FakeCamera()
    await cam.start()
    try:
        yield cam
    finally:
        await cam.stop()


def poll_config(url: str, **extra: object) -> str:
    def fmt(v: object) -> str:
        return f'"{v}"' if isinstance(v, str | Path) else str(v)

    # a generous fetch timeout unless a test is about one running out: a frame the camera serves
    # must never miss a short window because the machine is loaded
    settings = {"timeout_s": 30, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, **extra}
    lines = "\n".join(f"{k} = {fmt(v)}" for k, v in settings.items())
    return f"""
[daemon]
name = "t"

[[receiver]]
type = "http_poll"
name = "cam"
url = "{url}"
{lines}
"""


@pytest.fixture
async def make_host() -> AsyncIterator[Callable[..., object]]:
    hosts: list[Host] = []

    async def make(url: str, **extra: object) -> Host:
        h = Host(parse_config(poll_config(url, **extra), "<test>"))
        await h.start()
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        await h.stop()


async def test_polls_on_a_timer(camera: FakeCamera, make_host: Callable[..., object]) -> None:
    host = await make_host(camera.url(), interval_s=0.05)  # type: ignore[misc]
    rec = host.receivers["cam"]
    await wait_for(lambda: rec.counters.records >= 3)
    record = await grab("cam", timeout_s=20)
    assert image_bytes(record) == camera.image(camera.frame)  # the frame the camera just served
    assert record.tags["status"] == 200
    assert record.tags["content_type"] == "image/jpeg"
    assert record.tags["length"] == len(camera.image(1))
    assert record.tags["elapsed_s"] > 0
    assert rec.counters.errors == {}
    assert rec.status()["addresses"]["url"] == camera.url()


async def test_failures_and_stalls_are_counted_and_retried(
    camera: FakeCamera, make_host: Callable[..., object]
) -> None:
    camera.script = ["fail", "fail", "stall", "fail", "fail", "fail", "fail", "ok"]
    # the stall ends on the 1 s fetch timeout; the other answers are immediate
    host = await make_host(camera.url(), interval_s=0.05, timeout_s=1.0)  # type: ignore[misc]
    rec = host.receivers["cam"]
    seen_backoffs: set[float] = set()

    def recovered() -> bool:
        seen_backoffs.add(rec.counters.extra.get("retry_in_s", 0))
        return rec.counters.records >= 2

    await wait_for(recovered)
    assert rec.counters.errors == {"http_status": 6, "timeout": 1}
    assert camera.hits[:8] == ["fail", "fail", "stall", "fail", "fail", "fail", "fail", "ok"]
    assert rec.state == "running"  # never fatal
    assert rec.counters.extra["failures_in_a_row"] == 0
    assert "HTTP 503" in rec.counters.extra["last_error"]
    # Backoff doubled from 0.05 s and stayed capped at backoff_max_s.
    assert max(seen_backoffs) == 0.2
    assert seen_backoffs <= {0, 0.05, 0.1, 0.2}


async def test_camera_down_then_up(make_host: Callable[..., object]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    camera = FakeCamera()
    camera.port = port
    host = await make_host(camera.url(), interval_s=0.05)  # type: ignore[misc]
    rec = host.receivers["cam"]
    await wait_for(lambda: rec.counters.errors.get("connect", 0) >= 2)
    assert rec.state == "running"
    await camera.start(port)
    try:
        await wait_for(lambda: rec.counters.records >= 1)
        assert rec.counters.extra["failures_in_a_row"] == 0
    finally:
        await camera.stop()


async def test_grab_only_mode_and_command(camera: FakeCamera) -> None:
    # The yardstick for "no timer": a second receiver in the same host polls another camera every
    # 0.05 s. A timer fetches at once when it starts, so by the time the yardstick has made several
    # GETs (however loaded the machine), a wrong timer on the grab-only receiver would have too.
    ref = FakeCamera()
    await ref.start()
    config = poll_config(camera.url(), interval_s=0) + (
        f'\n[[receiver]]\ntype = "http_poll"\nname = "ref"\nurl = "{ref.url()}"\n'
        "interval_s = 0.05\n"
    )
    host = Host(parse_config(config, "<test>"))
    await host.start()
    try:
        await _grab_only_mode_and_command(host, camera, ref)
    finally:
        await host.stop()
        await ref.stop()


async def _grab_only_mode_and_command(host: Host, camera: FakeCamera, ref: FakeCamera) -> None:
    rec = host.receivers["cam"]
    await wait_for(lambda: len(ref.hits) >= 5)
    assert camera.hits == []
    assert rec.counters.records == 0
    camera.script = ["fail", "fail"]
    record = await grab("cam", timeout_s=20)  # retries through the failures
    assert image_bytes(record) == camera.image(1)
    assert camera.hits == ["fail", "fail", "ok"]
    assert rec.counters.errors == {"http_status": 2}
    answer = await rec.call_command("grab", [], {})
    assert answer["seq"] == 2 and answer["status"] == 200 and answer["length"] == record.nbytes
    camera.default = "fail"
    with pytest.raises(DaqdError, match="HTTP 503"):
        await rec.call_command("grab", [], {})


async def test_grab_gives_up_with_the_last_error(
    camera: FakeCamera, make_host: Callable[..., object]
) -> None:
    camera.default = "stall"
    host = await make_host(camera.url(), interval_s=0, timeout_s=0.2)  # type: ignore[misc]
    rec = host.receivers["cam"]
    # One GET ends on the fetch's own 0.2 s deadline, however long the loop takes to get there.
    with pytest.raises(DaqdError, match=r"no complete answer within 0.2 s"):
        await rec.call_command("grab", [], {})
    assert rec.counters.errors == {"timeout": 1}
    # grab retries against the stalled camera until its own deadline, then gives up naming the
    # receiver's last error: the timeout above, or a later one of its own tries.
    with pytest.raises(GrabError, match=r"within 1 s \(last error: no complete answer within 0.2"):
        await grab("cam", timeout_s=1)
    assert rec.counters.records == 0 and rec.state == "running"


async def test_answer_over_the_limit(camera: FakeCamera, make_host: Callable[..., object]) -> None:
    camera.default = "big"
    host = await make_host(camera.url(), interval_s=0.05, max_body_bytes=50_000)  # type: ignore[misc]
    rec = host.receivers["cam"]
    await wait_for(lambda: rec.counters.errors.get("too_large", 0) >= 2)
    assert rec.counters.records == 0


async def test_basic_auth_never_logged(
    make_host: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    camera = FakeCamera(auth="basic")
    await camera.start()
    try:
        host = await make_host(  # type: ignore[misc]
            camera.url(), interval_s=0.05, auth="basic", username=USER, password=PASSWORD
        )
        rec = host.receivers["cam"]
        await wait_for(lambda: rec.counters.records >= 2)
        # basic auth goes with every request: none is challenged, each is authorised
        assert camera.challenges == 0 and camera.authorized == len(camera.hits) >= 2
        assert PASSWORD not in repr(host.status()) + repr(rec.settings) + caplog.text
        # A wrong password: 401s, counted, not fatal.
        bad = await make_host(  # type: ignore[misc]
            camera.url(), interval_s=0.05, auth="basic", username=USER, password="wrong"
        )
        await wait_for(lambda: bad.receivers["cam"].counters.errors.get("http_status", 0) >= 2)
        assert "HTTP 401" in bad.receivers["cam"].counters.extra["last_error"]
    finally:
        await camera.stop()


async def test_digest_auth_from_a_credentials_file(
    make_host: Callable[..., object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    creds = tmp_path / "camera.cred"
    creds.write_text(f"{USER}:{PASSWORD}\n")
    creds.chmod(0o600)
    camera = FakeCamera(auth="digest")
    await camera.start()
    try:
        host = await make_host(  # type: ignore[misc]
            camera.url(), interval_s=0.05, auth="digest", credentials_file=creds
        )
        rec = host.receivers["cam"]
        await wait_for(lambda: rec.counters.records >= 3)
        # one challenge, then its nonce is reused: every later request is authorised at once
        assert camera.challenges == 1 and camera.authorized == len(camera.hits) >= 3
        assert rec.counters.errors == {}
        assert PASSWORD not in repr(host.status()) + caplog.text
    finally:
        await camera.stop()


async def test_credential_settings_are_checked(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/x"
    with pytest.raises(ConfigError, match="needs credentials_file, or username and password"):
        parse_config(poll_config(url, auth="digest", username=USER), "<test>")
    with pytest.raises(ConfigError, match='auth = "none"'):
        parse_config(poll_config(url, username=USER, password=PASSWORD), "<test>")
    with pytest.raises(ConfigError, match="not in the URL") as err:
        parse_config(poll_config(f"http://{USER}:{PASSWORD}@127.0.0.1/x"), "<test>")
    del err
    with pytest.raises(ConfigError) as err2:
        parse_config(poll_config(url, auth="basic", username=USER, password=PASSWORD, x=1), "<t>")
    assert PASSWORD not in str(err2.value)
    # A credentials file that is missing or malformed stops the start with the file's name.
    bad = tmp_path / "bad.cred"
    bad.write_text(PASSWORD + "\n")
    for path in (tmp_path / "missing.cred", bad):
        host = Host(parse_config(poll_config(url, auth="basic", credentials_file=path), "<t>"))
        with pytest.raises(ConfigError, match=str(path)) as err3:
            await host.start()
        assert PASSWORD not in str(err3.value)


async def test_daqctl_grab_against_a_running_daemon(
    camera: FakeCamera, daemon: Callable[..., Any]
) -> None:
    config = poll_config(camera.url(), interval_s=0)
    # The daemon is a subprocess; blocking calls go to a thread so that this loop serves the camera.
    d = await asyncio.to_thread(daemon, config)
    done = await asyncio.to_thread(d.ctl, "cmd", "cam", "grab", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["seq"] == 1 and answer["status"] == 200
    assert answer["length"] == len(camera.image(1))
    camera.default = "fail"
    failed = await asyncio.to_thread(d.ctl, "cmd", "cam", "grab")
    assert failed.returncode != 0
    assert failed.stderr == "daqctl: cam.grab: HTTP 503 Service Unavailable\n"
    status = await asyncio.to_thread(d.status)
    cam = status["receivers"]["cam"]
    assert cam["state"] == "running"
    assert cam["records"] == 1 and cam["errors"] == {"http_status": 1}
    assert cam["extra"]["failures_in_a_row"] == 1
