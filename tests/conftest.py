"""Shared fixtures: a real `daqd serve` subprocess with its own runtime directory, and helpers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, settings

from daqd.control_client import ControlClient
from daqd.errors import ControlError

# Hypothesis on a loaded 2-core machine: one example may take seconds (another test's daemon has the
# CPU), so no per-example deadline and no "too slow" health check. Loaded by default (this file is
# imported before any test module, so every @settings(...) inherits it); HYPOTHESIS_PROFILE=NAME
# picks another registered profile ("default" is Hypothesis's own).
settings.register_profile(
    "daqd", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "daqd"))

BIN = Path(sys.executable).parent
DAQD = str(BIN / "daqd")
DAQCTL = str(BIN / "daqctl")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


async def wait_for(
    predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    """Async `wait_until`: poll `predicate` every 10 ms, yielding to the loop; returns its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


class HostRig:
    """An in-process Host with one receiver under test writing run files to `tmp_path`."""

    def __init__(self, host: Any, receiver: str, tmp_path: Path) -> None:
        self.host = host
        self.name = receiver
        self.rec: Any = host.receivers[receiver]
        self.tmp_path = tmp_path

    async def wait(self, what: str, cond: Callable[[], bool]) -> None:
        """wait_for, whose failure also shows the receiver's stats."""
        try:
            await wait_for(cond, 30.0, what)
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.rec.cmd_stats()}") from None

    def records(self, run_id: str) -> tuple[list[Any], dict[str, Any]]:
        """The receiver's records in run file run-RUN_ID.daqd, and the file's end marker."""
        with open(self.tmp_path / f"run-{run_id}.daqd", "rb") as f:
            items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
        return [i for i in items[1:-1] if i[0] == self.name], items[-1]["end"]


class Daemon:
    """A `daqd serve CONFIG` subprocess, reached through its control socket."""

    def __init__(
        self, workdir: Path, runtime: Path, config: str, name: str, prefix: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.prefix = list(prefix)  # a command to run daqd under (e.g. chrt, setpriv)
        self.runtime = runtime
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime)}
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.pop("DAQD_NAME", None)  # a daqctl without --name must not find the user's daemon
        self.endpoint = f"ipc://{runtime}/{name}.ctl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> Daemon:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*self.prefix, DAQD, "serve", str(self.config_path)],
            cwd=self.workdir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daqd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.request("STAT", timeout_s=1.0)["state"] == "ORBIT"
            except ControlError:
                return False

        wait_until(ready, timeout_s, "the daemon to answer on its control socket")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self, code: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0
    ) -> Any:
        with ControlClient(self.endpoint, timeout_s=timeout_s) as c:
            return c.request(code, args or {})

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("STAT")
        return result

    def ctl(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DAQCTL, "--name", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True

    stopping = False  # a SIGTERM/SIGINT was sent: another would force an exit at once

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None and not self.stopping:
            self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daqd did not stop within {timeout_s} s:\n{self.log()}") from None
        self._log.close()
        return code


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary directory (ipc socket paths must stay under ~100 characters)."""
    path = Path(tempfile.mkdtemp(prefix="daqd-t"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Callable[..., Daemon]]:
    """daemon(config_text, name="t", prefix=()) -> a started Daemon; stopped at the end of the
    test. `prefix`: a command to run `daqd serve` under."""
    started: list[Daemon] = []
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)

    def make(
        config: str, name: str = "t", start: bool = True, prefix: Sequence[str] = ()
    ) -> Daemon:
        d = Daemon(workdir, runtime, config, name, prefix)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
