"""`daqd demo` as a newcomer runs it: a subprocess, its control socket answering the `daqctl`
line it prints, every datagram accounted for, and run files within the bound it states."""

from __future__ import annotations

import os
import queue
import re
import shlex
import subprocess
import threading
from pathlib import Path

import pytest

from daqd.demo import _command_name
from daqd.runfile import verify

from .conftest import DAQD, wait_until


class Demo:
    """A running `daqd demo` whose stdout lines are collected as they come."""

    def __init__(self, workdir: Path, *args: str) -> None:
        runtime = workdir / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        # PATH without the venv: the demo then names daqctl by its path, as after `make demo`
        self.env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime), "PATH": "/usr/bin:/bin"}
        self.env.pop("DAQD_NAME", None)
        self.proc = subprocess.Popen(
            [DAQD, "demo", *args],
            cwd=workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))

    def output(self) -> str:
        while not self._new.empty():
            self.lines.append(self._new.get())
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                self.output()
                raise AssertionError(f"daqd demo exited {self.proc.returncode}: {self.output()}")
            return re.search(pattern, self.output(), re.MULTILINE)

        match: re.Match[str] = wait_until(found, timeout_s, f"demo output {pattern!r}")
        return match

    def finish(self, timeout_s: float = 60.0) -> tuple[int, str, str]:
        code = self.proc.wait(timeout_s)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        self._reader.join(30)  # stdout ended with the process: the last lines are in
        return code, self.output(), err


def test_demo_answers_the_daqctl_line_it_prints_and_bounds_its_run_files(workdir: Path) -> None:
    data = workdir / "demo"
    demo = Demo(
        workdir, "--seconds", "120", "--rate", "1000", "--max-run-mb", "1", "--directory", str(data)
    )
    try:
        line = demo.wait_for_line(r"^  (\S*daqctl --name demo status)$").group(1)
        assert line == str(Path(DAQD).parent / "daqctl") + " --name demo status"
        status = subprocess.run(
            shlex.split(line), env=demo.env, capture_output=True, text=True, timeout=30
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "daqd demo" in status.stdout and "camera" in status.stdout

        # a second demo finds the first one's control socket and starts nothing
        second = subprocess.run(
            [DAQD, "demo", "--seconds", "1", "--directory", str(workdir / "other")],
            env=demo.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "a daemon named 'demo' already answers" in second.stderr
        assert not (workdir / "other").exists()

        # the demo's own run ends at the bound, and a run started with daqctl too
        demo.wait_for_line(r"^demo: run demo-\S+ ended at .* near the demo's bound of 1\.0 MB")
        ctl = [*shlex.split(line)[:-1]]
        start = subprocess.run(
            [*ctl, "start", "second"], env=demo.env, capture_output=True, text=True, timeout=30
        )
        assert start.returncode == 0, start.stdout + start.stderr
        demo.wait_for_line(r"^demo: run second ended at .* near the demo's bound of 1\.0 MB")
        shutdown = subprocess.run(
            [*ctl, "shutdown"], env=demo.env, capture_output=True, text=True, timeout=60
        )
        assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
        code, out, err = demo.finish()
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
            demo.proc.wait()
    assert code == 0, err
    assert "Traceback" not in err
    m = re.search(r"sent (\d+) datagrams, received (\d+), dropped (\d+)", out)
    assert m is not None, out
    sent, received, dropped = map(int, m.groups())
    assert sent > 0 and sent == received + dropped  # every datagram is accounted for
    files = sorted(data.glob("run-*.daqd"))
    assert [f.name.split("-")[1].split(".")[0] for f in files] == ["demo", "second"]
    for f in files:
        assert f.stat().st_size <= 1_000_000
        summary = verify(f)
        assert summary.problems == [] and summary.end is not None, summary
        assert summary.end["condition"] == "GOOD" and sum(summary.records.values()) > 0
        assert f"run file: {f}" in out
    assert not list(data.glob("live-*"))  # outside runs the demo writes nothing


def test_demo_runs_and_leaves_a_readable_run_file(workdir: Path) -> None:
    data = workdir / "demo"
    demo = Demo(workdir, "--seconds", "2", "--rate", "5000", "--directory", str(data))
    code, out, err = demo.finish(120)
    assert code == 0, err
    assert "records" in out and "run file:" in out
    m = re.search(r"sent (\d+) datagrams, received (\d+), dropped (\d+)", out)
    assert m is not None, out
    sent, received, dropped = map(int, m.groups())
    assert sent > 0 and sent == received + dropped
    (run_file,) = data.glob("run-demo-*.daqd")
    assert run_file.stat().st_size <= 10_000_000  # the default bound, as the demo says
    assert "each at most 10.0 MB" in out
    check = subprocess.run(
        [DAQD, "dump", str(run_file), "--verify"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    assert "0 gaps" in check.stdout and "end: GOOD" in check.stdout
    dump = subprocess.run(
        [DAQD, "dump", str(run_file), "--limit", "3"], capture_output=True, text=True
    )
    assert dump.returncode == 0
    assert dump.stdout.splitlines()[1].startswith("camera 1 ")


def test_demo_refuses_a_rate_its_bound_cannot_hold(workdir: Path) -> None:
    out = subprocess.run(
        [DAQD, "demo", "--rate", "100000", "--max-run-mb", "10", "--directory", str(workdir / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--rate 100000 writes 32.0 MB a second" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (workdir / "d").exists()


def test_the_printed_commands_are_plain_names_when_path_finds_the_same_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir = Path(DAQD).parent
    monkeypatch.setattr("sys.argv", [DAQD, "demo"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert _command_name("daqctl") == "daqctl"  # an activated venv
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert _command_name("daqctl") == str(bin_dir / "daqctl")  # elsewhere: the full path
    monkeypatch.chdir(bin_dir.parent.parent)
    assert _command_name("daqctl") == f"{bin_dir.parent.name}/bin/daqctl"  # .venv/bin/daqctl


def test_a_run_file_that_cannot_be_created_is_one_line(workdir: Path) -> None:
    """The directory is a tmpfs of one inode (its own), in a private mount namespace: the demo
    starts, then its run file cannot be created (ENOSPC), and it says so in one line."""
    full = workdir / "full"
    full.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "nr_inodes=1", "none", str(full)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}")
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime)}
    script = (
        'mount -t tmpfs -o nr_inodes=1 none "$1" && exec "$2" demo --seconds 1 --directory "$1"'
    )
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(full), DAQD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("daqd: run demo-") and "cannot create a run file" in last, last
    assert "ENOSPC" in last
