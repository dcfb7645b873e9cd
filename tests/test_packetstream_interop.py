"""Interop with the real cs.packetstream 20240630, run as a subprocess from its own venv.

Its client against our server and our receiver, our client against its server, and the spec's
byte examples as they really appear on the wire in both directions.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from daqd.config import parse_config
from daqd.host import Host
from daqd.packetstream import PacketConnection, connect
from daqd.protocols.packetstream import EOF, ERQ, PacketDecoder, Request, Response, encode
from daqd.record import Record
from tests.peers import peer_python

pytestmark = pytest.mark.interop

PEER_SCRIPT = Path(__file__).with_name("packetstream_peer.py")
WAIT_S = 60.0  # the peer is slow to start (many cs.* imports) on a loaded box


@pytest.fixture(scope="session")
def peer_py() -> Path:
    return peer_python("packetstream")


async def run_peer(peer_py: Path, *args: str, timeout: float = WAIT_S) -> tuple[int, list[str]]:
    """Run the peer script to completion; return its exit code and stdout lines."""
    proc = await asyncio.create_subprocess_exec(
        str(peer_py),
        str(PEER_SCRIPT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"peer {args[0]} did not finish in {timeout} s") from None
    assert proc.returncode == 0, err.decode()[-2000:]
    return proc.returncode, out.decode().splitlines()


def results(lines: list[str]) -> list[tuple[bool, int, bytes]]:
    return [
        (ok, flags, bytes.fromhex(h))
        for ok, flags, h in (json.loads(line) for line in lines if line.startswith("["))
    ]


@pytest.fixture
def real_server(peer_py: Path) -> Iterator[Callable[[float], tuple[int, subprocess.Popen[bytes]]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(grace: float = 0.0) -> tuple[int, subprocess.Popen[bytes]]:
        proc = subprocess.Popen(
            [str(peer_py), str(PEER_SCRIPT), "server", str(grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), line
        return int(line.split()[1]), proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
async def our_server() -> AsyncIterator[
    Callable[..., Awaitable[tuple[int, list[PacketConnection]]]]
]:
    servers: list[asyncio.Server] = []

    async def start(handler: Callable[[Request], object]) -> tuple[int, list[PacketConnection]]:
        conns: list[PacketConnection] = []

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = PacketConnection(reader, writer, handler)  # type: ignore[arg-type]
            conns.append(conn)
            await conn.serve()

        srv = await asyncio.start_server(on_client, "127.0.0.1", 0)
        servers.append(srv)
        return srv.sockets[0].getsockname()[1], conns

    yield start
    for srv in servers:
        srv.close()


def kinds_handler(rq: Request) -> object:
    """Our server's handler: every result kind of the spec's table, by rq_type."""
    if rq.rq_type == 0:
        return None
    if rq.rq_type == 1:
        return rq.flags + 1
    if rq.rq_type == 2:
        return rq.payload.upper()
    if rq.rq_type == 3:
        return "straße"
    if rq.rq_type == 4:
        return 5, rq.payload[::-1]
    raise RuntimeError("rq_type 5 fails\nwith a second line")


async def async_kinds_handler(rq: Request) -> object:
    await asyncio.sleep(0)
    return kinds_handler(rq)


# ---- its client, our server ----


@pytest.mark.parametrize("handler", [kinds_handler, async_kinds_handler])
async def test_real_client_our_server_result_kinds(
    peer_py: Path,
    our_server: Callable[..., Awaitable[tuple[int, list[PacketConnection]]]],
    handler: Callable[[Request], object],
) -> None:
    port, conns = await our_server(handler)
    script = json.dumps(
        [[0, 0, ""], [1, 4, ""], [2, 0, b"abc".hex()], [3, 0, ""], [4, 2, b"xyz".hex()], [5, 0, ""]]
    )
    _, lines = await run_peer(peer_py, "client", str(port), "0", script)
    assert results(lines) == [
        (True, 0, b""),
        (True, 5, b""),
        (True, 0, b"ABC"),
        (True, 0, "straße".encode()),
        (True, 5, b"zyx"),
        (False, 0, b"RuntimeError: rq_type 5 fails"),
    ]
    # its `with conn:` returned: we answered its ERQ/EOF with our EOF
    assert lines[-1] == "CLOSED"
    await asyncio.wait_for(conns[0].wait_closed(), WAIT_S)
    assert conns[0].errors == {"handler": 1}


async def test_real_client_erq_then_request_fails(
    peer_py: Path, our_server: Callable[..., Awaitable[tuple[int, list[PacketConnection]]]]
) -> None:
    port, conns = await our_server(kinds_handler)
    _, lines = await run_peer(peer_py, "client-erq", str(port))
    assert results(lines) == [(False, 0, b"requests no longer allowed (peer sent ERQ)")]
    assert lines[-1] == "CLOSED"
    await asyncio.wait_for(conns[0].wait_closed(), WAIT_S)


async def test_real_client_closing_without_eof(
    peer_py: Path, our_server: Callable[..., Awaitable[tuple[int, list[PacketConnection]]]]
) -> None:
    port, conns = await our_server(kinds_handler)
    _, lines = await run_peer(peer_py, "client-vanish", str(port))
    assert results(lines) == [(True, 0, b"LAST WORDS")]
    await asyncio.wait_for(conns[0].wait_closed(), WAIT_S)
    assert conns[0].in_flight == (0, 0)
    assert "protocol" not in conns[0].errors


async def test_real_client_into_receiver(peer_py: Path, tmp_path: Path) -> None:
    config = f"""
[daemon]
name = "psi"

[[receiver]]
type = "packetstream"
name = "ps"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{tmp_path}"
"""
    host = Host(parse_config(config, "psi.toml"))
    await host.start()
    sent: list[Record] = []
    pub = host.publishers["disk"]
    original = pub.send

    async def spy(records: list[Record]) -> None:
        sent.extend(records)
        await original(records)

    pub.send = spy  # type: ignore[method-assign]
    rec = host.receivers["ps"]
    port = rec.addresses["listen"].rsplit(":", 1)[1]
    script = json.dumps([[3, i % 4, f"sample {i}".encode().hex()] for i in range(40)])
    # its default packet_grace (0.01 s) this time
    _, lines = await run_peer(peer_py, "client", port, "0.01", script)
    assert results(lines) == [(True, 0, b"")] * 40
    assert lines[-1] == "CLOSED"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while len(sent) < 40 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert [bytes(r.payload[0]) for r in sent] == [f"sample {i}".encode() for i in range(40)]
    assert [(r.tags["rq_type"], r.tags["flags"], r.tags["channel"]) for r in sent] == [
        (3, i % 4, 0) for i in range(40)
    ]
    assert rec.counters.errors == {}
    await host.stop()


# ---- our client, its server ----


async def test_our_client_real_server(
    real_server: Callable[[float], tuple[int, subprocess.Popen[bytes]]],
) -> None:
    port, _ = real_server(0.0)
    conn = await connect("127.0.0.1", port)
    got = await asyncio.wait_for(
        asyncio.gather(
            conn.request(0, b"echo"),
            conn.request(1, b"flagged", flags=9),
            conn.request(2),
            conn.request(3),
            conn.request(4),
            conn.request(5),
            conn.request(0, b"other channel", channel=3),
        ),
        WAIT_S,
    )
    assert [(r.ok, r.flags, r.payload) for r in got] == [
        (True, 0, b"echo"),
        (True, 9, b"flagged"),
        (False, 0, b"exception during handler"),
        (True, 0, b""),
        (True, 7, b""),
        (True, 0, b"text"),
        (False, 0, b"unknown channel %d"),
    ]
    assert got[-1].channel == 3
    payloads = [b"%d" % i * 50 for i in range(200)]
    many = await asyncio.wait_for(asyncio.gather(*(conn.request(0, p) for p in payloads)), WAIT_S)
    assert [r.payload for r in many] == payloads
    big = await asyncio.wait_for(conn.request(0, bytes(range(256)) * 1024), WAIT_S)
    assert big.payload == bytes(range(256)) * 1024
    # the close handshake completes: it answers our EOF with its own
    await asyncio.wait_for(conn.close(), WAIT_S)
    assert conn.errors == {}


async def test_our_pending_request_fails_when_real_server_dies(
    real_server: Callable[[float], tuple[int, subprocess.Popen[bytes]]],
) -> None:
    port, proc = real_server(0.0)
    conn = await connect("127.0.0.1", port)
    assert (await asyncio.wait_for(conn.request(4), WAIT_S)).flags == 7
    stuck = asyncio.ensure_future(conn.request(7))  # its handler never returns
    for _ in range(10):
        await asyncio.sleep(0)
    proc.kill()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(stuck, WAIT_S)
    assert conn.in_flight == (0, 0)


# ---- the spec's bytes, on the wire ----


async def test_spec_bytes_from_real_client(peer_py: Path) -> None:
    """A raw server sees exactly the spec's request bytes and answers with the spec's bytes."""
    seen: list[bytes] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(6)
        seen.append(first)
        writer.write(bytes.fromhex("04 02 04 68 69"))
        second = await reader.readexactly(6)
        seen.append(second)
        writer.write(bytes.fromhex("04 03 1c 79 6f"))
        seen.append(await reader.readexactly(8))  # ERQ and EOF as it closes
        writer.write(encode(EOF))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    script = json.dumps([[0, 0, b"hi".hex()], [1, 3, b"yo".hex()]])
    _, lines = await run_peer(peer_py, "client", str(port), "0", script)
    srv.close()
    assert seen == [
        bytes.fromhex("05 02 02 01 68 69"),
        bytes.fromhex("05 03 0e 02 79 6f"),
        encode(ERQ) + encode(EOF),
    ]
    assert encode(Request(2, 0, payload=b"hi")) == seen[0]
    assert encode(Request(3, 1, 3, payload=b"yo")) == seen[1]
    assert results(lines) == [(True, 0, b"hi"), (True, 3, b"yo")]
    assert lines[-1] == "CLOSED"


async def test_spec_bytes_from_real_server(
    real_server: Callable[[float], tuple[int, subprocess.Popen[bytes]]],
) -> None:
    """Raw requests in the spec's bytes get the spec's response bytes from the real server."""
    port, _ = real_server(0.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def exchange(request_hex: str, n: int) -> bytes:
        writer.write(bytes.fromhex(request_hex))
        return await asyncio.wait_for(reader.readexactly(n), WAIT_S)

    assert await exchange("05 02 02 01 68 69", 5) == bytes.fromhex("04 02 04 68 69")
    assert await exchange("05 03 0e 02 79 6f", 5) == bytes.fromhex("04 03 1c 79 6f")
    failure = bytes.fromhex("1a 04 00") + b"exception during handler"
    assert await exchange(encode(Request(4, 2)).hex(), len(failure)) == failure
    unknown = await exchange("07 82 2c 17 03 81 48 78", 1)
    unknown += await asyncio.wait_for(reader.readexactly(unknown[0]), WAIT_S)
    assert PacketDecoder().feed(unknown) == [
        Response(300, False, 0, channel=3, payload=b"unknown channel %d")
    ]
    # our EOF: it finishes, says ERQ and EOF, and closes
    writer.write(encode(EOF))
    rest = await asyncio.wait_for(reader.read(), WAIT_S)
    assert rest == encode(ERQ) + encode(EOF)
    writer.close()
