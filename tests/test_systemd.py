"""sd_notify against a real unix datagram socket, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daqd.systemd import Notifier
from tests.conftest import Daemon

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "daqd@.service"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_status_watchdog_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("ORBIT: 3 receivers\nnext")
    assert notifier.status("RUN 42")
    assert notifier.watchdog()
    assert notifier.stopping("draining")
    notifier.close()
    assert received(sock) == [
        f"READY=1\nMAINPID={os.getpid()}\nSTATUS=ORBIT: 3 receivers next",
        "STATUS=RUN 42",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=draining",
    ]


def test_abstract_namespace_socket() -> None:
    name = f"daqd-notify-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        notifier.close()
        assert received(sock) == [f"READY=1\nMAINPID={os.getpid()}"]
    finally:
        sock.close()


def test_without_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_interval_s is None
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()


def test_watchdog_interval_is_half_and_only_for_this_pid(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "20000000"}
    assert Notifier(env).watchdog_interval_s == 10.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 10.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None


async def test_watchdog_pings_while_the_loop_is_healthy(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.run_watchdog())
    loop = asyncio.get_running_loop()
    try:
        pings = [await asyncio.wait_for(loop.sock_recv(sock, 64), 10) for _ in range(3)]
    finally:
        task.cancel()
    assert pings == [b"WATCHDOG=1"] * 3


async def test_no_watchdog_ping_while_unhealthy(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})
    checks = 0
    enough = asyncio.Event()

    def healthy() -> bool:
        nonlocal checks
        checks += 1
        if checks == 3:
            enough.set()
        return checks > 3

    task = asyncio.create_task(notifier.run_watchdog(healthy))
    try:
        await asyncio.wait_for(enough.wait(), 10)
        assert received(sock) == []  # three checks said unhealthy: no ping went out
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(sock, 64), 10) == b"WATCHDOG=1"
    finally:
        task.cancel()


def test_unit_file_has_what_the_deployment_relies_on() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecStart=/usr/local/bin/daqd serve /etc/daqd/%i.toml",
        "Restart=on-failure",
        "RuntimeDirectory=daqd",
        "StateDirectory=daqd",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


@needs_analyze
def test_unit_file_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart exists, so point it at this checkout's daqd.
    daqd = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "daqd"
    if not daqd.exists():
        daqd = ROOT / ".venv" / "bin" / "daqd"
    unit = tmp_path / "daqd@.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/daqd", str(daqd)))
    result = subprocess.run(
        [str(analyze), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@needs_analyze
def test_unit_file_exposure_is_at_most_2() -> None:
    result = subprocess.run(
        [str(analyze), "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline mode (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_daemon_notifies_ready_watchdog_and_stopping(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(workdir / "notify"))
    sock.settimeout(30)
    try:
        config = (
            '[daemon]\nname = "t"\n[[receiver]]\ntype = "udp"\nname = "u"\nlisten = "127.0.0.1:0"\n'
        )
        d = daemon(config, start=False)
        d.env.update({"NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "400000"})
        d.start()
        messages = [sock.recv(4096).decode() for _ in range(3)]
        ready = messages[0].splitlines()
        assert ready[0] == "READY=1"
        assert d.proc is not None and f"MAINPID={d.proc.pid}" in ready
        assert any(line.startswith("STATUS=ORBIT") for line in ready)
        assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        assert d.stop() == 0
        rest = []
        while not any(m.startswith("STOPPING=1") for m in rest):
            rest.append(sock.recv(4096).decode())
        assert all(m in ("WATCHDOG=1",) or m.startswith(("STOPPING=1", "STATUS=")) for m in rest)
    finally:
        sock.close()
