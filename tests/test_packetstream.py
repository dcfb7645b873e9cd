"""PacketConnection over real streams: TCP on 127.0.0.1, socketpairs and pipes.

A "raw peer" is the other end of a socketpair read and written byte for byte with the codec, so
the tests see exactly what goes on the wire and in which order.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.packetstream import PacketConnection, RequestHandler, connect, start_server
from daqd.protocols.packetstream import (
    EOF,
    ERQ,
    Message,
    PacketDecoder,
    Request,
    Response,
    encode,
    encode_bsuint,
)
from daqd.record import Record

from .conftest import wait_for

WAIT_S = 20.0  # generous: the test box is a loaded 2-core machine


@dataclass
class Server:
    port: int
    conns: list[PacketConnection] = field(default_factory=list)


MODES = ["streams", "transport"]  # PacketConnection(reader, writer) / start_server() & connect()


@pytest.fixture(params=MODES)
async def tcp_server(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Server]]:
    servers: list[asyncio.Server] = []
    made: list[Server] = []

    async def make(handler: RequestHandler | None, **kwargs: object) -> Server:
        holder = Server(0)
        if request.param == "transport":
            srv = await start_server(
                "127.0.0.1", 0, handler, on_connect=holder.conns.append, **kwargs
            )
        else:

            async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                conn = PacketConnection(reader, writer, handler, **kwargs)  # type: ignore[arg-type]
                holder.conns.append(conn)
                await conn.serve()

            srv = await asyncio.start_server(on_client, "127.0.0.1", 0)
        servers.append(srv)
        holder.port = srv.sockets[0].getsockname()[1]
        made.append(holder)
        return holder

    yield make  # type: ignore[misc]
    for holder in made:
        for conn in holder.conns:
            if not conn.closed:
                await asyncio.wait_for(conn.close(), WAIT_S)
    for srv in servers:
        srv.close()
        await srv.wait_closed()


class RawPeer:
    """The far end of a socketpair, speaking packets by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = PacketDecoder()
        self.inbox: list[Message] = []

    def send(self, *messages: Message) -> None:
        self.writer.write(b"".join(encode(m) for m in messages))

    async def receive(self, n: int = 1) -> list[Message]:
        while len(self.inbox) < n:
            data = await asyncio.wait_for(self.reader.read(65536), WAIT_S)
            if not data:
                raise AssertionError(f"stream ended; got {self.inbox}")
            self.inbox += self.decoder.feed(data)
        got, self.inbox = self.inbox[:n], self.inbox[n:]
        return got

    async def at_end(self) -> bool:
        """True once the other side has half-closed or closed (nothing more arrives)."""
        data = await asyncio.wait_for(self.reader.read(65536), WAIT_S)
        self.inbox += self.decoder.feed(data)
        return not data


async def close_pair(conn: PacketConnection, peer: RawPeer) -> None:
    """Our side closes; the raw peer answers the handshake like a well-behaved peer."""
    closing = asyncio.ensure_future(conn.close())
    while EOF not in await peer.receive():
        pass
    peer.send(EOF)
    await asyncio.wait_for(closing, WAIT_S)
    assert "close_timeout" not in conn.errors


async def socketpair_conn(
    handler: RequestHandler | None = None, **kwargs: object
) -> tuple[PacketConnection, RawPeer]:
    a, b = socket.socketpair()
    reader_a, writer_a = await asyncio.open_connection(sock=a)
    reader_b, writer_b = await asyncio.open_connection(sock=b)
    conn = PacketConnection(reader_a, writer_a, handler, name="pair", **kwargs)  # type: ignore[arg-type]
    conn.start()
    return conn, RawPeer(reader_b, writer_b)


@pytest.fixture(params=MODES)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """Make (our connection, the raw peer at its far end): a socketpair, or TCP via start_server."""
    servers: list[asyncio.Server] = []

    async def make(
        handler: RequestHandler | None = None, **kwargs: object
    ) -> tuple[PacketConnection, RawPeer]:
        if request.param == "streams":
            return await socketpair_conn(handler, **kwargs)
        got: asyncio.Future[PacketConnection] = asyncio.get_running_loop().create_future()
        srv = await start_server(
            "127.0.0.1", 0, handler, on_connect=got.set_result, name="tcp", **kwargs
        )
        servers.append(srv)
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        return await asyncio.wait_for(got, WAIT_S), RawPeer(reader, writer)

    yield make
    for srv in servers:
        srv.close()


# ---- requests and responses ----


async def test_request_response_over_tcp(tcp_server: Callable[..., Server]) -> None:
    seen: list[Request] = []

    def handler(rq: Request) -> tuple[int, bytes]:
        seen.append(rq)
        return rq.flags + 1, rq.payload[::-1]

    server = await tcp_server(handler)
    conn = await connect("127.0.0.1", server.port)
    rsp = await asyncio.wait_for(conn.request(7, b"abc", flags=2), WAIT_S)
    assert (rsp.ok, rsp.flags, rsp.payload) == (True, 3, b"cba")
    assert seen == [Request(tag=2, rq_type=7, flags=2, channel=0, payload=b"abc")]
    await asyncio.wait_for(conn.close(), WAIT_S)
    assert conn.closed
    await wait_for(lambda: server.conns[0].closed)
    assert server.conns[0].requests_served == 1


async def test_many_in_flight_match_their_responses(tcp_server: Callable[..., Server]) -> None:
    async def handler(rq: Request) -> bytes:
        # finish out of order: later requests sometimes overtake earlier ones
        if rq.tag % 3 == 0:
            await asyncio.sleep(0)
        return rq.payload + b"!"

    server = await tcp_server(handler, max_handlers=1000)
    conn = await connect("127.0.0.1", server.port)
    payloads = [f"request {i}".encode() * (1 + i % 5) for i in range(600)]
    responses = await asyncio.wait_for(
        asyncio.gather(*(conn.request(1, p) for p in payloads)), WAIT_S
    )
    assert [r.payload for r in responses] == [p + b"!" for p in payloads]
    assert conn.in_flight == (0, 0)
    await conn.close()


async def test_large_payloads_in_flight(tcp_server: Callable[..., Server]) -> None:
    server = await tcp_server(lambda rq: rq.payload)
    conn = await connect("127.0.0.1", server.port)
    payloads = [bytes([i]) * (64 << 10) for i in range(64)]
    responses = await asyncio.wait_for(
        asyncio.gather(*(conn.request(0, p) for p in payloads)), WAIT_S
    )
    assert [r.payload for r in responses] == payloads
    await conn.close()


async def test_large_pipelined_exchange_through_small_socket_buffers(
    tcp_server: Callable[..., Server],
) -> None:
    """Both directions back up at once: neither side may stop reading while it awaits responses."""
    server = await tcp_server(lambda rq: rq.payload)
    conn = await connect("127.0.0.1", server.port)
    await wait_for(lambda: len(server.conns) == 1)
    for c in (conn, server.conns[0]):
        sock = c.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    payloads = [bytes([i]) * (256 << 10) for i in range(48)]
    responses = await asyncio.wait_for(
        asyncio.gather(*(conn.request(0, p) for p in payloads)), WAIT_S
    )
    assert [r.payload for r in responses] == payloads
    await conn.close()


@pytest.mark.parametrize("is_async", [False, True])
async def test_handler_result_kinds(is_async: bool, pair: Callable[..., Any]) -> None:
    results: dict[int, object] = {
        0: None,
        1: 5,
        2: b"raw",
        3: "text é",
        4: (9, b"both"),
        5: bytearray(b"ba"),
        6: (2, "tuple text"),
        7: 3.5,
        8: -1,
        9: True,
    }

    def sync_handler(rq: Request) -> object:
        return results[rq.rq_type]

    async def async_handler(rq: Request) -> object:
        await asyncio.sleep(0)
        return results[rq.rq_type]

    conn, peer = await pair(async_handler if is_async else sync_handler)  # type: ignore[arg-type]
    peer.send(*(Request(tag=10 + k, rq_type=k) for k in results))
    got = {m.tag - 10: m for m in await peer.receive(len(results)) if isinstance(m, Response)}
    assert got[0] == Response(10, True, 0)
    assert got[1] == Response(11, True, 5)
    assert got[2] == Response(12, True, 0, payload=b"raw")
    assert got[3] == Response(13, True, 0, payload="text é".encode())
    assert got[4] == Response(14, True, 9, payload=b"both")
    assert got[5] == Response(15, True, 0, payload=b"ba")
    assert got[6] == Response(16, True, 2, payload=b"tuple text")
    assert not got[7].ok and got[7].payload.startswith(b"handler returned float")
    assert not got[8].ok and got[8].payload == b"handler returned negative flags -1"
    assert got[9] == Response(19, True, 1)
    assert conn.errors["handler_result"] == 2
    await close_pair(conn, peer)


@pytest.mark.parametrize("is_async", [False, True])
async def test_handler_exception_gives_short_reason(
    is_async: bool, pair: Callable[..., Any]
) -> None:
    def sync_handler(rq: Request) -> None:
        raise ValueError("no such motor\n  File 'x.py', line 3")

    async def async_handler(rq: Request) -> None:
        await asyncio.sleep(0)
        sync_handler(rq)

    conn, peer = await pair(async_handler if is_async else sync_handler)
    peer.send(Request(tag=4, rq_type=0))
    [rsp] = await peer.receive()
    assert rsp == Response(4, False, 0, payload=b"ValueError: no such motor")
    assert conn.errors["handler"] == 1
    # the connection keeps serving after a failing handler
    peer.send(Request(tag=5, rq_type=0))
    [rsp] = await peer.receive()
    assert rsp.tag == 5 and not rsp.ok
    await close_pair(conn, peer)


async def test_failure_response_returned_not_raised(tcp_server: Callable[..., Server]) -> None:
    def handler(rq: Request) -> bytes:
        raise KeyError("missing")

    server = await tcp_server(handler)
    conn = await connect("127.0.0.1", server.port)
    rsp = await asyncio.wait_for(conn.request(3), WAIT_S)
    assert (rsp.ok, rsp.flags, rsp.payload) == (False, 0, b"KeyError: 'missing'")
    await conn.close()


async def test_concurrency_limit_for_handlers(pair: Callable[..., Any]) -> None:
    running = 0
    most = 0
    release = asyncio.Event()

    async def handler(rq: Request) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return rq.tag

    conn, peer = await pair(handler, max_handlers=3)
    peer.send(*(Request(tag=t, rq_type=0) for t in range(2, 12)))
    await wait_for(lambda: running == 3)
    # give the loop many turns: no fourth handler may start while three run
    for _ in range(50):
        await asyncio.sleep(0)
    assert running == 3
    assert conn.in_flight == (0, 3)
    release.set()
    got = await peer.receive(10)
    assert sorted(m.flags for m in got if isinstance(m, Response)) == list(range(2, 12))
    assert most == 3
    await close_pair(conn, peer)


async def test_flush_without_grace_and_batched() -> None:
    """Packets queued in one loop turn leave in one write on the next turn: no timer involved."""
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    conn = PacketConnection(reader, writer, name="flush")
    conn.start()
    b.setblocking(False)
    tasks = [asyncio.ensure_future(conn.request(1, b"p%d" % i)) for i in range(10)]
    for _ in range(3):
        await asyncio.sleep(0)  # loop turns, not time
    data = b.recv(65536)
    assert PacketDecoder().feed(data) == [
        Request(tag=2 + i, rq_type=1, payload=b"p%d" % i) for i in range(10)
    ]
    # answered sequentially, each response completes its request without any timer either
    b.sendall(b"".join(encode(Response(2 + i, True, i)) for i in range(10)))
    responses = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert [r.flags for r in responses] == list(range(10))
    b.close()
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)


async def test_channels_and_tags(pair: Callable[..., Any]) -> None:
    conn, peer = await pair(lambda rq: rq.channel)
    t1 = asyncio.ensure_future(conn.request(1, b"a", channel=0))
    t2 = asyncio.ensure_future(conn.request(1, b"b", channel=5))
    t3 = asyncio.ensure_future(conn.request(1, b"c", channel=5))
    got = await peer.receive(3)
    assert [(m.channel, m.tag) for m in got if isinstance(m, Request)] == [(0, 2), (5, 0), (5, 1)]
    # a response on the wrong channel does not complete a request
    peer.send(Response(0, True, 1, channel=0))
    peer.send(Response(1, True, 7, channel=5), Response(0, True, 6, channel=5))
    peer.send(Response(2, True, 4, channel=0))
    r1, r2, r3 = await asyncio.wait_for(asyncio.gather(t1, t2, t3), WAIT_S)
    assert (r1.flags, r2.flags, r3.flags) == (4, 6, 7)
    assert conn.errors["unknown_response"] == 1
    # we serve other channels too
    peer.send(Request(tag=0, rq_type=0, channel=9))
    [rsp] = await peer.receive()
    assert rsp == Response(0, True, 9, channel=9)
    await close_pair(conn, peer)


async def test_duplicate_tag_in_flight_is_rejected(pair: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def handler(rq: Request) -> bytes:
        await release.wait()
        return b"done"

    conn, peer = await pair(handler)
    peer.send(Request(tag=7, rq_type=0), Request(tag=7, rq_type=0))
    [rejected] = await peer.receive()
    assert rejected == Response(7, False, payload=b"channel 0: tag 7 already in flight")
    release.set()
    [done] = await peer.receive()
    assert done == Response(7, True, payload=b"done")
    # once answered, the tag may come again (the peer decides; we keep no history)
    peer.send(Request(tag=7, rq_type=0))
    assert await peer.receive() == [Response(7, True, payload=b"done")]
    assert conn.errors["duplicate_tag"] == 1
    await close_pair(conn, peer)


async def test_no_handler_and_after_erq(pair: Callable[..., Any]) -> None:
    conn, peer = await pair(None)
    peer.send(Request(tag=2, rq_type=0))
    assert await peer.receive() == [Response(2, False, payload=b"no request handler")]
    await close_pair(conn, peer)

    conn, peer = await pair(lambda rq: None)
    peer.send(Request(tag=2, rq_type=0), ERQ, Request(tag=3, rq_type=0))
    got = await peer.receive(2)
    assert got == [
        Response(2, True),
        Response(3, False, payload=b"requests no longer allowed (peer sent ERQ)"),
    ]
    # after its ERQ the peer still answers our requests
    task = asyncio.ensure_future(conn.request(4))
    [rq] = await peer.receive()
    assert isinstance(rq, Request)
    peer.send(Response(rq.tag, True, 1))
    assert (await asyncio.wait_for(task, WAIT_S)).flags == 1
    await close_pair(conn, peer)


# ---- ending a connection ----


async def test_close_handshake_erq_drain_eof(pair: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def handler(rq: Request) -> bytes:
        await release.wait()
        return b"late answer"

    conn, peer = await pair(handler)
    peer.send(Request(tag=2, rq_type=0))
    await wait_for(lambda: conn.in_flight == (0, 1))
    closing = asyncio.ensure_future(conn.close())
    assert await peer.receive() == [ERQ]
    with pytest.raises(ConnectionError, match="closing"):
        await conn.request(1)
    release.set()
    assert await peer.receive(2) == [Response(2, True, payload=b"late answer"), EOF]
    assert await peer.at_end()  # half-closed after EOF
    assert not closing.done()  # waits for the peer's end of the stream
    peer.send(EOF)
    await asyncio.wait_for(closing, WAIT_S)
    assert conn.closed


async def test_peer_eof_finishes_responses_then_sends_eof(pair: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def handler(rq: Request) -> bytes:
        await release.wait()
        return b"ok"

    conn, peer = await pair(handler)
    pending = asyncio.ensure_future(conn.request(5))
    assert isinstance((await peer.receive())[0], Request)
    peer.send(Request(tag=2, rq_type=0), EOF)
    # our own request can never be answered now: it fails at once, while our handler still runs
    with pytest.raises(ConnectionError, match="peer ended the connection"):
        await asyncio.wait_for(pending, WAIT_S)
    assert not conn.closed
    with pytest.raises(ConnectionError, match="peer ended the connection"):
        await conn.request(6)  # refused at once, not left waiting
    release.set()
    assert await peer.receive(2) == [Response(2, True, payload=b"ok"), EOF]
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    with pytest.raises(ConnectionError):
        await conn.request(1)


async def test_close_without_eof_fails_pending_at_once(tcp_server: Callable[..., Server]) -> None:
    """The peer goes away (FIN, no EOF packet): every waiting request fails immediately."""
    arrived = asyncio.Event()

    async def handler(rq: Request) -> None:
        arrived.set()
        await asyncio.Event().wait()  # never answers

    server = await tcp_server(handler)
    conn = await connect("127.0.0.1", server.port)
    waiting = [asyncio.ensure_future(conn.request(1)) for _ in range(5)]
    await asyncio.wait_for(arrived.wait(), WAIT_S)
    server.conns[0].transport.abort()  # the server process dies
    for task in waiting:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(task, WAIT_S)
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert conn.in_flight == (0, 0)


async def test_peer_fin_without_eof_packet_is_answered_with_eof(pair: Callable[..., Any]) -> None:
    conn, peer = await pair(lambda rq: b"r")
    peer.send(Request(tag=2, rq_type=0))
    peer.writer.write_eof()
    assert await peer.receive(2) == [Response(2, True, payload=b"r"), EOF]
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)


async def test_close_times_out_when_peer_never_ends(pair: Callable[..., Any]) -> None:
    conn, peer = await pair(None, close_timeout_s=0.3)
    pending = asyncio.ensure_future(conn.request(1))
    await peer.receive()
    await asyncio.wait_for(conn.close(), WAIT_S)
    assert conn.errors["close_timeout"] == 1
    with pytest.raises(ConnectionError):
        await pending


async def test_protocol_error_closes_only_that_connection(
    tcp_server: Callable[..., Server],
) -> None:
    server = await tcp_server(lambda rq: b"fine")
    good = await connect("127.0.0.1", server.port)
    assert (await asyncio.wait_for(good.request(1), WAIT_S)).payload == b"fine"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(bytes.fromhex("03 07 02 00"))  # malformed control packet
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    await wait_for(lambda: len(server.conns) == 2 and server.conns[1].closed)
    assert server.conns[1].errors == {"protocol": 1}
    assert (await asyncio.wait_for(good.request(1), WAIT_S)).payload == b"fine"
    writer.close()
    await good.close()


async def test_protocol_error_fails_pending_requests(pair: Callable[..., Any]) -> None:
    conn, peer = await pair(None, max_packet_bytes=1000)
    pending = asyncio.ensure_future(conn.request(1))
    await peer.receive()
    peer.writer.write(encode_bsuint(5000))  # a length over max_packet_bytes
    with pytest.raises(ConnectionError, match=r"protocol error from peer: .*max_packet_bytes=1000"):
        await asyncio.wait_for(pending, WAIT_S)
    assert conn.closed


async def test_truncated_packet_at_end_is_a_protocol_error(pair: Callable[..., Any]) -> None:
    conn, peer = await pair(lambda rq: None)
    peer.writer.write(encode(Request(2, 1, payload=b"abcdef"))[:-2])
    peer.writer.write_eof()
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert conn.errors == {"protocol": 1}


# ---- other streams, and memory ----


async def test_over_pipes_both_directions() -> None:
    loop = asyncio.get_running_loop()

    async def end(read_fd: int, write_fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
        )
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(write_fd, "wb", 0)
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    left = PacketConnection(*await end(r1, w2), lambda rq: b"left:" + rq.payload, name="left")
    right = PacketConnection(*await end(r2, w1), lambda rq: b"right:" + rq.payload, name="right")
    left.start()
    right.start()
    a, b = await asyncio.wait_for(
        asyncio.gather(left.request(0, b"x"), right.request(0, b"y")), WAIT_S
    )
    assert (a.payload, b.payload) == (b"right:x", b"left:y")
    await asyncio.wait_for(asyncio.gather(left.close(), right.close()), WAIT_S)
    assert left.closed and right.closed


async def test_memory_flat_on_a_long_connection(tcp_server: Callable[..., Server]) -> None:
    async def handler(rq: Request) -> bytes:
        return rq.payload

    server = await tcp_server(handler)
    conn = await connect("127.0.0.1", server.port, handler=lambda rq: None)

    async def burst(n: int) -> None:
        async def worker() -> None:
            for _ in range(n // 16):
                await conn.request(1, b"0123456789abcdef")

        await asyncio.gather(*(worker() for _ in range(16)))

    await asyncio.wait_for(burst(2000), WAIT_S)  # warm up caches and buffers
    tracemalloc.start()
    try:
        await asyncio.wait_for(burst(2000), WAIT_S)
        before, _ = tracemalloc.get_traced_memory()
        await asyncio.wait_for(burst(10000), WAIT_S)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the real library grows ~2.8 KB per request (28 MB here); in-flight state only stays flat
    assert after - before < 256 << 10, after - before
    server_conn = server.conns[0]
    assert conn.in_flight == (0, 0) and server_conn.in_flight == (0, 0)
    assert not server_conn._tasks and not conn._pending
    assert server_conn.requests_served == 14000
    await conn.close()


# ---- the packetstream receiver in a host ----

RECEIVER_CONFIG = """
[daemon]
name = "ps"
drain_timeout_s = 5

[[receiver]]
type = "packetstream"
name = "ps"
listen = "127.0.0.1:0"
accept_timeout_s = {accept_timeout_s}
{extra}
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
queue_size = {queue_size}
policy = "{policy}"
"""


def answer_handler(rq: Request) -> tuple[int, bytes]:
    """Used by the receiver tests as a configured `handler`."""
    return rq.rq_type * 10, b"took " + rq.payload


@dataclass
class PsHost:
    host: Host
    port: int
    sent: list[Record]
    gate: asyncio.Event


async def ps_host(
    tmp_path: Path,
    *,
    queue_size: int = 10000,
    policy: str = "block",
    accept_timeout_s: float = 5.0,
    extra: str = "",
) -> PsHost:
    text = RECEIVER_CONFIG.format(
        directory=tmp_path,
        queue_size=queue_size,
        policy=policy,
        accept_timeout_s=accept_timeout_s,
        extra=extra,
    )
    host = Host(parse_config(text, "ps.toml"))
    await host.start()
    sent: list[Record] = []
    gate = asyncio.Event()
    gate.set()
    pub = host.publishers["disk"]
    original = pub.send

    async def gated_send(records: list[Record]) -> None:
        await gate.wait()
        sent.extend(records)
        await original(records)

    pub.send = gated_send  # type: ignore[method-assign]
    port = int(host.receivers["ps"].addresses["listen"].rsplit(":", 1)[1])
    return PsHost(host, port, sent, gate)


async def test_receiver_requests_become_records_acknowledged(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path)
    conn = await connect("127.0.0.1", ps.port)
    client_port = conn.transport.get_extra_info("sockname")[1]
    payloads = [b"event %d" % i for i in range(300)]
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(conn.request(4, p, flags=1, channel=i % 2) for i, p in enumerate(payloads))
        ),
        WAIT_S,
    )
    assert all(r.ok and r.flags == 0 and r.payload == b"" for r in responses)
    await wait_for(lambda: len(ps.sent) == 300)
    assert [bytes(r.payload[0]) for r in ps.sent] == payloads
    assert [r.seq for r in ps.sent] == list(range(1, 301))
    assert ps.sent[1].tags == {
        "rq_type": 4,
        "flags": 1,
        "channel": 1,
        "peer": f"127.0.0.1:{client_port}",
    }
    rec = ps.host.receivers["ps"]
    assert rec.counters.records == 300
    assert rec.counters.extra["clients"] == 1
    assert await rec.call_command("clients", [], {}) == [
        {"name": f"ps 127.0.0.1:{client_port}", "in_flight": 0, "answered": 300, "failed": 0}
    ]
    await conn.close()
    await wait_for(lambda: rec.counters.extra["clients"] == 0)
    await ps.host.stop()


async def test_receiver_configured_handler_answers(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path, extra='handler = "tests.test_packetstream:answer_handler"')
    conn = await connect("127.0.0.1", ps.port)
    rsp = await asyncio.wait_for(conn.request(3, b"this"), WAIT_S)
    assert (rsp.ok, rsp.flags, rsp.payload) == (True, 30, b"took this")
    await wait_for(lambda: len(ps.sent) == 1)
    await conn.close()
    await ps.host.stop()


async def test_receiver_bad_handler_setting_is_a_config_error(tmp_path: Path) -> None:
    text = RECEIVER_CONFIG.format(
        directory=tmp_path,
        queue_size=10,
        policy="block",
        accept_timeout_s=1,
        extra='handler = "tests.test_packetstream:no_such_function"',
    )
    with pytest.raises(ConfigError, match="no_such_function"):
        parse_config(text, "ps.toml")


async def test_receiver_busy_when_block_publisher_stays_full(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path, queue_size=2, accept_timeout_s=0.3)
    ps.gate.clear()  # the publisher stalls: its queue fills up
    rec = ps.host.receivers["ps"]
    conn = await connect("127.0.0.1", ps.port)
    first = [await asyncio.wait_for(conn.request(0, b"r%d" % i), WAIT_S) for i in range(3)]
    assert all(r.ok for r in first)  # one in the stalled batch, two in the queue
    late = await asyncio.wait_for(
        asyncio.gather(*(conn.request(0, b"late%d" % i) for i in range(5))), WAIT_S
    )
    assert [(r.ok, r.payload) for r in late] == [(False, b"busy")] * 5
    assert rec.counters.drops["busy"] == 5
    ps.gate.set()  # the publisher catches up: requests are accepted again
    after = await asyncio.wait_for(
        asyncio.gather(*(conn.request(0, b"after%d" % i) for i in range(10))), WAIT_S
    )
    assert all(r.ok for r in after)
    await wait_for(lambda: len(ps.sent) == 13)
    # refused requests left no record behind and no hole in seq
    assert [r.seq for r in ps.sent] == list(range(1, 14))
    assert [bytes(r.payload[0]) for r in ps.sent] == [b"r0", b"r1", b"r2"] + [
        b"after%d" % i for i in range(10)
    ]
    await conn.close()
    await ps.host.stop()


async def test_receiver_waits_for_space_within_accept_timeout(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path, queue_size=1, accept_timeout_s=30)
    ps.gate.clear()
    conn = await connect("127.0.0.1", ps.port)
    tasks = [asyncio.ensure_future(conn.request(0, b"%d" % i)) for i in range(6)]
    await wait_for(lambda: sum(t.done() for t in tasks) == 2)  # one sending, one queued
    for _ in range(20):
        await asyncio.sleep(0)
    assert sum(t.done() for t in tasks) == 2
    ps.gate.set()
    responses = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert all(r.ok for r in responses)
    await wait_for(lambda: len(ps.sent) == 6)
    assert [bytes(r.payload[0]) for r in ps.sent] == [b"%d" % i for i in range(6)]
    await conn.close()
    await ps.host.stop()


async def test_receiver_drop_policy_full_is_answered(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path, queue_size=1, policy="drop")
    ps.gate.clear()
    conn = await connect("127.0.0.1", ps.port)
    got = [await asyncio.wait_for(conn.request(0, b"%d" % i), WAIT_S) for i in range(4)]
    assert [r.ok for r in got] == [True, True, False, False]
    assert got[3].payload.startswith(b"dropped")
    assert ps.host.publishers["disk"].counters.drops["queue_full"] == 2
    ps.gate.set()
    await conn.close()
    await ps.host.stop()


async def test_receiver_bad_client_counted_others_served(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path)
    good = await connect("127.0.0.1", ps.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", ps.port)
    writer.write(b"\x81" * 12)  # a BSUInt longer than 10 bytes
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    rec = ps.host.receivers["ps"]
    assert rec.counters.errors["protocol"] == 1
    assert (await asyncio.wait_for(good.request(1, b"still"), WAIT_S)).ok
    assert rec.state == "running"
    writer.close()
    await good.close()
    await ps.host.stop()


async def test_receiver_stop_says_goodbye_to_clients(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path)
    conn = await connect("127.0.0.1", ps.port)
    assert (await asyncio.wait_for(conn.request(1, b"x"), WAIT_S)).ok
    await asyncio.wait_for(ps.host.stop(), WAIT_S)
    # the server sent ERQ and EOF: our side answered with EOF and closed
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    with pytest.raises(ConnectionError):
        await conn.request(1)
    assert ps.host.receivers["ps"].counters.errors == {}


async def test_send_packets_command(tmp_path: Path) -> None:
    ps = await ps_host(tmp_path, extra='handler = "tests.test_packetstream:answer_handler"')
    source = tmp_path / "lines.txt"
    source.write_bytes(b"alpha\nbeta\n\ngamma\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daqd.cli",
        "send-packets",
        f"127.0.0.1:{ps.port}",
        str(source),
        "--rq-type",
        "2",
        "--split",
        "lines",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.decode().splitlines() == ["ok 20 took alpha", "ok 20 took beta", "ok 20 took gamma"]
    assert "3 requests, 0 failed" in err.decode()
    await wait_for(lambda: len(ps.sent) == 3)
    assert [r.tags["rq_type"] for r in ps.sent] == [2, 2, 2]

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daqd.cli",
        "send-packets",
        "127.0.0.1:1",
        "--rq-type",
        "0",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(b"x"), 60)
    assert proc.returncode == 2 and b"127.0.0.1:1" in err
    await ps.host.stop()
