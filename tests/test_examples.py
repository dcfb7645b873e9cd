"""Every shipped example configuration passes `daqd check` as a user would run it."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from .conftest import DAQD, Daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").rglob("*.toml"))
MakeDaemon = Callable[..., Daemon]


def test_there_are_examples_for_each_seed_system() -> None:
    types = " ".join(p.read_text() for p in EXAMPLES)
    for t in ("slowsignal", "cdtp", "dcss", "http_poll", "packetstream"):
        assert f'type = "{t}"' in types


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path: Path) -> None:
    out = subprocess.run([DAQD, "check", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: OK")


# Examples a newcomer runs as they are need free ports and a local directory; these are templates
# of a real site's deployment (addresses, fixed ports, /var/lib/daqd), to edit before use.
DEPLOYMENT_TEMPLATES = {"all-in-one.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_to_run_as_they_are_write_under_the_current_directory(path: Path) -> None:
    if path.name in DEPLOYMENT_TEMPLATES:
        assert "A deployment template" in path.read_text()
        return
    directories = re.findall(r'^directory = "([^"]*)"', path.read_text(), re.MULTILINE)
    assert all(not d.startswith("/") for d in directories), directories


def test_udp_to_zmq_runs_as_the_readme_says(daemon: MakeDaemon, workdir: Path) -> None:
    """The README's first hour with examples/udp-to-zmq.toml: serve it unchanged, find its ports
    with daqctl status, send datagrams in a run, get them on the PUB and in the run file."""
    text = (ROOT / "examples" / "udp-to-zmq.toml").read_text()
    d = daemon(text, name="udp-to-zmq")
    status = d.ctl("status")
    assert status.returncode == 0, status.stdout + status.stderr
    listen = re.search(r"listen=127\.0\.0\.1:(\d+)", status.stdout)
    endpoint = re.search(r"endpoint=(tcp://127\.0\.0\.1:\d+)", status.stdout)
    assert listen is not None and endpoint is not None, status.stdout
    port = int(listen.group(1))
    assert port != 0

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 30_000)
    sub.connect(endpoint.group(1))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        start = d.ctl("start", "first-run")
        assert start.returncode == 0, start.stdout + start.stderr
        # a SUB socket gets nothing sent before it joined: send until one arrives, then ten more
        got: list[list[bytes]] = []

        def one_arrives() -> bool:
            sock.sendto(b"hello", ("127.0.0.1", port))
            try:
                got.append(sub.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return False
            return True

        wait_until(one_arrives, 30, "a record on the live PUB")
        for i in range(10):
            sock.sendto(f"datagram {i}".encode(), ("127.0.0.1", port))
        while got[-1][-1] != b"datagram 9":  # after the hellos still on their way
            got.append(sub.recv_multipart())
        payloads = [m[-1] for m in got if m[-1] != b"hello"]
        assert payloads == [f"datagram {i}".encode() for i in range(10)]
        assert got[-1][0] == b"in"  # the PUB's topic: the receiver's name
        stop = d.ctl("stop")
        assert stop.returncode == 0, stop.stdout + stop.stderr
    finally:
        sock.close()
        sub.close(linger=0)
        ctx.term()
    run_file = workdir / "daqd-data" / "udp-to-zmq" / "run-first-run.daqd"
    dump = subprocess.run(
        [DAQD, "dump", str(run_file), "--payload"], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.rstrip().splitlines()[-2].endswith(b"datagram 9".hex())  # then the end
    check = subprocess.run(
        [DAQD, "dump", str(run_file), "--verify"], capture_output=True, text=True
    )
    assert check.returncode == 0 and "end: GOOD" in check.stdout, check.stdout
