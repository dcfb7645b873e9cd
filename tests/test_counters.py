"""Counters with a rule behind them, each driven through a real `daqd serve` and real sockets:
what a user sees in `daqctl status`/`stop` when a client breaks its framing, a camera answers
garbage, an uploader goes away, DCSS stops reading, a file name is taken, records arrive outside a
run, or the shutdown deadline passes."""

from __future__ import annotations

import json
import re
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from daqd.config import parse_config
from daqd.host import Host
from daqd.record import Record
from daqd.runfile import read_items, verify
from daqd.runstate import RunCondition

from .conftest import Daemon, wait_for, wait_until

MakeDaemon = Callable[..., Daemon]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def address(d: Daemon, receiver: str, key: str = "listen") -> tuple[str, int]:
    host, port = d.status()["receivers"][receiver]["addresses"][key].rsplit(":", 1)
    return host, int(port)


def receiver(d: Daemon, name: str) -> dict[str, Any]:
    r: dict[str, Any] = d.status()["receivers"][name]
    return r


def file_records(path: Path) -> list[Record]:
    return [item for item in read_items(path) if isinstance(item, Record)]


DISK = """
[[publisher]]
type = "file"
name = "disk"
directory = "{data}"
live = false
"""

# ------------------------------------------------------------------ tcp framing faults

TCP = """
[daemon]
name = "t"

[[receiver]]
type = "tcp"
name = "len"
listen = "127.0.0.1:0"
framing = "length32"
max_message_bytes = 100
publish_to = ["disk"]

[[receiver]]
type = "tcp"
name = "line"
listen = "127.0.0.1:0"
framing = "line"
max_message_bytes = 100
publish_to = ["disk"]
"""


def test_tcp_truncated_and_too_long_lines_are_counted_and_taint_the_run(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """A length32 client that closes inside a body or inside a length prefix: `truncated`, the
    whole messages before it kept. A line longer than max_message_bytes: `too_long`, the client
    disconnected. Each is an input error, so the run ends TAINTED, and the stop line says why."""
    d = daemon(TCP + DISK.format(data=workdir / "data"))
    ok(d.ctl("start", "frames"))
    with socket.create_connection(address(d, "len")) as c:
        c.sendall(b"\x00\x00\x00\x02ok\x00\x00\x00\x03yes")
        c.sendall(b"\x00\x00\x00\x0acut")  # 10 bytes announced, 3 sent
    with socket.create_connection(address(d, "len")) as c:
        c.sendall(b"\x00\x00")  # half a length prefix
    with socket.create_connection(address(d, "line")) as c:
        c.sendall(b"first\n" + b"x" * 150)  # no newline within 101 bytes
        c.shutdown(socket.SHUT_WR)
        c.settimeout(30)
        try:
            assert c.recv(10) == b""  # the daemon closed it
        except ConnectionResetError:
            pass  # closed with bytes of ours unread: also closed

    wait_until(lambda: receiver(d, "len")["errors"].get("truncated") == 2, what="2 truncated")
    wait_until(lambda: receiver(d, "line")["errors"].get("too_long") == 1, what="1 too_long")
    length, line = receiver(d, "len"), receiver(d, "line")
    assert (length["records"], length["errors"], length["drops"]) == (2, {"truncated": 2}, {})
    assert (line["records"], line["errors"], line["drops"]) == (1, {"too_long": 1}, {})
    assert length["state"] == line["state"] == "running"

    out = ok(d.ctl("stop"))
    assert out.startswith("run frames ended: TAINTED, 3 records; state ORBIT\n"), out
    assert out.splitlines()[1:] == [
        "  publisher disk: offered 3, delivered 3",
        "  why: receiver len: 2 errors (truncated) -> TAINTED",
        "  why: receiver line: 1 errors (too_long) -> TAINTED",
    ]
    records = file_records(workdir / "data" / "run-frames.daqd")
    assert sorted(bytes(r.payload[0]) for r in records) == [b"first", b"ok", b"yes"]

    # the receivers go on: a good client afterwards is served
    with socket.create_connection(address(d, "line")) as c:
        c.sendall(b"again\n")
    wait_until(lambda: receiver(d, "line")["records"] == 2, what="the next client's line")


TWO_CLIENTS = """
[daemon]
name = "t"

[[receiver]]
type = "tcp"
name = "len"
listen = "127.0.0.1:0"
framing = "line"
max_connections = 2
"""


def test_tcp_clients_beyond_max_connections_are_refused_and_counted(daemon: MakeDaemon) -> None:
    """State input controls is bounded: with max_connections = 2 a third client is closed at
    once and counted; the two held go on being served, and a client is taken again once one
    of them left."""
    d = daemon(TWO_CLIENTS)
    where = address(d, "len")
    first, second = socket.create_connection(where), socket.create_connection(where)
    try:
        first.sendall(b"one\n")
        second.sendall(b"two\n")
        wait_until(lambda: receiver(d, "len")["records"] == 2, what="two clients served")
        with socket.create_connection(where) as third:
            third.settimeout(30)
            try:
                assert third.recv(10) == b""  # closed by the daemon at once
            except ConnectionResetError:
                pass
        wait_until(
            lambda: receiver(d, "len")["errors"] == {"too_many_connections": 1},
            what="the refusal counted",
        )
        first.sendall(b"three\n")
        wait_until(lambda: receiver(d, "len")["records"] == 3, what="a held client still served")
    finally:
        first.close()
        second.close()
    wait_until(lambda: receiver(d, "len")["extra"].get("clients") == 0, what="both gone")
    with socket.create_connection(where) as again:
        again.sendall(b"four\n")
    wait_until(lambda: receiver(d, "len")["records"] == 4, what="a new client taken again")
    assert receiver(d, "len")["errors"] == {"too_many_connections": 1}


# ------------------------------------------------------------------ file publisher rules


def test_a_taken_run_file_name_is_never_overwritten(daemon: MakeDaemon, workdir: Path) -> None:
    """A run id used twice, and a name a user's file already has: each new file gets the next
    free `-N` suffix; the old files keep every byte."""
    data = workdir / "data"
    d = daemon(
        '[daemon]\nname = "t"\n[[receiver]]\ntype = "udp"\nname = "raw"\n'
        'listen = "127.0.0.1:0"\npublish_to = ["disk"]\n' + DISK.format(data=data)
    )
    target = address(d, "raw")
    data.mkdir(exist_ok=True)
    (data / "run-same-1.daqd").write_bytes(b"a user's own file")

    def run(n: int) -> str:
        ok(d.ctl("start", "same"))
        before = receiver(d, "raw")["records"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(n):
                s.sendto(b"%d" % i, target)
        wait_until(lambda: receiver(d, "raw")["records"] == before + n, what=f"{n} datagrams")
        return ok(d.ctl("stop"))

    assert run(3).startswith("run same ended: GOOD, 3 records")
    first = (data / "run-same.daqd").read_bytes()
    assert run(5).startswith("run same ended: GOOD, 5 records")
    assert sorted(p.name for p in data.iterdir()) == [
        "run-same-1.daqd",
        "run-same-2.daqd",
        "run-same.daqd",
    ]
    assert (data / "run-same-1.daqd").read_bytes() == b"a user's own file"
    assert (data / "run-same.daqd").read_bytes() == first
    assert verify(data / "run-same.daqd").records == {"raw": 3}
    second = verify(data / "run-same-2.daqd")
    assert second.ok and second.records == {"raw": 5}


def test_records_outside_a_run_are_counted_when_live_is_off(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """live = false: what arrives between runs is dropped `outside_run`, exactly, and written
    nowhere; the next run is not flagged for it."""
    data = workdir / "data"
    d = daemon(
        '[daemon]\nname = "t"\n[[receiver]]\ntype = "udp"\nname = "raw"\n'
        'listen = "127.0.0.1:0"\npublish_to = ["disk"]\n' + DISK.format(data=data)
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(7):
            s.sendto(b"between %d" % i, address(d, "raw"))
    wait_until(
        lambda: d.status()["publishers"]["disk"]["drops"].get("outside_run") == 7,
        what="7 outside_run drops",
    )
    disk = d.status()["publishers"]["disk"]
    assert (disk["offered"], disk["records"], disk["drops"]) == (7, 0, {"outside_run": 7})
    assert not data.exists() or list(data.iterdir()) == []
    ok(d.ctl("start", "after"))
    assert ok(d.ctl("stop")) == "run after ended: GOOD, 0 records; state ORBIT\n"


# ------------------------------------------------------------------ shutdown deadline

DRAIN = """
[daemon]
name = "t"
drain_timeout_s = 1

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
policy = "block"
queue_size = 100
sndhwm = 10
"""

ACCOUNTING = re.compile(r"accounting: publisher live: (.*)$", re.M)


def test_what_the_drain_deadline_cuts_is_counted_shutdown_timeout(daemon: MakeDaemon) -> None:
    """A `block` publisher whose subscriber never reads holds the shutdown: after drain_timeout_s
    (1 s) the daemon exits anyway, and every record it could not deliver is counted as dropped
    `shutdown_timeout` in the exit accounting: offered = delivered + dropped."""
    d = daemon(DRAIN)
    endpoint = d.status()["publishers"]["live"]["addresses"]["endpoint"]
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            target = address(d, "raw")
            delivered = [-1]

            def stuck() -> bool:
                for _ in range(50):
                    s.sendto(b"z" * 60000, target)
                live = d.status()["publishers"]["live"]
                before, delivered[0] = delivered[0], live["records"]
                return bool(live["queue"] >= 100 and live["records"] == before)

            wait_until(stuck, 120, "the live queue to stay full behind a stalled subscriber")
        received = receiver(d, "raw")["records"]
        began = time.monotonic()
        assert d.stop(60) == 0
        took = time.monotonic() - began
    finally:
        sub.close(linger=0)
        ctx.term()
    log = d.log()
    [line] = ACCOUNTING.findall(log)
    offered = int(re.search(r"offered (\d+)", line).group(1))  # type: ignore[union-attr]
    got = int(re.search(r"delivered (\d+)", line).group(1))  # type: ignore[union-attr]
    cut = int(re.search(r"(\d+) shutdown_timeout", line).group(1))  # type: ignore[union-attr]
    # UDP cannot wait: datagrams that found the queue full while it stalled are queue_full
    full = re.search(r"(\d+) queue_full", line)
    assert offered == received
    assert cut >= 100  # the full queue, at least
    assert offered == got + cut + (int(full.group(1)) if full else 0), line
    assert "not delivered within drain_timeout_s; counted as dropped 'shutdown_timeout'" in log
    assert took < 30


# ------------------------------------------------------------------ http_poll: what a camera answers


class _Camera(socketserver.BaseRequestHandler):
    """A camera that is not quite HTTP: /garbage answers with no status line, /stream sends a
    chunked image (no Content-Length) of 3 x 600 bytes."""

    def handle(self) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            request += chunk
        if request.startswith(b"GET /garbage"):
            self.request.sendall(b"this is no HTTP answer\r\n\r\n")
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n"
            self.request.sendall(head + b"Connection: close\r\n\r\n")
            for _ in range(3):
                self.request.sendall(b"258\r\n" + b"\xab" * 600 + b"\r\n")
            self.request.sendall(b"0\r\n\r\n")


@pytest.fixture
def camera() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Camera)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


POLL = """
[[receiver]]
type = "http_poll"
name = "{name}"
url = "{url}"
interval_s = 0
timeout_s = 30
{extra}
"""


def test_http_poll_counts_a_garbage_answer_as_protocol_and_a_long_stream_as_too_large(
    daemon: MakeDaemon, camera: str
) -> None:
    """`daqctl cmd NAME grab` fails naming the problem; the receiver counts `protocol` for an
    answer that is not HTTP and `too_large` for a chunked body (no Content-Length to refuse
    early) that grows past max_body_bytes; no record is made, the receiver runs on."""
    d = daemon(
        '[daemon]\nname = "t"\n'
        + POLL.format(name="junk", url=f"{camera}/garbage", extra="")
        + POLL.format(name="long", url=f"{camera}/stream", extra="max_body_bytes = 1000")
        + POLL.format(name="fits", url=f"{camera}/stream", extra="max_body_bytes = 1800")
    )
    junk = d.ctl("cmd", "junk", "grab")
    assert junk.returncode != 0 and "Traceback" not in junk.stderr, junk.stderr
    assert len(junk.stderr.splitlines()) == 1, junk.stderr
    assert junk.stderr.startswith("daqctl: junk.grab: ClientResponseError: 400, message=")
    assert "Bad status line" in junk.stderr
    long = d.ctl("cmd", "long", "grab")
    assert long.returncode != 0
    assert long.stderr == "daqctl: long.grab: answer exceeds max_body_bytes=1000\n"
    fits = json.loads(ok(d.ctl("cmd", "fits", "grab", "--json")))
    assert fits["length"] == 1800 and fits["status"] == 200
    status = d.status()["receivers"]
    assert (status["junk"]["errors"], status["junk"]["records"]) == ({"protocol": 1}, 0)
    assert (status["long"]["errors"], status["long"]["records"]) == ({"too_large": 1}, 0)
    assert (status["fits"]["errors"], status["fits"]["records"]) == ({}, 1)
    assert {r["state"] for r in status.values()} == {"running"}
    # a camera's failure is the command's answer, not an internal error of the daemon
    control = d.status()["control"]
    assert control["refused"] == 2 and control.get("internal_errors", 0) == 0, control


# ------------------------------------------------------------------ http_image: an uploader leaves

IMAGE = """
[daemon]
name = "t"

[[receiver]]
type = "http_image"
name = "img"
listen = "127.0.0.1:0"
"""


def test_http_image_counts_an_upload_cut_off_mid_body_as_disconnected(
    daemon: MakeDaemon,
) -> None:
    """A POST that announces 10,000 bytes and closes after 100: `disconnected`, no record; the
    next whole upload is taken."""
    d = daemon(IMAGE)
    target = address(d, "img")
    head = (
        b"POST /image HTTP/1.1\r\nHost: cam\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 10000\r\n\r\n"
    )
    with socket.create_connection(target) as c:
        c.sendall(head + b"\xff" * 100)
    wait_until(lambda: receiver(d, "img")["errors"].get("disconnected") == 1, what="1 disconnected")
    with socket.create_connection(target) as c:
        c.sendall(head.replace(b"10000", b"4") + b"\xff\xd8\xff\xd9")
        answer = c.recv(4096)
    assert answer.startswith(b"HTTP/1.1 2"), answer
    img = receiver(d, "img")
    assert (img["errors"], img["records"], img["drops"]) == ({"disconnected": 1}, 1, {})


# ------------------------------------------------------------------ dcss: DCSS stops reading

ECHO_HANDLER = """
from daqd.dhs import operation


@operation("echo")
async def echo(op):
    op.update(*op.args)
    op.complete("normal", *op.args)
"""

DHS = """
[daemon]
name = "t"

[[receiver]]
type = "dcss"
name = "dhs"
connect = "127.0.0.1:{port}"
dhs_name = "dhs"
handlers = ["echo_ops.py"]
reconnect_first_s = 0.05
max_pending_bytes = 65536
"""

CLIENT_TYPE = b"stoc_send_client_type" + b"\0" * 179  # DCSS's v1 handshake frame (200 bytes)
IS_HARDWARE = b"htos_client_is_hardware dhs" + b"\0" * 173  # the DHS's v1 answer


def v2(text: bytes) -> bytes:
    """A DCSS-to-DHS v2 frame as DCSS writes it: "%12d %12d " then the text and its NUL."""
    return b"%12d %12d " % (len(text) + 1, 0) + text + b"\0"


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


def test_dcss_that_stops_reading_is_dropped_as_write_stalled_and_reconnected(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """DCSS blocks every DHS while one does not read, so a DHS must never wait on it: when DCSS
    stops reading and more than max_pending_bytes pile up unsent, the DHS counts `write_stalled`,
    drops the connection and dials again."""
    (workdir / "echo_ops.py").write_text(ECHO_HANDLER)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)
    d = daemon(DHS.format(port=server.getsockname()[1]))
    try:
        first, _ = server.accept()
        first.settimeout(60)
        first.sendall(CLIENT_TYPE)
        assert recv_exactly(first, 200) == IS_HARDWARE
        # 200 operations whose answers (an update and a completion, each echoing 50 kB) DCSS
        # never reads: 20 MB, more than the kernel's buffers on both sides hold
        args = b"a" * 50_000
        for i in range(200):
            try:
                first.sendall(v2(b"stoh_start_operation echo 1.%d %s" % (i, args)))
            except OSError:  # the DHS dropped us: what it had to do
                break
        second, _ = server.accept()  # it dials again
        second.settimeout(60)
        second.sendall(CLIENT_TYPE)
        assert recv_exactly(second, 200) == IS_HARDWARE
        second.sendall(v2(b"stoh_start_operation echo 2.1 again"))
        update = b"htos_operation_update echo 2.1 again"
        completed = b"htos_operation_completed echo 2.1 normal again"
        expected = v2(update) + v2(completed)
        assert recv_exactly(second, len(expected)) == expected
        dhs = receiver(d, "dhs")
        assert dhs["errors"] == {"write_stalled": 1}
        assert dhs["state"] == "running" and dhs["extra"]["online"] is True
        assert "DCSS is not reading" in d.log()
        first.close()
        second.close()
    finally:
        server.close()


# ------------------------------------------------------------------ a publisher's send() fails


async def test_a_failed_send_is_counted_send_error_and_degrades_the_run(tmp_path: Path) -> None:
    """A publisher whose send() raises (here: the file publisher's, for one batch): that batch is
    dropped `send_error` with one error `send`, the next batches go on, and the run ends
    INCOMPLETE|DEGRADED with offered = delivered + dropped. (In one process: no shipped publisher
    lets a socket make its send() raise; the rule under test is the queue's and the host's.)"""
    text = (
        '[daemon]\nname = "t"\n[[receiver]]\ntype = "udp"\nname = "raw"\n'
        'listen = "127.0.0.1:0"\npublish_to = ["disk"]\n' + DISK.format(data=tmp_path)
    )
    host = Host(parse_config(text, "t.toml"))
    await host.start()
    try:
        disk = host.publishers["disk"]
        real_send = disk.send
        fail = [False]

        async def send(records: list[Record]) -> None:
            if fail[0]:
                raise OSError(5, "Input/output error")
            await real_send(records)

        disk.send = send  # type: ignore[method-assign]
        h, p = host.receivers["raw"].addresses["listen"].rsplit(":", 1)
        await host.begin_run("bad")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i, failing in enumerate((False, True, False)):
                fail[0] = failing
                s.sendto(b"%d" % i, (h, int(p)))
                counted = i + 1
                await wait_for(
                    lambda n=counted: (  # type: ignore[misc]
                        disk.counters.records + disk.counters.drops.get("send_error", 0) == n
                    ),
                    what=f"datagram {i} delivered or dropped",
                )
        run = await host.end_run(RunCondition.GOOD)
    finally:
        await host.stop()
    assert run.condition == RunCondition.INCOMPLETE | RunCondition.DEGRADED
    ledger = run.accounting["publishers"]["disk"]
    assert ledger == {
        "offered": 3,
        "delivered": 2,
        "drops": {"send_error": 1},
        "errors": {"send": 1},
    }
    assert any("send_error" in reason for reason in run.reasons), run.reasons
    records = file_records(tmp_path / "run-bad.daqd")
    assert [bytes(r.payload[0]) for r in records] == [b"0", b"2"]
