"""`daqd` as users run it: a subprocess with real sockets, its CLI, its signals and its files."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq

from daqd.runfile import verify

from .conftest import DAQD, Daemon, wait_until

TCP_TO_ZMQ = """
[daemon]
name = "{name}"
drain_timeout_s = 20

[[receiver]]
type = "tcp"
name = "in"
listen = "127.0.0.1:0"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
policy = "{policy}"
queue_size = 10
sndhwm = 10
"""

MESSAGE = b"m" * 65536
TOTAL = 1000  # 64 MiB: far more than every socket buffer on the way can hold


class Sender(threading.Thread):
    """Writes TOTAL length-prefixed messages with blocking sends; counts what the kernel took."""

    def __init__(self, addr: str, total: int = TOTAL) -> None:
        super().__init__(daemon=True)
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.total = total
        self.sent = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for i in range(self.total):
                self.sock.sendall(
                    struct.pack(">I", len(MESSAGE)) + i.to_bytes(4, "big") + MESSAGE[4:]
                )
                self.sent += 1
        except OSError as exc:
            self.error = exc
        finally:
            self.sock.close()


@contextlib.contextmanager
def stalled_sub(endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    """A SUB that reads only when the test says so; closed with its context however the test
    ends (LINGER 0: a context left to the garbage collector would block in term() on the
    subscription it still owes a vanished PUB)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 10)
    sub.setsockopt(zmq.RCVBUF, 65536)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        yield sub
    finally:
        ctx.destroy(linger=0)


def wait_subscribed(d: Daemon, sub: zmq.Socket[bytes]) -> int:
    """Send probe messages until the SUB gets one (PUB drops for unknown subscribers)."""
    addr = d.status()["receivers"]["in"]["addresses"]["listen"]
    host, port = addr.rsplit(":", 1)
    probes = 0
    with socket.create_connection((host, int(port))) as s:
        while not sub.poll(100):
            s.sendall(struct.pack(">I", 5) + b"probe")
            probes += 1
        s.sendall(struct.pack(">I", 3) + b"end")  # TCP keeps order: after it, no more probes
    while sub.recv_multipart()[2] != b"end":
        pass
    return probes + 1


def test_block_policy_slows_a_tcp_sender_and_loses_nothing(daemon: Callable[..., Daemon]) -> None:
    d = daemon(TCP_TO_ZMQ.format(name="blk", policy="block"), name="blk")
    with stalled_sub(d.status()["publishers"]["live"]["addresses"]["endpoint"]) as sub:
        probes = wait_subscribed(d, sub)
        sender = Sender(d.status()["receivers"]["in"]["addresses"]["listen"])
        sender.start()
        # The SUB does not read: the publisher's queue fills, the receiver waits, TCP pushes
        # back. Until every buffer on the way is full (the kernel grows TCP's as data flows) the
        # queue may fill and empty again: wait until nothing has moved for a second.
        last: list[tuple[int, int]] = []

        def stuck() -> bool:  # the same full queue and sender count for 20 polls (> 1 s)
            last.append((d.status()["publishers"]["live"]["queue"], sender.sent))
            del last[:-20]
            return len(last) == 20 and len(set(last)) == 1 and last[0][0] == 10

        wait_until(stuck, 60, "the sender to be held back")
        for _ in range(5):  # the queue stays full and the sender stays stuck, poll after poll
            st = d.status()
            assert st["publishers"]["live"]["queue"] == 10
            assert sender.is_alive() and sender.sent < TOTAL
        got: list[int] = []
        while len(got) < TOTAL:
            assert sub.poll(30_000), f"got {len(got)} of {TOTAL}"
            frames = sub.recv_multipart()
            got.append(int.from_bytes(frames[2][:4], "big"))
        sender.join(60)
        assert sender.error is None and sender.sent == TOTAL
        assert got == list(range(TOTAL))
        st = d.status()
        assert st["receivers"]["in"]["records"] == TOTAL + probes
        assert st["publishers"]["live"]["drops"] == {}
        assert d.stop() == 0


def test_drop_policy_never_slows_the_sender_and_counts_every_drop(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon(TCP_TO_ZMQ.format(name="drp", policy="drop"), name="drp")
    with stalled_sub(d.status()["publishers"]["live"]["addresses"]["endpoint"]) as sub:
        probes = wait_subscribed(d, sub)
        sender = Sender(d.status()["receivers"]["in"]["addresses"]["listen"])
        sender.start()
        sender.join(120)
        assert sender.sent == TOTAL  # finished although nobody reads the live publisher
        wait_until(
            lambda: d.status()["receivers"]["in"]["records"] == TOTAL + probes,
            60,
            "all records in",
        )
        got = 0
        while sub.poll(2000):
            sub.recv_multipart()
            got += 1
        live = d.status()["publishers"]["live"]
        dropped = sum(live["drops"].values())
        assert dropped > 0
        assert got + dropped == TOTAL
        assert d.stop() == 0


FILE_CONFIG = """
[daemon]
name = "{name}"
drain_timeout_s = 20

[[receiver]]
type = "tcp"
name = "in"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
"""


def test_sigterm_mid_run_keeps_every_acknowledged_record(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    d = daemon(FILE_CONFIG.format(name="sig", directory=workdir / "data"), name="sig")
    assert d.request("CTRL", {"transition": "start", "args": {"run_id": "sigrun"}}) == {
        "state": "RUN"
    }
    sender = Sender(d.status()["receivers"]["in"]["addresses"]["listen"], total=10**9)
    sender.start()
    wait_until(lambda: d.status()["receivers"]["in"]["records"] > 2000, 60, "records to flow")
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    sender.join(30)
    summary = verify(workdir / "data" / "run-sigrun.daqd")
    assert summary.problems == [] and summary.gaps == {}
    n = summary.records["in"]
    assert summary.end is not None
    assert "INTERRUPTED" in summary.end["condition"]
    # the run's own count of what the receiver acknowledged equals what the file holds
    assert summary.end["records"] == {"in": n}
    assert 2000 < n <= sender.sent
    assert "stopped" in d.log()


def test_check_prints_a_summary_and_bad_configs_name_the_key(workdir: Path) -> None:
    good = workdir / "good.toml"
    good.write_text(FILE_CONFIG.format(name="chk", directory=workdir / "d"))
    out = subprocess.run([DAQD, "check", str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "receiver  in" in out.stdout and "publisher disk" in out.stdout
    bad = workdir / "bad.toml"
    bad.write_text(FILE_CONFIG.format(name="chk", directory=workdir / "d") + "colour = 'red'\n")
    out = subprocess.run([DAQD, "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f'daqd: {bad}: [[publisher]] #1 (name "disk"): key "colour": unknown key'
        f" (line {len(bad.read_text().splitlines())})"
    )
    out = subprocess.run(
        [DAQD, "serve", str(workdir / "missing.toml")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "missing.toml: cannot read" in out.stderr


def test_serve_refuses_a_port_in_use_with_one_line(workdir: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    cfg = workdir / "busy.toml"
    text = FILE_CONFIG.format(name="busy", directory=workdir / "d")
    cfg.write_text(text.replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    env = {"RUNTIME_DIRECTORY": str(workdir), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [DAQD, "serve", str(cfg)], capture_output=True, text=True, env=env, timeout=60
    )
    holder.close()
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "receiver 'in' cannot start" in out.stderr.splitlines()[-1]
