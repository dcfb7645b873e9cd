"""The control socket: requests, refusals, garbage, permissions, CURVE, many clients at once."""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
import zmq.auth

from daqd.control import ControlServer
from daqd.control_client import ControlClient
from daqd.endpoints import control_endpoint, runtime_dir, socket_mode
from daqd.errors import ControlError
from daqd.protocols import iccp

from .conftest import wait_for


@pytest.fixture
def rundir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # ipc paths are limited to ~107 bytes, so keep the directory short rather than under tmp_path.
    path = Path(tempfile.mkdtemp(prefix="dq", dir="/tmp"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Daemonish:
    """A handler with the host's shape: serves a few codes, refuses others with ControlError."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.release = asyncio.Event()
        self.state = "ORBIT"

    async def __call__(self, code: str, args: dict[str, Any]) -> Any:
        self.calls.append((code, args))
        if code == "STAT":
            return {"state": self.state, "receivers": {"raw": {"records": 3}}}
        if code == "CTRL":
            if args.get("transition") == "slow":
                await self.release.wait()
                return "RUN"
            if args.get("transition") != "start":
                raise ControlError(f"cannot {args.get('transition')} in state {self.state}")
            self.state = "RUN"
            return self.state
        if code == "CMD ":
            return {"echo": args}
        if code == "TAPS":
            return {"bad": object()}  # not msgpack-able: must come back as ERROR
        raise RuntimeError("boom\nsecond line")


@pytest.fixture
async def server(rundir: Path) -> AsyncIterator[tuple[ControlServer, Daemonish]]:
    handler = Daemonish()
    srv = ControlServer(handler, name="t1", max_request_bytes=4096)
    await srv.start()
    yield srv, handler
    await srv.close()


async def ask(endpoint: str, code: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
    def call() -> Any:
        with ControlClient(endpoint, **kw) as client:
            return client.request(code, args)

    return await asyncio.to_thread(call)


async def raw_exchange(endpoint: str, frames: list[bytes], timeout_s: float = 10) -> list[bytes]:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart(frames)
        return await asyncio.wait_for(sock.recv_multipart(), timeout_s)
    finally:
        sock.close()


def test_runtime_dir_prefers_systemd_then_xdg_then_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/daqd:/run/other")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert runtime_dir() == Path("/run/daqd")
    assert control_endpoint("demo") == "ipc:///run/daqd/demo.ctl"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert runtime_dir() == Path("/run/user/1000/daqd")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == Path(f"/tmp/daqd-{os.getuid()}")


async def test_requests_results_and_refusals(server: tuple[ControlServer, Daemonish]) -> None:
    srv, handler = server
    endpoint = control_endpoint("t1")
    assert srv.endpoints == [endpoint]
    status = await ask(endpoint, "STAT")
    assert status == {"state": "ORBIT", "receivers": {"raw": {"records": 3}}}
    assert await ask(endpoint, "CTRL", {"transition": "start"}) == "RUN"
    with pytest.raises(ControlError, match="cannot land in state RUN"):
        await ask(endpoint, "CTRL", {"transition": "land"})
    args = {"target": "raw", "name": "reset", "args": [1], "kwargs": {}}
    assert await ask(endpoint, "CMD ", args) == {"echo": args}
    with pytest.raises(ControlError, match="reply not sendable"):
        await ask(endpoint, "TAPS")
    with pytest.raises(ControlError, match="internal error: RuntimeError: boom second line"):
        await ask(endpoint, "CONF", {"config": ""})
    with pytest.raises(ControlError, match="unknown request code 'XYZW'; known codes: 'CONF'"):
        await ask(endpoint, "XYZW")
    assert srv.counters["ok"] == 4  # STAT, start, CMD, TAPS (whose reply then failed to encode)
    assert srv.counters["refused"] == 1
    assert srv.counters["unknown_codes"] == 1
    assert srv.counters["internal_errors"] == 2
    assert [c for c, _ in handler.calls] == ["STAT", "CTRL", "CTRL", "CMD ", "TAPS", "CONF"]


async def test_socket_file_is_private(
    server: tuple[ControlServer, Daemonish], rundir: Path
) -> None:
    assert socket_mode(rundir / "t1.ctl") == 0o600


async def test_group_socket_is_0660_and_owned_by_the_group(rundir: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    srv = ControlServer(Daemonish(), name="grp", group=group)
    await srv.start()
    try:
        path = rundir / "grp.ctl"
        assert socket_mode(path) == 0o660
        assert path.stat().st_gid == os.getgid()
        assert (await ask(control_endpoint("grp"), "STAT"))["state"] == "ORBIT"
    finally:
        await srv.close()
    assert not path.exists()
    with pytest.raises(ControlError, match="group 'no-such-group-xyz' does not exist"):
        await ControlServer(Daemonish(), name="grp2", group="no-such-group-xyz").start()


@pytest.mark.parametrize(
    ("frames", "counter", "words"),
    [
        ([b"garbage"], "bad_messages", "expected 2 bytes"),
        ([b"\x00\x63"], "bad_messages", "unknown message type 99"),
        ([b"\x00\x02", b"ST"], "bad_messages", "code must be 4 bytes"),
        ([b"\x00\x02", b"STAT", b"\xc1\xc1"], "bad_messages", "not valid msgpack"),
        ([b"\x00\x02", b"STAT", msgpack.packb("text")], "bad_messages", "expected a map"),
        ([b"\x00\x03"], "bad_messages", "unexpected OK"),
        (
            [b"\x00\x02", b"CONF", msgpack.packb({"config": "x" * 5000})],
            "oversize",
            "over the limit of 4096 bytes",
        ),
    ],
)
async def test_garbage_gets_error_and_is_counted(
    server: tuple[ControlServer, Daemonish], frames: list[bytes], counter: str, words: str
) -> None:
    srv, _ = server
    reply = await raw_exchange(control_endpoint("t1"), frames)
    message = iccp.decode(reply)
    assert isinstance(message, iccp.Error)
    assert words in message.message
    assert message.kind == "protocol"
    assert srv.counters[counter] == 1
    assert (await ask(control_endpoint("t1"), "STAT"))["state"] == "ORBIT"


async def test_requests_far_over_the_limit_get_error_on_ipc(
    server: tuple[ControlServer, Daemonish],
) -> None:
    # The ipc socket has no transport cut-off: every size is read, refused with ERROR, counted.
    srv, _ = server
    sizes = [4097, 2 * 4096 + 1, 64 << 10, 4 << 20]
    for size in sizes:
        reply = iccp.decode(
            await raw_exchange(control_endpoint("t1"), [b"\x00\x02", b"CONF", b"\x00" * size])
        )
        assert isinstance(reply, iccp.Error) and reply.kind == "protocol"
        assert f"body of {size} bytes is over the limit of 4096 bytes" in reply.message
    assert srv.counters["oversize"] == len(sizes)
    assert srv.counters["messages"] == len(sizes)
    assert (await ask(control_endpoint("t1"), "STAT"))["state"] == "ORBIT"


async def test_req_clients_with_an_empty_delimiter_are_answered(
    server: tuple[ControlServer, Daemonish],
) -> None:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control_endpoint("t1"))
    await sock.send_multipart(iccp.encode(iccp.Request("STAT", {})))
    reply = iccp.decode(await asyncio.wait_for(sock.recv_multipart(), 10))
    sock.close()
    assert isinstance(reply, iccp.Ok) and reply.result["state"] == "ORBIT"


async def test_many_clients_at_once_and_a_slow_request_blocks_nobody(
    server: tuple[ControlServer, Daemonish],
) -> None:
    srv, handler = server
    endpoint = control_endpoint("t1")
    slow = asyncio.create_task(ask(endpoint, "CTRL", {"transition": "slow"}, timeout_s=30))
    while not any(a.get("transition") == "slow" for _, a in handler.calls):
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*(ask(endpoint, "STAT", timeout_s=30) for _ in range(20)))
    assert all(r["state"] == "ORBIT" for r in results)
    assert not slow.done()
    handler.release.set()
    assert await slow == "RUN"
    assert srv.counters["ok"] == 21


async def test_stop_gets_finished_from_the_stop_handler(rundir: Path) -> None:
    stopped = asyncio.Event()

    async def on_stop() -> tuple[iccp.Outcome, list[str]]:
        stopped.set()
        return iccp.Outcome.OK, ["drained 12 records"]

    srv = ControlServer(Daemonish(), name="stopper", on_stop=on_stop)
    await srv.start()
    try:

        def call() -> iccp.Finished:
            with ControlClient(control_endpoint("stopper")) as client:
                return client.stop()

        finished = await asyncio.to_thread(call)
        assert finished == iccp.Finished(iccp.Outcome.OK, ("drained 12 records",))
        assert stopped.is_set()
    finally:
        await srv.close()


async def test_stop_without_a_stop_handler_is_refused(
    server: tuple[ControlServer, Daemonish],
) -> None:
    reply = iccp.decode(await raw_exchange(control_endpoint("t1"), iccp.encode(iccp.Stop())))
    assert isinstance(reply, iccp.Error) and "cannot be stopped" in reply.message


async def test_client_without_daemon_says_so_quickly(rundir: Path) -> None:
    with pytest.raises(ControlError, match=r"no daemon running: control socket .* does not exist"):
        ControlClient(control_endpoint("absent"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(rundir / "stale.ctl"))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    with pytest.raises(ControlError, match="stale socket"):
        ControlClient(control_endpoint("stale"))
    # A new daemon of that name replaces the stale file.
    srv = ControlServer(Daemonish(), name="stale")
    await srv.start()
    try:
        assert (await ask(control_endpoint("stale"), "STAT"))["state"] == "ORBIT"
    finally:
        await srv.close()


async def test_second_daemon_with_the_same_name_is_refused(
    server: tuple[ControlServer, Daemonish],
) -> None:
    with pytest.raises(ControlError, match="already answers"):
        await ControlServer(Daemonish(), name="t1").start()
    assert (await ask(control_endpoint("t1"), "STAT"))["state"] == "ORBIT"


async def test_abstract_socket_endpoint(rundir: Path) -> None:
    endpoint = f"ipc://@daqd-test-{os.getpid()}"
    srv = ControlServer(Daemonish(), endpoint=endpoint)
    await srv.start()
    try:
        assert (await ask(endpoint, "STAT"))["state"] == "ORBIT"
    finally:
        await srv.close()


async def test_no_reply_times_out_with_a_clear_message(rundir: Path) -> None:
    ctx = zmq.asyncio.Context.instance()
    mute = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    mute.bind(control_endpoint("mute"))
    try:
        with pytest.raises(ControlError, match=r"no reply from .* within 0\.3 s"):
            await ask(control_endpoint("mute"), "STAT", timeout_s=0.3)
    finally:
        mute.close(linger=0)


def test_tcp_without_curve_keys_is_refused() -> None:
    with pytest.raises(ControlError, match="needs CURVE keys"):
        ControlServer(Daemonish(), name="x", tcp="tcp://127.0.0.1:0")


async def test_tcp_with_curve_admits_only_authorised_clients(rundir: Path, tmp_path: Path) -> None:
    keys, clients, strangers = tmp_path / "keys", tmp_path / "clients", tmp_path / "strangers"
    for d in (keys, clients, strangers):
        d.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(strangers, "stranger")
    shutil.copy(client_public, clients)
    srv = ControlServer(
        Daemonish(),
        name="curve",
        tcp="tcp://127.0.0.1:0",
        curve_secret_key_file=server_secret,
        curve_clients_dir=clients,
    )
    await srv.start()
    try:
        tcp = srv.endpoints[1]
        assert tcp.startswith("tcp://127.0.0.1:")
        status = await ask(
            tcp, "STAT", server_public_key_file=server_public, client_key_file=client_secret
        )
        assert status["state"] == "ORBIT"
        with pytest.raises(ControlError, match="no reply"):
            await ask(
                tcp,
                "STAT",
                timeout_s=1.0,
                server_public_key_file=server_public,
                client_key_file=stranger_secret,
            )
        with pytest.raises(ControlError, match="needs CURVE"):
            ControlClient(tcp)
    finally:
        await srv.close()
    with pytest.raises(ControlError, match="holds no secret key"):
        await ControlServer(
            Daemonish(),
            name="curve2",
            tcp="tcp://127.0.0.1:0",
            curve_secret_key_file=server_public,
            curve_clients_dir=clients,
        ).start()


def curve_dealer(endpoint: str, server_public: Path, client_secret: Path) -> zmq.asyncio.Socket:
    """A CURVE client that does not reconnect, so that each connection is one attempt."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)
    sock.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
    public, secret = zmq.auth.load_certificate(client_secret)
    assert secret is not None
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.connect(endpoint)
    return sock


async def test_tcp_cut_connections_and_rejected_curve_clients_are_counted(
    rundir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys, clients, strangers = tmp_path / "keys", tmp_path / "clients", tmp_path / "strangers"
    for d in (keys, clients, strangers):
        d.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(strangers, "stranger")
    shutil.copy(client_public, clients)
    srv = ControlServer(
        Daemonish(),
        name="cut",
        tcp="tcp://127.0.0.1:0",
        curve_secret_key_file=server_secret,
        curve_clients_dir=clients,
        max_request_bytes=4096,
    )
    await srv.start()
    try:
        tcp = srv.endpoints[1]
        # Over the transport cut-off: ZeroMQ closes the connection; each one is counted.
        for n in range(1, 6):
            sock = curve_dealer(tcp, server_public, client_secret)
            await sock.send_multipart([b"\x00\x02", b"CONF", b"\x00" * (srv.transport_limit + n)])
            await wait_for(lambda n=n: srv.counters["connections_cut"] == n, 30, "a cut counted")
            assert await sock.poll(0) == 0
            sock.close()
        # Between the limit and the cut-off: answered with ERROR.
        sock = curve_dealer(tcp, server_public, client_secret)
        await sock.send_multipart([b"\x00\x02", b"CONF", b"\x00" * 5000])
        reply = iccp.decode(await asyncio.wait_for(sock.recv_multipart(), 10))
        assert isinstance(reply, iccp.Error) and "over the limit of 4096" in reply.message
        sock.close()
        # An unknown key: rejected by ZAP, counted with its address, not counted as a cut.
        stranger = curve_dealer(tcp, server_public, stranger_secret)
        await stranger.send_multipart(iccp.encode(iccp.Request("STAT", {})))
        await wait_for(lambda: srv.counters["handshakes_failed"] >= 1, 30, "the rejection")
        assert srv.counters["curve_rejected"] == 1
        assert await stranger.poll(0) == 0
        stranger.close()
        for _ in range(3):  # whole requests: their connections close and are not cut
            status = await ask(
                tcp, "STAT", server_public_key_file=server_public, client_key_file=client_secret
            )
            assert status["state"] == "ORBIT"
        # one more cut, seen after the closing of those three: the count is exact
        sock = curve_dealer(tcp, server_public, client_secret)
        await sock.send_multipart([b"\x00\x02", b"CONF", b"\x00" * (4 * srv.transport_limit)])
        await wait_for(lambda: srv.counters["connections_cut"] >= 6, 30, "the sixth cut")
        sock.close()
        assert srv.counters["connections_cut"] == 6
        assert srv.counters["oversize"] == 1 and srv.counters["ok"] == 3
        assert srv.counters["messages"] == 4
    finally:
        await srv.close()
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected and "CURVE client from 127.0.0.1 rejected" in rejected[0]
    cut = [r.getMessage() for r in caplog.records if "before a whole request" in r.getMessage()]
    assert 1 <= len(cut) <= 3  # rate-limited: the first ones, then a summary
