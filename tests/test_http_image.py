"""http_image receiver through real HTTP on 127.0.0.1: limits, 100-continue, stalls, many clients."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.http import GrabError, grab, image_bytes
from daqd.record import Record
from daqd.runfile import read_items

from .conftest import wait_for

LIMIT = 256 * 1024
JPEG = "image/jpeg"


def host_config(**extra: object) -> str:
    lines = "\n".join(
        f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()
    )
    return f"""
[daemon]
name = "t"

[[receiver]]
type = "http_image"
name = "img"
listen = "127.0.0.1:0"
max_body_bytes = {LIMIT}
read_timeout_s = 1.0
{lines}
"""


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    h = Host(parse_config(host_config(), "<test>"))
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


def base_url(host: Host) -> str:
    return f"http://{host.receivers['img'].addresses['listen']}"


async def raw_exchange(
    host: Host, head: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    hostname, port = host.receivers["img"].addresses["listen"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(hostname, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


async def read_status(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


@pytest.mark.parametrize("size", [1, 64 * 1024, LIMIT])
async def test_posted_image_becomes_one_record(host: Host, size: int) -> None:
    image = os.urandom(size)
    grabbed = asyncio.create_task(grab("img", timeout_s=20))
    await wait_for(lambda: host.receivers["img"].grabs_waiting == 1)  # type: ignore[attr-defined]
    headers = {
        "Content-Type": JPEG,
        "DHS-Request-Type-Id": "loop-image",
        "X-Camera": "sample",
        "User-Agent": "test",
    }
    url = f"{base_url(host)}/beamline/8.3.1"
    async with aiohttp.ClientSession() as s, s.post(url, data=image, headers=headers) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["source"] == "img"
    assert answer["seq"] == 1
    record = await grabbed
    assert image_bytes(record) == image
    assert record.seq == 1
    assert record.tags["content_type"] == JPEG
    assert record.tags["length"] == size
    assert record.tags["path"] == "/beamline/8.3.1"
    assert record.tags["request_type_id"] == "loop-image"
    assert record.tags["headers"] == {"dhs-request-type-id": "loop-image", "x-camera": "sample"}
    counters = host.receivers["img"].counters
    assert (counters.records, counters.bytes, counters.errors) == (1, size, {})


async def test_png_and_chunked_upload_accepted(host: Host) -> None:
    image = os.urandom(100_000)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(image), 7000):
            yield image[i : i + 7000]

    png = {"Content-Type": "image/png"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(base_url(host), data=chunks(), headers=png) as r,
    ):
        assert r.status == 200
        assert (await r.json())["bytes"] == len(image)
    assert host.receivers["img"].counters.bytes == len(image)


async def test_over_limit_is_413_and_counted(host: Host) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            base_url(host), data=bytes(LIMIT + 1), headers={"Content-Type": JPEG}
        ) as r:
            assert r.status == 413
            assert "max_body_bytes" in (await r.json())["error"]

        # Without a Content-Length the limit is enforced while reading.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(LIMIT // 4096 + 2):
                yield bytes(4096)

        async with s.post(base_url(host), data=chunks(), headers={"Content-Type": JPEG}) as r:
            assert r.status == 413
        # The receiver is still fine afterwards.
        async with s.post(base_url(host), data=b"ok", headers={"Content-Type": JPEG}) as r:
            assert r.status == 200
    counters = host.receivers["img"].counters
    assert counters.errors == {"too_large": 2}
    assert counters.records == 1


async def test_wrong_type_is_415(host: Host) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            base_url(host), data=b"hello", headers={"Content-Type": "text/plain"}
        ) as r:
            assert r.status == 415
            assert "text/plain" in (await r.json())["error"]
        async with s.get(base_url(host)) as r:
            assert r.status == 405
    assert host.receivers["img"].counters.errors == {
        "unsupported_type": 1,
        "method_not_allowed": 1,
    }
    assert host.receivers["img"].counters.records == 0


async def test_expect_continue_too_large_answered_before_body(host: Host) -> None:
    reader, writer = await raw_exchange(
        host,
        b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n\r\n".encode(),
    )
    try:
        status, head = await read_status(reader)  # no body byte was sent
        assert status == 413
        assert b"connection: close" in head.lower()
    finally:
        writer.close()
    assert host.receivers["img"].counters.errors == {"too_large": 1}


async def test_expect_continue_accepted_then_body(host: Host) -> None:
    body = os.urandom(5000)
    reader, writer = await raw_exchange(
        host,
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode(),
    )
    try:
        status, _ = await read_status(reader)
        assert status == 100
        writer.write(body)
        status, _ = await read_status(reader)
        assert status == 200
    finally:
        writer.close()
    assert host.receivers["img"].counters.bytes == len(body)


async def test_expect_continue_wrong_type_is_415(host: Host) -> None:
    reader, writer = await raw_exchange(
        host,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/pdf\r\n"
        b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    )
    try:
        status, _ = await read_status(reader)
        assert status == 415
    finally:
        writer.close()
    reader, writer = await raw_exchange(
        host,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 10\r\nExpect: something-else\r\n\r\n",
    )
    try:
        status, _ = await read_status(reader)
        assert status == 417
    finally:
        writer.close()


async def test_stalled_client_is_dropped_and_others_go_on(host: Host) -> None:
    loop = asyncio.get_running_loop()
    # Stalls mid-body: answered 408, connection closed.
    reader, writer = await raw_exchange(
        host,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
        + bytes(10),
    )
    # Stalls mid-headers: closed without an answer.
    reader2, writer2 = await raw_exchange(host, b"POST / HTTP/1.1\r\nHost: x\r\nContent-")
    t0 = loop.time()
    try:
        # Meanwhile another client is served.
        jpeg = {"Content-Type": JPEG}
        async with (
            aiohttp.ClientSession() as s,
            s.post(base_url(host), data=b"i", headers=jpeg) as r,
        ):
            assert r.status == 200
        status, _ = await read_status(reader)
        assert status == 408
        async with asyncio.timeout(20):
            assert b"read_timeout_s" in await reader.read()  # the 408's body, then EOF
            assert await reader2.read() == b""  # closed without an answer
        assert loop.time() - t0 >= 0.9  # not before read_timeout_s
    finally:
        writer.close()
        writer2.close()
    counters = host.receivers["img"].counters
    assert counters.errors == {"read_timeout": 1}
    assert counters.records == 1


async def test_many_clients_at_once(host: Host) -> None:
    clients, per_client = 24, 5

    async def client(i: int) -> list[int]:
        seqs = []
        async with aiohttp.ClientSession() as s:
            for j in range(per_client):
                data = bytes([i]) * (1000 + j)
                async with s.post(base_url(host), data=data, headers={"Content-Type": JPEG}) as r:
                    assert r.status == 200
                    seqs.append((await r.json())["seq"])
        return seqs

    results = await asyncio.gather(*(client(i) for i in range(clients)))
    seqs = sorted(s for r in results for s in r)
    assert seqs == list(range(1, clients * per_client + 1))  # gap-free, none lost
    counters = host.receivers["img"].counters
    assert counters.records == clients * per_client
    assert counters.bytes == clients * sum(1000 + j for j in range(per_client))
    assert counters.errors == {}


async def test_grab_errors_are_clear(host: Host) -> None:
    with pytest.raises(GrabError, match=r"no receiver named 'nope' \(receivers: img\)"):
        await grab("nope")
    with pytest.raises(GrabError, match=r"no image from 'img' within 0\.2 s"):
        await grab("img", timeout_s=0.2)


async def test_grab_outside_a_host_is_an_error() -> None:
    with pytest.raises(GrabError, match="no daqd host"):
        await grab("img")


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="listen"):
        parse_config(host_config().replace('"127.0.0.1:0"', '"nowhere"'), "<test>")
    with pytest.raises(ConfigError, match="max_body_bytes"):
        parse_config(host_config().replace(f"= {LIMIT}", "= 0"), "<test>")
    with pytest.raises(ConfigError, match="allowed_types"):
        parse_config(host_config(allowed_types=[]), "<test>")


async def test_images_land_in_a_run_file(tmp_path: Path) -> None:
    config = (
        host_config(publish_to=["disk"])
        + f"""
[[publisher]]
type = "file"
name = "disk"
directory = "{tmp_path}"
"""
    )
    host = Host(parse_config(config, "<test>"))
    await host.start()
    images = [os.urandom(n) for n in (10, 70_000, LIMIT)]
    try:
        await host.begin_run("r1")
        async with aiohttp.ClientSession() as s:
            for i, image in enumerate(images):
                headers = {"Content-Type": JPEG, "X-Frame": str(i)}
                async with s.post(base_url(host), data=image, headers=headers) as r:
                    assert r.status == 200
                    assert (await r.json())["delivered"] is True
        await host.end_run()
    finally:
        await host.stop()
    files = sorted(tmp_path.glob("*r1*"))
    records = [item for f in files for item in read_items(f) if isinstance(item, Record)]
    assert [image_bytes(r) for r in records] == images
    assert [r.tags["headers"]["x-frame"] for r in records] == ["0", "1", "2"]
    assert [r.seq for r in records] == [1, 2, 3]


async def test_malformed_requests_are_counted_and_logged_in_a_few_lines(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp answers a malformed request 400 itself: each is counted, and its traceback is
    not logged (a flood of them gives a few lines, not one traceback per request)."""
    caplog.set_level(logging.INFO)
    rec = host.receivers["img"]
    bad = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to an HTTP port
        b"POST / HTTP/1.1\r\nContent-Type: image/jpeg\r\nContent-Length: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /\x00 HTTP/1.1\r\n\r\n",
        b"POST / HTTP/9\r\n\r\n",
    ] * 20
    for head in bad:
        reader, writer = await raw_exchange(host, head)
        status, _ = await read_status(reader)
        assert status == 400
        writer.close()
    for method in ("GET", "PUT", "DELETE"):
        reader, writer = await raw_exchange(
            host, f"{method} /x HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        status, _ = await read_status(reader)
        assert status == 405, method
        writer.close()
    errors = rec.counters.errors
    assert errors == {"malformed_request": len(bad), "method_not_allowed": 3}
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert not [r for r in caplog.records if r.exc_info]
    mine = [r for r in caplog.records if r.name == rec.log.name and r.levelno >= logging.INFO]
    assert 2 <= len(mine) <= 8, [r.getMessage() for r in mine]
    assert "img: malformed request from 127.0.0.1 refused (400): " in mine[0].getMessage()
    # and a good image still goes in
    async with (
        aiohttp.ClientSession() as s,
        s.post(base_url(host), data=b"img", headers={"Content-Type": JPEG}) as r,
    ):
        assert r.status == 200
    assert rec.counters.records == 1
