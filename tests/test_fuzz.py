"""Seeded fuzz of the listening sockets (udp, tcp, slowsignal, packetstream, http_image) of one real
`daqd serve`: at least 2,000 garbage, truncated, oversized and valid-then-corrupted inputs per
socket. After each: the daemon answers STAT, every bad input is counted (exactly, from a model of
what the receiver makes of it), no component has logged more than 20 lines, and a valid input
still gets in. (The cdtp and control sockets have their own fuzz tests.)
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daqd.errors import ProtocolError
from daqd.protocols.packetstream import (
    EndOfFile,
    EndOfRequests,
    PacketDecoder,
    Request,
    Response,
    encode,
    encode_bsuint,
)
from daqd.protocols.slowsignal import BLOCK_BYTES, MAX_BLOCKS, encode_datagram
from daqd.sim.slowsignal import TargetModules

from .conftest import Daemon, wait_until

N = 2000  # inputs per socket type
MAX_LOG_LINES = 20  # per component (logger name), for the whole daemon run
TCP_MAX = 4096
PS_MAX = 4096
HTTP_MAX = 65536

CONFIG = f"""
[daemon]
name = "fuzz"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "f_udp"
listen = "127.0.0.1:0"

[[receiver]]
type = "tcp"
name = "f_tcp"
listen = "127.0.0.1:0"
framing = "length32"
max_message_bytes = {TCP_MAX}

[[receiver]]
type = "slowsignal"
name = "f_ss"
listen = "127.0.0.1:0"
modules = 2
flush_after_s = 0.3

[[receiver]]
type = "packetstream"
name = "f_ps"
listen = "127.0.0.1:0"
max_packet_bytes = {PS_MAX}

[[receiver]]
type = "http_image"
name = "f_http"
listen = "127.0.0.1:0"
max_body_bytes = {HTTP_MAX}
read_timeout_s = 2.0
"""


@pytest.fixture(scope="module")
def fuzzd() -> Iterator[Daemon]:
    """One daemon for every test here: the log limit holds for its whole run."""
    workdir = Path(tempfile.mkdtemp(prefix="daqd-f"))
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    d = Daemon(workdir, runtime, CONFIG, "fuzz").start()
    try:
        yield d
    finally:
        code = d.stop()
        text = d.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert code == 0, text


def receiver(d: Daemon, name: str) -> dict[str, Any]:
    assert d.proc is not None and d.proc.poll() is None, d.log()
    result: dict[str, Any] = d.status()["receivers"][name]
    return result


def address(d: Daemon, name: str) -> tuple[str, int]:
    host, port = receiver(d, name)["addresses"]["listen"].rsplit(":", 1)
    return host, int(port)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in out.items() if v}


_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+\s+(\S+): ")


def log_lines_per_component(text: str) -> Counter[str]:
    """Lines per logger name; a line that starts no record (a traceback) counts for the last."""
    counts: Counter[str] = Counter()
    current = "?"
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            current = m.group(1).rstrip(":")
        counts[current] += 1
    return counts


def check_log(d: Daemon) -> None:
    counts = log_lines_per_component(d.log())
    loud = {k: n for k, n in counts.items() if n > MAX_LOG_LINES}
    assert not loud, f"components over {MAX_LOG_LINES} log lines: {loud}\n{d.log()[-6000:]}"
    assert "Traceback" not in d.log(), d.log()[-6000:]


def garbage(rng: random.Random, lo: int, hi: int) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def corrupt(rng: random.Random, data: bytes, flips: int = 3) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def paced_udp(
    d: Daemon, name: str, sent: Callable[[dict[str, Any]], int], bytes_between_checks: int
) -> Callable[[int, int], None]:
    """Returns check(n_sent, nbytes): every `bytes_between_checks` bytes, wait until the receiver
    has taken what was sent (`sent(status)` says how many inputs it accounted for), so that the
    socket buffer never overflows on a busy machine."""
    state = {"bytes": 0}

    def check(n_sent: int, nbytes: int) -> None:
        state["bytes"] += nbytes
        if state["bytes"] >= bytes_between_checks:
            state["bytes"] = 0
            wait_until(lambda: sent(receiver(d, name)) >= n_sent, 60, f"{name} to catch up")

    return check


# ----- udp ---------------------------------------------------------------------------------------


def test_udp(fuzzd: Daemon) -> None:
    """Every datagram is a record (empty, tiny, 65,507 bytes): records + kernel drops == sent."""
    rng = random.Random(1001)
    before = receiver(fuzzd, "f_udp")
    base = before["records"] + before["drops"].get("kernel", 0)

    def taken(status: dict[str, Any]) -> int:
        return int(status["records"] + status["drops"].get("kernel", 0) - base)

    check = paced_udp(fuzzd, "f_udp", taken, 48 << 10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(address(fuzzd, "f_udp"))
        for i in range(N):
            kind = rng.random()
            if kind < 0.05:
                data = b""
            elif kind < 0.07:
                data = rng.randbytes(65507)  # the largest UDP payload
            else:
                data = garbage(rng, 1, 3000)
            s.send(data)
            check(i + 1, len(data) + 64)
    wait_until(lambda: taken(receiver(fuzzd, "f_udp")) == N, 60, "every datagram accounted for")
    after = receiver(fuzzd, "f_udp")
    assert delta(before["errors"], after["errors"]) == {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"valid", address(fuzzd, "f_udp"))
    wait_until(lambda: taken(receiver(fuzzd, "f_udp")) == N + 1, 30, "a valid datagram")
    check_log(fuzzd)


# ----- tcp (length32) ----------------------------------------------------------------------------


def tcp_model(data: bytes) -> tuple[int, str | None]:
    """(records, error) the length32 framing makes of a connection that sends `data` and ends."""
    pos = records = 0
    while pos < len(data):
        if len(data) - pos < 4:
            return records, "truncated"
        (n,) = struct.unpack_from(">I", data, pos)
        if n > TCP_MAX:
            return records, "too_long"
        if len(data) - pos - 4 < n:
            return records, "truncated"
        records += 1
        pos += 4 + n
    return records, None


def tcp_input(rng: random.Random) -> bytes:
    def frame() -> bytes:
        body = garbage(rng, 0, 200)
        return struct.pack(">I", len(body)) + body

    kind = rng.randrange(5)
    if kind == 0:  # garbage
        return garbage(rng, 1, 600)
    if kind == 1:  # a valid frame cut short
        whole = frame() + frame()
        return whole[: rng.randrange(1, len(whole))]
    if kind == 2:  # oversized
        return struct.pack(">I", rng.randint(TCP_MAX + 1, 2**32 - 1)) + garbage(rng, 0, 100)
    if kind == 3:  # valid, then corrupted
        return b"".join(frame() for _ in range(rng.randint(1, 3))) + garbage(rng, 1, 100)
    return b"".join(frame() for _ in range(rng.randint(1, 3)))  # valid


async def exchange(
    addr: tuple[str, int], data: bytes, timeout_s: float = 30.0
) -> tuple[bytes, str | None]:
    """Connect, send `data`, end our side, read until the server closes: (what came back, None
    or the error that ended the connection)."""
    reader, writer = await asyncio.open_connection(*addr)
    got = bytearray()
    problem: str | None = None
    try:
        if data:
            writer.write(data)
        writer.write_eof()
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                got += chunk
    except (ConnectionError, TimeoutError) as exc:
        problem = repr(exc)
    finally:
        writer.close()
    return bytes(got), problem


async def fan_out(
    addr: tuple[str, int],
    inputs: list[bytes],
    concurrency: int = 24,
    ends: list[bool] | None = None,
) -> list[tuple[bytes, str | None]]:
    """Every input on its own connection, `concurrency` at once; `ends` given: HTTP requests,
    each connection ended by the client (half-close) where its entry is true."""
    sem = asyncio.Semaphore(concurrency)

    async def one(data: bytes, end: bool | None) -> tuple[bytes, str | None]:
        async with sem:
            if end is None:
                return await exchange(addr, data)
            return await http_exchange(addr, data, end)

    flags: list[bool | None] = [None] * len(inputs) if ends is None else list(ends)
    return await asyncio.gather(*(one(x, e) for x, e in zip(inputs, flags, strict=True)))


async def test_tcp(fuzzd: Daemon) -> None:
    rng = random.Random(2002)
    inputs = [tcp_input(rng) for _ in range(N)]
    want_records = 0
    want_errors: Counter[str] = Counter()
    for data in inputs:
        records, error = tcp_model(data)
        want_records += records
        if error:
            want_errors[error] += 1
    assert want_errors["truncated"] > 300 and want_errors["too_long"] > 300
    before = await asyncio.to_thread(receiver, fuzzd, "f_tcp")
    results = await fan_out(address(fuzzd, "f_tcp"), inputs)
    assert [p for _, p in results if p] == []

    def settled() -> bool:
        now = receiver(fuzzd, "f_tcp")
        return bool(
            now["records"] - before["records"] == want_records
            and delta(before["errors"], now["errors"]) == dict(want_errors)
        )

    await asyncio.to_thread(wait_until, settled, 60, "the tcp counters to match the model")
    ok = struct.pack(">I", 5) + b"valid"
    await exchange(address(fuzzd, "f_tcp"), ok)
    await asyncio.to_thread(
        wait_until,
        lambda: receiver(fuzzd, "f_tcp")["records"] == before["records"] + want_records + 1,
        30,
        "a valid message",
    )
    check_log(fuzzd)


# ----- slowsignal --------------------------------------------------------------------------------


def test_slowsignal(fuzzd: Daemon) -> None:
    """Bad sizes are counted exactly as errors; every block of a well-sized datagram (garbage
    TACKs included) ends in a published readout or is counted duplicate or late."""
    rng = random.Random(3003)
    before = receiver(fuzzd, "f_ss")
    pm0 = before["extra"]["modules"]
    want: Counter[str] = Counter()
    blocks = 0

    def taken(status: dict[str, Any]) -> int:
        extra = status["extra"]
        good = sum(extra["modules"]["datagrams"]) - sum(pm0["datagrams"])
        bad = sum(delta(before["errors"], status["errors"]).get(k, 0) for k in want)
        return int(good + bad)

    check = paced_udp(fuzzd, "f_ss", taken, 48 << 10)
    target = address(fuzzd, "f_ss")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as module1,  # 127.0.0.1: module 1
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
    ):
        module1.connect(target)
        stranger.bind(("127.0.0.150", 0))  # 150 % 100 = 50: no module
        stranger.connect(target)
        for i in range(N):
            kind = rng.randrange(7)
            sock = module1
            if kind == 0:
                data = b""
            elif kind == 1:  # garbage of any size but a whole number of blocks
                data = garbage(rng, 1, 3000)
                if len(data) % BLOCK_BYTES == 0:
                    data += b"x"
            elif kind == 2:  # oversized: past the largest whole number of blocks
                data = rng.randbytes(rng.randint(MAX_BLOCKS * BLOCK_BYTES + 1, 65507))
            elif kind == 3:  # garbage the size of whole blocks (random TACKs)
                data = rng.randbytes(BLOCK_BYTES * rng.randint(1, 12))
            elif kind == 4:  # valid, then cut short
                p = rng.randint(1, 10)
                tacks = [rng.randrange(1 << 40) for _ in range(p)]
                counts = [[rng.randrange(65536) for _ in range(64)] for _ in range(p)]
                whole = encode_datagram(tacks, tacks, counts)
                data = whole[: rng.randrange(1, len(whole))]
                if len(data) % BLOCK_BYTES == 0:
                    data = data[:-1]
            elif kind == 5:  # valid, then corrupted (sizes kept)
                p = rng.randint(1, 10)
                tack = rng.randrange(1 << 40)
                tacks = [tack + k * 100_000_000 for k in range(p)]
                whole = encode_datagram(tacks, tacks, [[1000] * 64] * p)
                data = corrupt(rng, whole, 4)
            else:  # well formed, from a sender that is no module
                data = encode_datagram([7], [7], [[0] * 64])
                sock = stranger
            if sock is stranger:
                want["unknown_module"] += 1
            elif not data:
                want["empty"] += 1
            elif len(data) % BLOCK_BYTES:
                want["bad_size"] += 1
            else:
                blocks += len(data) // BLOCK_BYTES
            sock.send(data)
            check(i + 1, len(data) + 64)
    wait_until(lambda: taken(receiver(fuzzd, "f_ss")) == N, 60, "every datagram accounted for")
    wait_until(lambda: receiver(fuzzd, "f_ss")["extra"]["pending_readouts"] == 0, 30, "flushed")
    after = receiver(fuzzd, "f_ss")
    assert after["drops"].get("kernel", 0) == before["drops"].get("kernel", 0)
    errors = delta(before["errors"], after["errors"])
    duplicates = errors.pop("duplicate", 0)
    assert errors == dict(want)
    pm = after["extra"]["modules"]
    assert pm["blocks"][1] - pm0["blocks"][1] == blocks
    # module 1 alone sent blocks: each published readout holds exactly one of them
    readouts = after["records"] - before["records"]
    late = pm["late"][1] - pm0["late"][1]
    assert pm["duplicates"][1] - pm0["duplicates"][1] == duplicates
    assert readouts + duplicates + late == blocks
    assert (
        after["drops"].get("incomplete_readout", 0) - before["drops"].get("incomplete_readout", 0)
        == readouts
    )
    # a valid round from modules 0 and 1 is still assembled into complete readouts
    complete = after["extra"]["readouts_complete"]
    with TargetModules(target, 2, 10) as sim:
        sim.send_round(0)
    wait_until(
        lambda: receiver(fuzzd, "f_ss")["extra"]["readouts_complete"] == complete + 10,
        30,
        "a valid round",
    )
    check_log(fuzzd)


# ----- packetstream ------------------------------------------------------------------------------


def packetstream_model(data: bytes) -> tuple[int, Counter[str]]:
    """(records, errors) the receiver makes of a connection that sends `data` (in one piece, as
    one small write on loopback arrives) and then ends."""
    errors: Counter[str] = Counter()
    decoder = PacketDecoder(PS_MAX)
    try:
        messages = decoder.feed(data) if data else []
    except ProtocolError:
        errors["protocol"] += 1
        return 0, errors
    records = 0
    erq = False
    for msg in messages:
        if isinstance(msg, Response):
            errors["unknown_response"] += 1
        elif isinstance(msg, Request):
            if erq:
                errors["after_erq"] += 1
            else:
                records += 1
        elif isinstance(msg, EndOfRequests):
            erq = True
        elif isinstance(msg, EndOfFile):
            return records, errors  # nothing after the peer's EOF is read
    try:
        decoder.feed_eof()
    except ProtocolError:
        errors["protocol"] += 1
    return records, errors


def packetstream_input(rng: random.Random, tag: int) -> bytes:
    def request(t: int) -> bytes:
        payload = garbage(rng, 0, 300)
        return encode(Request(t, rng.randrange(200), rng.randrange(40), rng.randrange(3), payload))

    kind = rng.randrange(5)
    if kind == 0:
        return garbage(rng, 1, 400)
    if kind == 1:  # cut short
        whole = request(tag)
        return whole[: rng.randrange(1, len(whole))]
    if kind == 2:  # oversized
        return encode_bsuint(rng.randint(PS_MAX + 1, 1 << 40)) + garbage(rng, 0, 50)
    valid = b"".join(request(tag + k) for k in range(rng.randint(1, 3)))
    if kind == 3:  # valid, then corrupted
        return valid + garbage(rng, 1, 60)
    return valid


async def test_packetstream(fuzzd: Daemon) -> None:
    rng = random.Random(4004)
    inputs = [packetstream_input(rng, 2 + 8 * i) for i in range(N)]
    want_records = 0
    want_errors: Counter[str] = Counter()
    for data in inputs:
        records, errors = packetstream_model(data)
        want_records += records
        want_errors.update(errors)
    assert want_errors["protocol"] > 600 and want_records > 400
    before = await asyncio.to_thread(receiver, fuzzd, "f_ps")
    results = await fan_out(address(fuzzd, "f_ps"), inputs)
    assert [p for _, p in results if p] == []

    def settled() -> bool:
        now = receiver(fuzzd, "f_ps")
        return (
            now["records"] - before["records"] == want_records
            and delta(before["errors"], now["errors"]) == dict(want_errors)
            and now["extra"]["clients"] == 0
        )

    await asyncio.to_thread(wait_until, settled, 60, "the packetstream counters to match")
    got, problem = await exchange(address(fuzzd, "f_ps"), encode(Request(2, 1, 0, 0, b"valid")))
    assert problem is None and got  # its response, then the server's EOF
    await asyncio.to_thread(
        wait_until,
        lambda: receiver(fuzzd, "f_ps")["records"] == before["records"] + want_records + 1,
        30,
        "a valid request",
    )
    check_log(fuzzd)


# ----- http_image --------------------------------------------------------------------------------

_STATUS_REASON = {
    400: {"malformed_request", "bad_body", "disconnected"},
    404: {"not_found"},
    405: {"method_not_allowed"},
    408: {"read_timeout"},
    413: {"too_large"},
    415: {"unsupported_type"},
    417: {"bad_request"},
}


def head(method: str, ctype: str, length: int | None, extra: str = "") -> bytes:
    lines = [f"{method} /img HTTP/1.1", "Host: fuzz", f"Content-Type: {ctype}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def http_input(rng: random.Random) -> tuple[bytes, bool]:
    """(bytes, whether they are a body cut short by the client ending its side)."""
    kind = rng.randrange(8)
    body = garbage(rng, 1, 2000)
    if kind == 1:  # a body cut short
        return head("POST", "image/jpeg", len(body) + 100) + body, True
    return http_request(rng, kind, body), False


def http_request(rng: random.Random, kind: int, body: bytes) -> bytes:
    if kind == 0:  # garbage, ended like a request head
        return garbage(rng, 1, 500).replace(b"\r\n\r\n", b"") + b"\r\n\r\n"
    if kind == 2:  # oversized (the head alone: refused before any body byte)
        return head("POST", "image/png", rng.randint(HTTP_MAX + 1, 1 << 40))
    if kind == 3:  # wrong type
        return head("POST", "text/html", len(body)) + body
    if kind == 4:  # another method
        return head(rng.choice(["GET", "PUT", "DELETE", "PATCH"]), "image/jpeg", 0)
    if kind == 5:  # badly chunked
        chunked = "Transfer-Encoding: chunked\r\n"
        return head("POST", "image/jpeg", None, chunked) + b"zz\r\n" + body[:50] + b"\r\n0\r\n\r\n"
    if kind == 6:  # a valid head corrupted (the body as announced)
        return corrupt(rng, head("POST", "image/jpeg", len(body)), 2) + body
    return head("POST", "image/jpeg", len(body)) + body  # valid


def http_responses(reply: bytes | bytearray) -> list[tuple[int, bool]]:
    """(status, whether the server closes after it) of every whole response in `reply`."""
    responses = []
    rest = reply
    while rest.startswith(b"HTTP/1."):
        top, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = top.split(b"\r\n")
        length = 0
        close = lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if len(rest) < length:
            break
        responses.append((int(lines[0].split(b" ", 2)[1]), close))
        rest = rest[length:]
    return responses


def http_statuses(reply: bytes) -> list[int]:
    return [status for status, _ in http_responses(reply)]


async def http_exchange(addr: tuple[str, int], data: bytes, end: bool) -> tuple[bytes, str | None]:
    """Send one request; read until the server closes or has answered with `Connection: close`
    (after a refusal it would otherwise read and discard for a while, as for a real client
    still sending its body)."""
    reader, writer = await asyncio.open_connection(*addr)
    got = bytearray()
    problem: str | None = None
    try:
        writer.write(data)
        if end:
            writer.write_eof()
        async with asyncio.timeout(30):
            while chunk := await reader.read(65536):
                got += chunk
                answers = http_responses(got)
                if answers and answers[-1][1]:
                    break
    except (ConnectionError, TimeoutError) as exc:
        problem = repr(exc)
    finally:
        writer.close()
    return bytes(got), problem


async def test_http_image(fuzzd: Daemon) -> None:
    """Each connection sends one request and reads until the server closes; one whose body is
    cut short ends its side instead, and aiohttp may then not get its 400 out (it closes on the
    client's EOF), so those are known refusals whatever comes back."""
    rng = random.Random(5005)
    inputs, cut = zip(*(http_input(rng) for _ in range(N)), strict=True)
    before = await asyncio.to_thread(receiver, fuzzd, "f_http")
    results = await fan_out(address(fuzzd, "f_http"), list(inputs), 64, list(cut))
    statuses: Counter[int] = Counter()
    refused = 0
    for (reply, problem), data, short in zip(results, inputs, cut, strict=True):
        got = http_statuses(reply)
        if short:
            assert set(got) <= {400, 408} and len(got) <= 1, (data[:200], reply[:200])
            refused += 1
            continue
        assert got and problem is None, (data[:200], reply[:200], problem)
        statuses.update(got)
        refused += sum(1 for s in got if s != 200)
    assert set(statuses) <= {200, *_STATUS_REASON}, statuses
    assert statuses[400] > 400 and statuses[413] > 150 and statuses[200] > 150

    def settled() -> bool:
        now = receiver(fuzzd, "f_http")
        errors = delta(before["errors"], now["errors"])
        return bool(
            now["records"] - before["records"] == statuses[200] and sum(errors.values()) == refused
        )

    await asyncio.to_thread(wait_until, settled, 60, "the http counters to match the answers")
    after = await asyncio.to_thread(receiver, fuzzd, "f_http")
    errors = delta(before["errors"], after["errors"])
    for status, reasons in _STATUS_REASON.items():  # each answer under its own reason
        if status not in (400, 408):  # the bodies cut short are counted under these
            assert sum(errors.get(r, 0) for r in reasons) == statuses[status], (status, errors)
    reply, _ = await http_exchange(
        address(fuzzd, "f_http"), head("POST", "image/png", 5) + b"valid", end=False
    )
    assert http_statuses(reply) == [200]
    await asyncio.to_thread(
        wait_until,
        lambda: receiver(fuzzd, "f_http")["records"] == after["records"] + 1,
        30,
        "a valid image",
    )
    check_log(fuzzd)
