"""What a newcomer and an operator meet first, through the real commands: `daqd check`/`serve`
errors, log levels, journald priorities, a second daemon of the same name, a busy address,
SIGHUP after `daqctl reconfigure`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DAQCTL, DAQD, Daemon, wait_until

BASE = """
[daemon]
name = "{name}"
log_level = "info"

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:{port}"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
"""

BAD = """# a newcomer's first try
[daemon]
name = "nc"
drain_timout_s = 3

[[receiver]]
type = "udp"
name = "raw"
lisen = "127.0.0.1:0"
publish_to = ["dsk"]
rcvbuf_bytes = "big"

[[receiver]]
type = "udpp"
name = "b"

[[publisher]]
type = "file"
name = "disk"
directory = "d"
queue_size = -1

[extra]
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAQD, *args], capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )


def test_check_and_serve_report_every_error_with_its_line(workdir: Path) -> None:
    path = workdir / "bad.toml"
    path.write_text(BAD)
    lines = {
        4: '[daemon]: key "drain_timout_s": unknown key; did you mean "drain_timeout_s"?',
        6: '[[receiver]] #1 (name "raw"): key "listen": required key is missing',
        9: '[[receiver]] #1 (name "raw"): key "lisen": unknown key; did you mean "listen"?',
        10: '[[receiver]] #1 (name "raw"): key "publish_to": no publisher named \'dsk\' '
        '(publishers: disk); did you mean "disk"?',
        11: '[[receiver]] #1 (name "raw"): key "rcvbuf_bytes": must be an integer (got \'big\')',
        14: '[[receiver]] #2 (name "b"): key "type": unknown receiver type \'udpp\'',
        21: '[[publisher]] #1 (name "disk"): key "queue_size": must be at least 1 (got -1)',
        23: "unknown table 'extra'",
    }
    for command in ("check", "serve"):
        r = run(command, str(path))
        assert r.returncode == 2, r.stderr
        out = r.stderr.splitlines()
        assert out[0] == f"daqd: {path}: {len(lines)} errors", r.stderr
        assert "Traceback" not in r.stderr and "Value error" not in r.stderr
        assert "(table)" not in r.stderr and "Input should" not in r.stderr
        assert len(out) == len(lines) + 1, r.stderr
        for got, (number, words) in zip(out[1:], sorted(lines.items()), strict=True):
            assert got.startswith(f"{path}: "), got
            assert words in got and got.endswith(f"(line {number})"), (got, words)


def test_log_level_is_one_case_insensitive_choice(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    path = workdir / "ok.toml"
    path.write_text(BASE.format(name="ll", port=0))
    r = run("serve", str(path), "--log-level", "verbose")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'verbose' is not one of 'debug', 'info', 'warning', 'error'" in r.stderr
    bad = workdir / "bad.toml"
    bad.write_text(BASE.format(name="ll", port=0).replace('"info"', '"loud"'))
    r = run("check", str(bad))
    assert r.returncode == 2
    assert (
        "key \"log_level\": must be one of DEBUG, INFO, WARNING, ERROR (in any case) (got 'loud')"
        in r.stderr
    )
    # the config's lower-case "info" is accepted; --log-level warning (lower case) wins over it
    d = daemon(BASE.format(name="ll", port=0), name="ll")
    assert d.stop() == 0
    assert " INFO " in d.log()
    proc = subprocess.Popen(
        [DAQD, "serve", str(d.config_path), "--log-level", "warning"],
        env=d.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: d.ctl("status").returncode == 0, 30, "the daemon to answer")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and " INFO " not in err, err


def test_journal_lines_carry_their_priority(daemon: Callable[..., Daemon], workdir: Path) -> None:
    d = daemon(BASE.format(name="jp", port=0), name="jp", start=False)
    d.log_path.write_bytes(b"")  # systemd names the stream by device and inode
    st = os.stat(d.log_path)
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d.start()
    d.config_path.write_text(BASE.format(name="jp", port=0) + "[[receiver]]\ntype = 'udp'\n")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the running configuration" in d.log(), 30, "the refusal")
    assert d.stop() == 0
    lines = [ln for ln in d.log().splitlines() if ln]
    assert all(ln[:3] in ("<3>", "<4>", "<6>", "<7>") for ln in lines), lines
    assert any(ln.startswith("<6>daqd.daemon: daemon jp ready") for ln in lines), lines
    refusal = [ln for ln in lines if "keeping the running configuration" in ln]
    assert refusal and refusal[0].startswith("<3>"), refusal
    # a stream that is not the journal's (stderr redirected) gets no prefixes
    d2 = daemon(BASE.format(name="jq", port=0), name="jq", start=False)
    d2.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    d2.start()
    assert d2.stop() == 0
    assert d2.log().startswith("daqd.") and "<6>" not in d2.log()


def test_a_second_daemon_of_the_same_name_starts_nothing(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    first = daemon(BASE.format(name="twice", port=0), name="twice")
    r = subprocess.run(
        [DAQD, "serve", str(first.config_path)],
        env=first.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("daqd: a daemon named 'twice' already answers on "), r.stderr
    assert "nothing was started" in r.stderr
    assert "started" not in r.stderr.replace("nothing was started", ""), r.stderr
    assert "ORBIT" not in r.stderr
    assert first.status()["state"] == "ORBIT"  # the first one is untouched
    assert first.stop() == 0


def test_a_busy_address_names_itself_and_its_holder(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        busy = socket.socket(socket.AF_INET, kind)
        busy.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            busy.listen()
        port = busy.getsockname()[1]
        text = BASE.format(name="busy", port=port)
        transport = "udp"
        if kind == socket.SOCK_STREAM:
            text = text.replace('type = "udp"', 'type = "tcp"')
            transport = "tcp"
        path = workdir / "busy.toml"
        path.write_text(text)
        env = {**os.environ, "RUNTIME_DIRECTORY": str(workdir)}
        try:
            r = run("serve", str(path), env=env)
        finally:
            busy.close()
        assert r.returncode == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"daqd: receiver 'raw' cannot start: cannot bind 127.0.0.1:{port} ({transport}): "
            "address already in use; held by "
            f"pid {os.getpid()} ("
        ), last
        assert "pytest" in last or "python" in last, last


def test_sighup_rereads_the_serve_file_not_the_last_reconfigure(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    d = daemon(BASE.format(name="hup", port=0), name="hup")
    other = workdir / "other.toml"
    other.write_text(
        BASE.format(name="hup", port=0)
        + '[[receiver]]\ntype = "udp"\nname = "sent"\nlisten = "127.0.0.1:0"\n'
    )
    r = d.ctl("reconfigure", str(other))
    assert r.returncode == 0 and "sent" in r.stdout, r.stderr
    assert set(d.status()["receivers"]) == {"raw", "sent"}
    # the unit's file gets a new receiver; SIGHUP (systemctl reload) applies that file
    d.config_path.write_text(
        BASE.format(name="hup", port=0)
        + '[[receiver]]\ntype = "udp"\nname = "unit"\nlisten = "127.0.0.1:0"\n'
    )
    d.signal(signal.SIGHUP)
    wait_until(lambda: "unit" in d.status()["receivers"], 30, "the serve file's receiver")
    assert set(d.status()["receivers"]) == {"raw", "unit"}
    assert f"SIGHUP: reloaded {d.config_path}" in d.log()
    assert d.stop() == 0


def complete(env: dict[str, str], words: str) -> list[str]:
    """What bash completion offers after `words` (click's protocol: `type,value` lines)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    r = subprocess.run(
        [DAQCTL],
        env={
            **env,
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            "_DAQCTL_COMPLETE": "bash_complete",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [line.split(",", 1)[1] for line in r.stdout.splitlines()]


def test_daqctl_version_exit_codes_and_completion(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    r = subprocess.run([DAQCTL, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("daqctl, version "), r.stdout
    d = daemon(BASE.format(name="ex", port=0), name="ex")
    r = d.ctl("status")
    assert r.returncode == 0 and "ORBIT" in r.stdout
    assert d.ctl("--name", "nosuch", "status").returncode == 3
    # completion: subcommands, daemon names, receiver names (asked of the daemon)
    assert {"start", "status", "stop"} <= set(complete(d.env, "daqctl st"))
    assert complete(d.env, "daqctl --name ") == ["ex"]
    assert complete(d.env, "daqctl --name ex cmd ") == ["raw"]
    assert complete(d.env, "daqctl --name ex tap ") == ["raw", "live"]
    # SAFE: running but not well
    assert d.ctl("transition", "interrupt").returncode == 0
    r = d.ctl("status")
    assert r.returncode == 150 and "SAFE" in r.stdout, r
    assert d.ctl("transition", "recover").returncode == 0
    assert d.ctl("transition", "launch").returncode == 0
    assert d.ctl("status").returncode == 0
    assert d.stop() == 0
    r = d.ctl("status")  # the socket is gone: not running
    assert r.returncode == 3 and "no daemon 'ex' running" in r.stderr, r


def test_status_exit_code_for_a_failed_or_restarting_receiver() -> None:
    from daqd.ctl import status_exit_code

    well = {"state": "RUN", "receivers": {"a": {"state": "running"}, "b": {"state": "stopped"}}}
    assert status_exit_code(well) == 0
    for bad in ("failed", "restarting"):
        assert status_exit_code({**well, "receivers": {"a": {"state": bad}}}) == 151
    assert status_exit_code({"state": "ERROR", "receivers": {}}) == 150


def test_render_helpers_shared_by_daqctl_and_demo() -> None:
    from daqd import render

    assert [render.size(n) for n in (0, 999, 1000, 1_500_000, 3e15)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.5 MB",
        "3000.0 TB",
    ]
    assert [render.duration(s) for s in (0, 59.9, 185, 7207, 97_200)] == [
        "0s",
        "59s",
        "3m 5s",
        "2h 0m 7s",
        "1d 3h 0m",
    ]
    assert render.table([["NAME", "N"], ["a", "1,000"], ["long", "7"]], right=(1,)) == [
        "NAME      N",
        "a     1,000",
        "long      7",
    ]
    assert render.reasons({"kernel": 3, "full": 0, "x": 2}) == "5 (kernel=3,x=2)"
    assert render.reasons({}) == "0"


def test_errors_show_a_value_once_and_never_a_secret(workdir: Path) -> None:
    path = workdir / "v.toml"
    path.write_text(
        '[[receiver]]\ntype = "udp"\nname = "a"\nlisten = "127.0.0.1"\n'
        '[[receiver]]\ntype = "http_poll"\nname = "cam"\nurl = "http://u:hunter2@h/x"\n'
        'auth = "digest"\n'
    )
    r = run("check", str(path))
    assert r.returncode == 2 and "hunter2" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[1] == (
        f'{path}: [[receiver]] #1 (name "a"): key "listen": expected \'host:port\' with a port '
        "0-65535, got '127.0.0.1' (line 4)"
    )
    assert lines[2] == (
        f'{path}: [[receiver]] #2 (name "cam"): key "credentials_file": auth = "digest" needs '
        "credentials_file, or username and password (line 5)"
    )
    assert lines[3].endswith("not in the URL (got 'http://***@h/x') (line 8)"), lines[3]


def test_daqctl_status_exits_151_for_a_failed_receiver(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    text = BASE.format(name="fl", port=0).replace(
        'publish_to = ["live"]', 'publish_to = ["live"]\nprocess = true'
    )
    d = daemon(text, name="fl")
    assert d.ctl("status").returncode == 0

    def worker() -> int | None:
        raw = d.status()["receivers"]["raw"]
        where = str(raw.get("addresses", {}).get("worker", ""))
        if raw.get("state") != "running" or not where.startswith("pid "):
            return None
        return int(where.split()[1])

    killed: set[int] = set()

    def next_step() -> int | str | None:
        """A new worker's pid to kill, or "failed" once the receiver gave up."""
        if d.status()["receivers"]["raw"]["state"] == "failed":
            return "failed"
        pid = worker()
        return pid if pid not in killed else None

    # every crash restarts the worker (backoff 0.5, 1, 2, 4 s); the fifth in 60 s: failed
    while (step := wait_until(next_step, 60, "a new worker or the failed state")) != "failed":
        assert isinstance(step, int) and len(killed) < 5, (step, killed)
        os.kill(step, signal.SIGKILL)
        killed.add(step)
    r = d.ctl("status")
    assert r.returncode == 151, r
    assert re.search(r"^raw\s+udp\s+failed", r.stdout, re.M), r.stdout
    assert d.stop() == 0
