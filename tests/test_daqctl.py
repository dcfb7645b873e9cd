"""`daqctl` against a real `daqd serve` subprocess: every command, concurrency, garbage, signals."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from daqd.ctl import parse_command_args, render_status
from daqd.protocols import iccp
from daqd.runfile import verify
from tests.conftest import DAQCTL, Daemon, wait_until

CONFIG = """
[daemon]
name = "{name}"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[receiver]]
type = "slowsignal"
name = "ss"
listen = "127.0.0.1:0"

[[publisher]]
type = "file"
name = "disk"
directory = "{data}"
"""

MakeDaemon = Callable[..., Daemon]


def config(workdir: Path, name: str = "t", extra: str = "") -> str:
    return CONFIG.format(name=name, data=workdir / "data") + extra


def udp_address(d: Daemon, receiver: str = "raw") -> tuple[str, int]:
    host, port = d.status()["receivers"][receiver]["addresses"]["listen"].rsplit(":", 1)
    return host, int(port)


def send(address: tuple[str, int], payloads: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in payloads:
            s.sendto(p, address)


def records(d: Daemon, name: str = "raw") -> int:
    n: int = d.status()["receivers"][name]["records"]
    return n


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_no_daemon_is_one_line_and_non_zero(workdir: Path) -> None:
    env = {**os.environ, "RUNTIME_DIRECTORY": str(workdir)}
    env.pop("DAQD_NAME", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DAQCTL, *args], env=env, capture_output=True, text=True, timeout=30)

    assert refused(run("status")).startswith("daqctl: no daqd running: no control socket in ")
    assert "no daemon 'absent' running" in refused(run("--name", "absent", "status"))
    line = refused(run("--socket", str(workdir / "x.ctl"), "stop"))
    assert line == f"daqctl: no daemon running: control socket {workdir / 'x.ctl'} does not exist"
    (workdir / "a.ctl").touch()
    (workdir / "b.ctl").touch()
    assert "several daemons running (a, b): choose one with --name" in refused(run("status"))


def test_status_start_stop_and_refused_transitions(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    table = ok(d.ctl("status"))
    assert re.search(r"^daqd t \(pid \d+\): ORBIT for \d+s, up \d+s$", table, re.M)
    assert re.search(
        r"^raw\s+udp\s+running\s+0\s+0\.0\s+0 B\s+0\s+0\s+listen=127\.0\.0\.1:\d+", table, re.M
    )
    assert re.search(r"^disk\s+file\s+queue 0/10000\s+0", table, re.M)

    line = refused(d.ctl("stop"))
    assert (
        line
        == "daqctl: cannot stop in state ORBIT; allowed here: land, start, reconfigure, interrupt"
    )

    assert ok(d.ctl("start", "run7")) == "run run7 started; state RUN\n"
    assert "cannot start in state RUN" in refused(d.ctl("start"))
    address = udp_address(d)
    send(address, [b"p%03d" % i for i in range(20)])
    wait_until(lambda: records(d) == 20, what="20 datagrams counted")
    status = json.loads(ok(d.ctl("status", "--json")))
    assert status["state"] == "RUN" and status["run"]["run_id"] == "run7"
    assert status["receivers"]["raw"]["records"] == 20
    assert "run run7: running" in ok(d.ctl("status"))

    assert ok(d.ctl("stop")) == "run run7 ended: GOOD, 20 records; state ORBIT\n"
    wait_until(lambda: (workdir / "data" / "run-run7.daqd").exists(), what="the run file")
    summary = wait_until(
        lambda: (s := verify(workdir / "data" / "run-run7.daqd")).end is not None and s,
        what="the run file's end marker",
    )
    assert summary.records == {"raw": 20} and summary.end["condition"] == "GOOD"
    assert "last run run7: GOOD, 20 records" in ok(d.ctl("status"))

    # A run id by default is a timestamp.
    assert re.fullmatch(r"run \d{8}T\d{6} started; state RUN\n", ok(d.ctl("start")))
    assert "ended: GOOD, 0 records" in ok(d.ctl("stop"))
    assert ok(d.ctl("transition", "land")) == "state INIT\n"
    assert "unknown transition 'fly'" in refused(d.ctl("transition", "fly"))
    assert ok(d.ctl("transition", "launch")) == "state ORBIT\n"
    # reconfigure is no bare transition (it needs a file): refused, and the state stays ORBIT
    assert "daqctl reconfigure FILE" in refused(d.ctl("transition", "reconfigure"))
    assert d.status()["state"] == "ORBIT"
    assert ok(d.ctl("transition", "land")) == "state INIT\n"


def test_cmd_calls_receiver_commands_and_names_the_known_ones(
    daemon: MakeDaemon, workdir: Path
) -> None:
    d = daemon(config(workdir))
    assert json.loads(ok(d.ctl("cmd", "ss", "pause"))) == {"paused": True}
    stats = json.loads(ok(d.ctl("cmd", "ss", "stats")))
    assert stats["paused"] is True and stats["readouts_complete"] == 0
    assert json.loads(ok(d.ctl("cmd", "ss", "resume"))) == {"paused": False}
    line = refused(d.ctl("cmd", "ss", "explode"))
    assert line == (
        "daqctl: receiver 'ss' has no command 'explode'; "
        "known: pause, reset_readout_count, resume, stats"
    )
    assert (
        refused(d.ctl("cmd", "nope", "x")) == "daqctl: no receiver named 'nope'; receivers: raw, ss"
    )
    assert "takes 1 positional argument but 2 were given" in refused(
        d.ctl("cmd", "ss", "stats", "1")
    )


def test_parse_command_args() -> None:
    words = ("1", "2.5", "name=x", "flag=true", "[1,2]", "plain text", "=odd")
    assert parse_command_args(words) == (
        [1, 2.5, [1, 2], "plain text", "=odd"],
        {"name": "x", "flag": True},
    )


def test_tap_prints_live_records_and_raw_payloads(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    address = udp_address(d)

    def tap_while_sending(*args: str) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.Popen(
            [DAQCTL, "--name", "t", "tap", *args],
            env=d.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        n = 0
        deadline = time.monotonic() + 30
        # The tap only sees records sent after its subscription arrives: keep sending until done.
        while proc.poll() is None:
            send(address, [b"pkt%06d" % n])
            n += 1
            try:
                proc.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the tap printed nothing for {n} datagrams")
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    result = tap_while_sending("raw", "--count", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d\.\d{6} raw #\d+ 9 B in 1 block\(s\) "
            r'\{"peer":"127\.0\.0\.1:\d+"\}  70 6b 74( 3\d){6}',
            line,
        ), line
    seqs = [int(re.search(r"#(\d+)", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert seqs == list(range(seqs[0], seqs[0] + 3))

    raw = tap_while_sending("raw", "--count", "2", "--raw")
    assert raw.returncode == 0, raw.stderr
    assert re.fullmatch(rb"pkt\d{6}pkt\d{6}", raw.stdout), raw.stdout

    # a publisher's tap shows what it sent, records of every source routed to it
    published = tap_while_sending("disk", "--count", "2")
    assert published.returncode == 0, published.stderr
    assert re.findall(rb" raw #\d+ 9 B", published.stdout) and published.stdout.count(b"\n") == 2

    assert (
        refused(d.ctl("tap", "nobody"))
        == "daqctl: nothing named 'nobody' to tap; known: disk, raw, ss"
    )


def test_watch_refreshes(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    out = ok(d.ctl("watch", "--count", "3", "--interval", "0.05"))
    assert len(re.findall(r"^daqd t \(pid \d+\): ORBIT", out, re.M)) == 3
    assert out.count("Ctrl-C to quit") == 3


def test_reconfigure_keeps_untouched_udp_receiver_without_losing_data(
    daemon: MakeDaemon, workdir: Path
) -> None:
    d = daemon(config(workdir))
    address = udp_address(d)
    ok(d.ctl("start", "rc1"))
    send(address, [b"a%04d" % i for i in range(500)])

    new = workdir / "new.toml"
    new.write_text(
        config(workdir)
        + '\n[[receiver]]\ntype = "udp"\nname = "extra"\nlisten = "127.0.0.1:0"\n'
        + 'publish_to = ["disk"]\n'
    )
    sender = threading.Thread(target=send, args=(address, [b"b%04d" % i for i in range(500)]))
    sender.start()
    assert ok(d.ctl("reconfigure", str(new))) == "changed: receiver extra\n"
    sender.join()
    send(address, [b"c%04d" % i for i in range(500)])
    wait_until(lambda: records(d) == 1500, what="all 1500 datagrams counted")
    status = d.status()
    assert status["receivers"]["raw"]["addresses"]["listen"] == f"{address[0]}:{address[1]}"
    assert status["receivers"]["raw"]["drops"].get("kernel", 0) == 0
    assert "extra" in status["receivers"]
    assert "ended: GOOD, 1500 records" in ok(d.ctl("stop"))
    summary = wait_until(
        lambda: (s := verify(workdir / "data" / "run-rc1.daqd")).end is not None and s,
        what="the run file's end marker",
    )
    assert summary.records == {"raw": 1500} and not summary.gaps

    bad = workdir / "bad.toml"
    bad.write_text(config(workdir).replace('listen = "127.0.0.1:0"', "listen = 5", 1))
    line = refused(d.ctl("reconfigure", str(bad)))
    assert str(bad) in line and "listen" in line
    assert sorted(d.status()["receivers"]) == ["extra", "raw", "ss"]
    assert "cannot read" in refused(d.ctl("reconfigure", str(workdir / "missing.toml")))
    assert ok(d.ctl("reconfigure", str(new))) == "nothing changed\n"


def test_two_clients_at_once(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    procs = [
        subprocess.Popen(
            [DAQCTL, "--name", "t", *args], env=d.env, stdout=subprocess.PIPE, text=True
        )
        for args in (["status", "--json"], ["cmd", "ss", "stats"]) * 3
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for i, out in enumerate(outs):
        value = json.loads(out)
        assert ("state" in value) if i % 2 == 0 else ("paused" in value)


def test_garbage_on_the_control_socket_is_answered_and_survived(
    daemon: MakeDaemon, workdir: Path
) -> None:
    d = daemon(config(workdir))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    try:
        for frames in (
            [b"\xff"],
            [b"\x00\x02", b"STAT", b"\xc1"],
            [b"\x00\x02", b"NOPE", msgpack.packb({})],
            [b"\x00\x02", b"CONF", msgpack.packb({"config": 1})],
        ):
            sock.send_multipart(frames)
            assert sock.poll(10_000), f"no reply to {frames!r}"
            reply = iccp.decode(sock.recv_multipart())
            assert isinstance(reply, iccp.Error), reply
    finally:
        sock.close()
        ctx.term()
    status = d.status()
    assert status["state"] == "ORBIT"
    control = status["control"]
    assert (control["bad_messages"], control["unknown_codes"], control["refused"]) == (2, 1, 1)
    table = ok(d.ctl("status"))
    assert table.startswith("daqd t ")
    assert re.search(
        r"^control socket: \d+ requests; 1 refused, 2 malformed, 1 unknown code$", table, re.M
    )


def test_shutdown_drains_and_exits_zero(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    ok(d.ctl("start", "sd1"))
    send(udp_address(d), [b"x%03d" % i for i in range(50)])
    wait_until(lambda: records(d) == 50, what="50 datagrams counted")
    out = ok(d.ctl("shutdown"))
    assert out == "finished: OK (last run sd1: INTERRUPTED)\n"
    assert d.proc is not None and d.proc.wait(30) == 0
    assert not (d.runtime / "t.ctl").exists()
    summary = verify(workdir / "data" / "run-sd1.daqd")
    assert summary.records == {"raw": 50} and summary.end is not None
    assert summary.end["condition"] == "INTERRUPTED"
    assert "no daemon 't' running" in refused(d.ctl("status"))


def test_sigterm_mid_run_ends_the_run_file_with_its_condition(
    daemon: MakeDaemon, workdir: Path
) -> None:
    d = daemon(config(workdir))
    ok(d.ctl("start", "term1"))
    send(udp_address(d), [b"y%03d" % i for i in range(30)])
    wait_until(lambda: records(d) == 30, what="30 datagrams counted")
    assert d.stop() == 0
    summary = verify(workdir / "data" / "run-term1.daqd")
    assert summary.problems == []
    assert summary.records == {"raw": 30}
    assert summary.end is not None and summary.end["condition"] == "INTERRUPTED"
    assert summary.end["records"] == {"raw": 30}


def test_sighup_reloads_the_same_file(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    d.config_path.write_text(
        config(workdir) + '\n[[receiver]]\ntype = "udp"\nname = "late"\nlisten = "127.0.0.1:0"\n'
    )
    d.signal(signal.SIGHUP)
    wait_until(lambda: "late" in d.status()["receivers"], what="the reloaded receiver")


def test_socket_option_takes_a_path(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir, name="other"), name="other")
    result = subprocess.run(
        [DAQCTL, "--socket", str(d.runtime / "other.ctl"), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(ok(result))["name"] == "other"
    # With one daemon running, no --name is needed.
    result = subprocess.run(
        [DAQCTL, "status"], env=d.env, capture_output=True, text=True, timeout=30
    )
    assert ok(result).startswith("daqd other ")


def test_render_status_shows_drops_errors_and_last_error() -> None:
    st: dict[str, Any] = {
        "name": "x",
        "pid": 1,
        "state": "RUN",
        "uptime_s": 3725,
        "run": {"run_id": "r", "time_start": 0},
        "receivers": {
            "u": {
                "type": "udp",
                "state": "failed",
                "records": 1234567,
                "rate_hz": 1500.25,
                "bytes": 2_500_000,
                "drops": {"kernel": 3, "queue": 0},
                "errors": {"decode": 2},
                "addresses": {"listen": "0.0.0.0:1"},
                "last_error": "boom",
            }
        },
    }
    text = render_status(st)
    assert "daqd x (pid 1): RUN, up 1h 2m 5s" in text
    assert re.search(
        r"^u\s+udp\s+failed\s+1,234,567\s+1,500\.2\s+2\.5 MB\s+3 \(kernel=3\)\s+2 \(decode=2\)"
        r"\s+listen=0\.0\.0\.0:1$",
        text,
        re.M,
    )
    assert "u: last error: boom" in text


@pytest.mark.parametrize("code", [0])
def test_daqctl_does_not_import_heavy_modules(code: int) -> None:
    probe = (
        "import sys, daqd.ctl; heavy = {'pydantic', 'numpy', 'daqd.host', 'daqd.config', "
        "'asyncio'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run(
        [str(Path(DAQCTL).parent / "python"), "-c", probe],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == code and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_runtime_dir_setting_places_the_sockets(daemon: MakeDaemon, workdir: Path) -> None:
    alt = workdir / "alt"
    d = daemon(
        config(workdir).replace(
            "drain_timeout_s = 5", f'drain_timeout_s = 5\nruntime_dir = "{alt}"'
        ),
        start=False,
    )
    d.endpoint = f"ipc://{alt}/t.ctl"
    d.start()
    assert sorted(p.name for p in alt.iterdir()) == ["t.ctl", "t.tap"]
    assert oct((alt / "t.ctl").stat().st_mode & 0o777) == oct(0o600)
    result = subprocess.run(
        [DAQCTL, "--socket", str(alt / "t.ctl"), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(ok(result))["state"] == "ORBIT"


def test_tcp_control_with_curve_keys(daemon: MakeDaemon, workdir: Path) -> None:
    import zmq.auth

    keys, clients = workdir / "keys", workdir / "clients"
    keys.mkdir()
    clients.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    os.replace(client_public, clients / "client.key")
    with socket.socket() as s:  # a free port for the daemon to bind
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = (
        f'control_tcp = "tcp://127.0.0.1:{port}"\n'
        f'curve_server_key_file = "{server_secret}"\n'
        f'curve_authorized_keys_dir = "{clients}"\n'
    )
    d = daemon(config(workdir).replace("drain_timeout_s = 5\n", "drain_timeout_s = 5\n" + extra))
    tcp = ["--socket", f"tcp://127.0.0.1:{port}"]
    keys_args = ["--server-key", str(server_public), "--client-key", str(client_secret)]
    run = [DAQCTL, *tcp, *keys_args, "status", "--json"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert json.loads(ok(result))["state"] == "ORBIT"
    result = subprocess.run([DAQCTL, *tcp, "status"], capture_output=True, text=True, timeout=30)
    assert "needs CURVE" in refused(result)
    assert d.status()["state"] == "ORBIT"


def test_tcp_control_without_keys_refuses_to_start(workdir: Path) -> None:
    path = workdir / "nokeys.toml"
    path.write_text(
        config(workdir).replace(
            "drain_timeout_s = 5\n", 'drain_timeout_s = 5\ncontrol_tcp = "tcp://127.0.0.1:0"\n'
        )
    )
    env = {**os.environ, "RUNTIME_DIRECTORY": str(workdir)}
    result = subprocess.run(
        [str(Path(DAQCTL).parent / "daqd"), "serve", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "needs CURVE keys" in result.stderr and "Traceback" not in result.stderr


def test_tap_ends_when_the_daemon_goes_away(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    address = udp_address(d)
    tap = subprocess.Popen(
        [DAQCTL, "--name", "t", "tap", "raw"],
        env=d.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tap.stdout is not None
        deadline = time.monotonic() + 30
        # Send until the tap shows a record: then it is surely connected.
        while not select.select([tap.stdout], [], [], 0.05)[0]:
            send(address, [b"ping"])
            assert time.monotonic() < deadline, "the tap printed nothing"
        assert " raw #" in tap.stdout.readline()
        assert d.stop() == 0
        _, err = tap.communicate(timeout=30)
    finally:
        if tap.poll() is None:
            tap.kill()
    assert tap.returncode == 1 and err.strip() == "daqctl: the daemon has gone away"


def refused_port(address: tuple[str, int]) -> bool:
    """True if nothing listens on UDP `address`: the kernel answers a datagram with port
    unreachable, which a connected socket reports as ConnectionRefusedError (a positive sign,
    not the absence of one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.connect(address)
        s.send(b"anyone?")
        try:
            s.recv(1)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            return False
        return False


def test_transitions_stop_and_resume_receiving(daemon: MakeDaemon, workdir: Path) -> None:
    """interrupt ends the run INTERRUPTED and closes every socket (SAFE); recover and initialize
    lead to INIT with the sockets still closed; launch opens them again and records flow; land
    closes them again. Each checked by what a sender sees."""
    d = daemon(config(workdir))
    ok(d.ctl("start", "i1"))
    before = udp_address(d)
    send(before, [b"a%d" % i for i in range(5)])
    wait_until(lambda: records(d) == 5, what="5 datagrams counted")

    assert ok(d.ctl("transition", "interrupt")) == "state SAFE\n"
    status = d.status()
    assert status["state"] == "SAFE" and status["run"] is None
    assert status["last_run"]["condition"] == "INTERRUPTED"
    assert {r["state"] for r in status["receivers"].values()} == {"stopped"}
    assert refused_port(before)
    summary = verify(workdir / "data" / "run-i1.daqd")
    assert summary.records == {"raw": 5}
    assert summary.end is not None and summary.end["condition"] == "INTERRUPTED"
    assert refused(d.ctl("start")) == (
        "daqctl: cannot start in state SAFE; allowed here: initialize, recover"
    )

    assert ok(d.ctl("transition", "recover")) == "state INIT\n"
    assert ok(d.ctl("transition", "initialize")) == "state INIT\n"
    assert d.status()["receivers"]["raw"]["state"] == "stopped"
    assert refused_port(before)

    assert ok(d.ctl("transition", "launch")) == "state ORBIT\n"
    assert d.status()["receivers"]["raw"]["state"] == "running"
    send(udp_address(d), [b"b%d" % i for i in range(3)])
    wait_until(lambda: records(d) == 8, what="3 more datagrams after launch")

    assert ok(d.ctl("transition", "land")) == "state INIT\n"
    assert refused_port(udp_address(d))
    assert d.status()["receivers"]["raw"]["state"] == "stopped"
    assert ok(d.ctl("transition", "launch")) == "state ORBIT\n"
    send(udp_address(d), [b"c"])
    wait_until(lambda: records(d) == 9, what="a datagram after the second launch")


def test_a_launch_that_cannot_bind_goes_to_error_and_reset_recovers(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """After land, another program takes a receiver's fixed port: launch fails with one line
    naming the port, the daemon is in ERROR (not stuck half-way), reset leads to INIT, and once
    the port is free, launch serves it again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fixed = (
        f'\n[[receiver]]\ntype = "tcp"\nname = "fixed"\nlisten = "127.0.0.1:{port}"\n'
        'framing = "line"\n'
    )
    d = daemon(config(workdir, extra=fixed))
    assert ok(d.ctl("transition", "land")) == "state INIT\n"
    squatter = socket.create_server(("127.0.0.1", port))
    try:
        line = refused(d.ctl("transition", "launch"))
        assert line.startswith("daqctl: launch failed: receiver fixed: "), line
        assert f"'127.0.0.1', {port}" in line and "address already in use" in line, line
        assert line.endswith("; state ERROR (reset, then launch again)"), line
        assert d.status()["state"] == "ERROR"
        assert "cannot start in state ERROR; allowed here: initialize, reset" in refused(
            d.ctl("start")
        )
        assert ok(d.ctl("transition", "reset")) == "state INIT\n"
    finally:
        squatter.close()
    assert ok(d.ctl("transition", "launch")) == "state ORBIT\n"
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"served again\n")
    wait_until(lambda: records(d, "fixed") == 1, what="a line on the fixed port")


def test_daqd_name_timeout_and_keyword_arguments(daemon: MakeDaemon, workdir: Path) -> None:
    """DAQD_NAME picks the daemon when several run; --timeout bounds the wait for a reply (a
    stopped daemon); `cmd NAME key=value` passes a keyword argument (the command names it)."""
    first = daemon(config(workdir))
    other = daemon(config(workdir, name="u"), name="u")

    base = {k: v for k, v in first.env.items() if k != "DAQD_NAME"}

    def daqctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DAQCTL, *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert "several daemons running (t, u)" in refused(daqctl("status"))
    assert ok(daqctl("status", DAQD_NAME="u")).startswith("daqd u ")
    assert ok(daqctl("status", DAQD_NAME="t")).startswith("daqd t ")
    assert ok(daqctl("--name", "t", "status", DAQD_NAME="u")).startswith("daqd t ")

    other.signal(signal.SIGSTOP)
    try:
        line = refused(daqctl("--timeout", "0.3", "status", DAQD_NAME="u"))
    finally:
        other.signal(signal.SIGCONT)
    assert line == f"daqctl: no reply from ipc://{other.runtime}/u.ctl within 0.3 s"
    assert ok(daqctl("status", DAQD_NAME="u")).startswith("daqd u ")

    line = refused(first.ctl("cmd", "ss", "stats", "verbose=true"))
    assert "unexpected keyword argument 'verbose'" in line, line
    line = refused(first.ctl("cmd", "ss", "stats", "verbose"))  # no '=': a positional one
    assert "takes 1 positional argument but 2 were given" in line, line


def test_stop_of_a_run_that_is_not_good_prints_the_counts_behind_it(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """A queue of one that a burst overflows: `daqctl stop` prints the condition, then the
    publisher's offered/delivered/dropped exactly as the run's accounting has them, then why."""
    d = daemon(
        config(workdir).replace('directory = "', 'queue_size = 1\npolicy = "drop"\ndirectory = "')
    )
    ok(d.ctl("start", "lossy"))
    address = udp_address(d)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:

        def burst() -> bool:
            nonlocal sent
            for i in range(2000):
                s.sendto(b"%d" % i, address)
            sent += 2000
            return bool(d.status()["publishers"]["disk"]["drops"].get("queue_full"))

        wait_until(burst, 60, "queue_full drops from a burst")

    def arrived() -> bool:
        raw = d.status()["receivers"]["raw"]
        return bool(raw["records"] + raw["drops"].get("kernel", 0) == sent)

    wait_until(arrived, what="every datagram received or counted by the kernel")
    lines = ok(d.ctl("stop")).splitlines()
    last = d.status()["last_run"]
    disk = last["accounting"]["publishers"]["disk"]
    total = sum(last["records"].values())
    assert last["condition"] == "INCOMPLETE"
    assert lines == [
        f"run lossy ended: INCOMPLETE, {total} records; state ORBIT",
        f"  publisher disk: offered {disk['offered']}, delivered {disk['delivered']}, "
        f"dropped {disk['drops']['queue_full']} queue_full",
        *[f"  why: {reason}" for reason in last["reasons"]],
    ]
    # (a kernel drop of the burst, on a loaded machine, would add its own reason line)
    assert (
        [r for r in last["reasons"] if r.startswith("publisher disk:")]
        == [r for r in last["reasons"] if "queue_full" in r]
        != []
    )
    assert disk["offered"] == total == disk["delivered"] + disk["drops"]["queue_full"]
