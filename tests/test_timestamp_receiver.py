"""The `timestamp` receiver through real ZeroMQ from the timing-board simulator: in-process Host
(decoding, faults, reconnects, bunch gaps) and a real `daqd serve` fed by `daqd sim timestamp`."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from daqd.config import parse_config
from daqd.host import Host
from daqd.protocols.ssdaq_pb import decode_trigger_message, encode_trigger_message
from daqd.sim.timestamp import TimingBoard

from .conftest import DAQD, HostRig, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_text(tmp_path: Path, connect: str, **receiver: Any) -> str:
    lines = [
        "[daemon]",
        'name = "tstest"',
        "drain_timeout_s = 10",
        "[[receiver]]",
        'type = "timestamp"',
        'name = "ts"',
        f'connect = "{connect}"',
        'publish_to = ["out"]',
        *(f'{k} = "{v}"' for k, v in receiver.items()),
        "[[publisher]]",
        'name = "out"',
        'type = "file"',
        f'directory = "{tmp_path}"',
        'fsync = "never"',
    ]
    return "\n".join(lines) + "\n"


class Rig(HostRig):
    def __init__(self, host: Host, tmp_path: Path, endpoint: str) -> None:
        super().__init__(host, "ts", tmp_path)
        self.endpoint = endpoint


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hosts: list[Host] = []

    async def make(**receiver: Any) -> Rig:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        host = Host(parse_config(config_text(tmp_path, endpoint, **receiver), path="<test>"))
        await host.start()
        hosts.append(host)
        return Rig(host, tmp_path, endpoint)

    yield make
    for host in hosts:
        await host.stop()


async def send(board: TimingBoard, count: int, first: int = 0, **kw: Any) -> None:
    """Wait for the receiver's subscription, then send (in a thread: the loop must keep going)."""

    def go() -> None:
        assert board.wait_subscriber(30), "the receiver never subscribed"
        board.run(count, 2000.0, first=first, **kw)

    await asyncio.to_thread(go)


@pytest.mark.parametrize("fmt", ["record", "ssdaq"])
async def test_each_trigger_message_becomes_a_record_and_bad_messages_are_counted(
    rig_factory: Callable[..., Any], fmt: str
) -> None:
    rig = await rig_factory(format=fmt)
    await rig.host.begin_run("r1")
    faults = {"garbage": 1, "truncated": 2, "multipart": 1}
    with TimingBoard(rig.endpoint, per_bunch=3) as board:
        await send(board, 10, faults=faults)
        await rig.wait(
            "30 triggers and 4 refused messages",
            lambda: rig.rec.triggers == 30 and sum(rig.rec.counters.errors.values()) == 4,
        )
        await rig.host.end_run()
        records, end = rig.records("r1")
        assert len(records) == 30
        for i, (_source, seq, _t, tags, payload) in enumerate(records):
            b, j = divmod(i, 3)
            msg = board.message(b, j)
            assert seq == i + 1
            # the payload is the TriggerMessage serialized on its own, as SSDAQ published it
            assert payload == [encode_trigger_message(msg)]
            assert decode_trigger_message(payload[0]) == msg
            if fmt == "ssdaq":
                assert tags == {"format": "ssdaq"}
            else:
                assert tags["event_counter"] == 3 * b + j and tags["bunch_counter"] == b
                assert tags["time"] == {
                    "seconds": msg.time.seconds,  # type: ignore[union-attr]
                    "pico_seconds": msg.time.pico_seconds,  # type: ignore[union-attr]
                }
                assert tags["trigger_type"] == (
                    "BusyTrigger" if msg.type == 2 else "ReadoutTrigger"
                )
                assert tags["wr_status"] == "TrackPhase" and tags["pattern"] == msg.pattern
                assert tags["arrival_time"] == {
                    "seconds": board.first_second + b,
                    "pico_seconds": 5,
                }
    assert rig.rec.counters.errors == {"bad_wire_type": 1, "truncated": 2, "multipart": 1}
    assert end["condition"] == "TAINTED"
    assert rig.rec.bunches == 10 and rig.rec.empty_bunches == 0


async def test_reconnects_when_the_board_comes_back_and_counts_missed_bunches(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory()
    await rig.host.begin_run("r2")
    with TimingBoard(rig.endpoint, per_bunch=2) as board:
        await send(board, 5)  # bunches 0-4
        await rig.wait("10 triggers", lambda: rig.rec.triggers == 10)
        assert rig.rec.connected and rig.rec.connects == 1
    await rig.wait("the disconnect", lambda: rig.rec.disconnects >= 1)
    assert not rig.rec.connected
    # the board is back on the same address; it sent bunches 5-7 while we were away
    with TimingBoard(rig.endpoint, per_bunch=2) as board:
        await send(board, 4, first=8)  # bunches 8-11
        await rig.wait("18 triggers", lambda: rig.rec.triggers == 18)
        assert rig.rec.connects >= 2
    await rig.wait("the second disconnect", lambda: rig.rec.disconnects >= 2)
    # a board that restarted its count: not a gap
    with TimingBoard(rig.endpoint, per_bunch=2) as board:
        await send(board, 2, first=0)
        await rig.wait("22 triggers", lambda: rig.rec.triggers == 22)
    await rig.host.end_run()
    assert rig.rec.counters.drops == {"bunch_gap": 3}
    assert rig.rec.bunch_counter_resets == 1
    assert not rig.rec.counters.errors
    records, end = rig.records("r2")
    assert [r[3]["bunch_counter"] for r in records[::2]] == [0, 1, 2, 3, 4, 8, 9, 10, 11, 0, 1]
    assert end["condition"] == "INCOMPLETE"
    assert "bunch_gap" in " ".join(end["reasons"])
    status = rig.host.status()["receivers"]["ts"]["extra"]
    assert status["bunches"] == 11 and status["bunch_counter_resets"] == 1


async def test_a_link_zeromq_gives_up_on_after_an_oversized_message_is_connected_again(
    rig_factory: Callable[..., Any],
) -> None:
    """libzmq closes a connection that announces a message over MAXMSGSIZE and never retries it;
    the receiver notices the silence, counts it, and connects again."""
    rig = await rig_factory(max_message_bytes="4096")
    await rig.host.begin_run("big")
    with TimingBoard(rig.endpoint, per_bunch=1) as board:
        await send(board, 2)
        await rig.wait("2 triggers", lambda: rig.rec.triggers == 2)
        board.sock.send(b"\x1a" * 10_000)  # over max_message_bytes: the link goes
        await rig.wait("the dropped link", lambda: "link_dropped" in rig.rec.counters.errors)

        def resend_until_in() -> None:  # the board cannot tell when the new subscription is in
            b = 2
            while rig.rec.triggers < 3 and b < 2000:
                board.send_bunch(b)
                b += 1
                time.sleep(0.02)

        await asyncio.to_thread(resend_until_in)
        await rig.wait("triggers again", lambda: rig.rec.triggers >= 3)
    await rig.host.end_run()
    assert rig.rec.counters.errors["link_dropped"] == 1
    assert rig.rec.disconnects >= 1 and rig.rec.connects >= 2
    records, end = rig.records("big")
    assert [r[3]["bunch_counter"] for r in records][:2] == [0, 1]
    # the host's rule: a receiver error link_dropped makes the run DEGRADED (and TAINTED)
    assert "DEGRADED" in end["condition"]
    assert any("link_dropped" in r for r in end["reasons"])


async def test_empty_bunches_are_counted_not_published(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    with TimingBoard(rig.endpoint, per_bunch=0) as board:
        await send(board, 3)
        await rig.wait("3 bunches", lambda: rig.rec.bunches == 3)
    assert rig.rec.empty_bunches == 3 and rig.rec.triggers == 0
    assert rig.rec.counters.records == 0


SIM_ARGS = ["--rate", "200", "--count", "20", "--per-bunch", "4", "--truncated", "1", "--quiet"]


def test_daqd_sim_timestamp_feeds_a_daemon(daemon: Callable[..., Any], workdir: Path) -> None:
    port = free_port()
    d = daemon(
        f"""
[daemon]
name = "tsd"

[[receiver]]
type = "timestamp"
name = "timing"
connect = "tcp://127.0.0.1:{port}"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{workdir}/data"
fsync = "never"
""",
        name="tsd",
    )
    assert d.ctl("start", "t1").returncode == 0
    result = subprocess.run(
        [DAQD, "sim", "timestamp", "--bind", f"tcp://127.0.0.1:{port}", *SIM_ARGS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    def extra() -> dict[str, Any]:
        e: dict[str, Any] = d.status()["receivers"]["timing"]["extra"]
        return e

    wait_until(lambda: extra()["triggers"] == 80, what="80 TriggerMessages")
    stopped = d.ctl("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "TAINTED, 80 records" in stopped.stdout, stopped.stdout
    assert "truncated" in stopped.stdout
    with open(workdir / "data" / "run-t1.daqd", "rb") as f:
        items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    events = [i[3]["event_counter"] for i in items[1:-1]]
    assert events == list(range(80))
