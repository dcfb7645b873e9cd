"""Reconfiguration: untouched receivers keep running and lose nothing; bad files change nothing."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.runfile import verify

from .conftest import Daemon, wait_for, wait_until

BASE = """
[daemon]
name = "{name}"

[[receiver]]
type = "udp"
name = "steady"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
"""

EXTRA = """
[[receiver]]
type = "tcp"
name = "extra"
listen = "127.0.0.1:0"
framing = "line"
publish_to = ["disk"]
"""


async def test_untouched_udp_receiver_loses_nothing_across_reconfigure(tmp_path: Path) -> None:
    text = BASE.format(name="rc", directory=tmp_path)
    host = Host(parse_config(text, "rc.toml"))
    await host.start()
    steady = host.receivers["steady"]
    h, p = steady.addresses["listen"].rsplit(":", 1)
    await host.begin_run("rc1")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0

    async def stream(stop: asyncio.Event) -> None:
        nonlocal sent
        while not stop.is_set():
            for _ in range(50):
                tx.sendto(sent.to_bytes(8, "big"), (h, int(p)))
                sent += 1
            await asyncio.sleep(0)

    stop = asyncio.Event()
    task = asyncio.create_task(stream(stop))
    await wait_for(lambda: sent >= 2000, 30, "2000 datagrams sent")
    changed = await host.reconfigure(text + EXTRA)
    assert changed == ["receiver extra"]
    assert host.receivers["steady"] is steady and steady.state == "running"
    with pytest.raises(ConfigError, match='key "framing"'):
        await host.reconfigure(text + EXTRA.replace('"line"', '"lines"'))
    assert set(host.receivers) == {"steady", "extra"}
    start = sent
    await wait_for(lambda: sent >= start + 2000, 30, "2000 more datagrams sent")
    stop.set()
    await task

    def accounted() -> bool:
        steady.sample()
        return steady.counters.records + steady.counters.drops.get("kernel", 0) == sent

    await wait_for(accounted, 30, "every datagram accounted for")
    await host.end_run()
    await host.stop()
    tx.close()
    summary = verify(tmp_path / "run-rc1.daqd")
    assert summary.problems == [] and summary.gaps == {}
    assert summary.records["steady"] == steady.counters.records
    assert steady.counters.drops.get("kernel", 0) == 0


def test_sighup_reloads_the_file_and_a_bad_file_changes_nothing(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    text = BASE.format(name="hup", directory=workdir / "d")
    d = daemon(text, name="hup")
    d.config_path.write_text(text + EXTRA)
    d.signal(signal.SIGHUP)
    wait_until(lambda: "extra" in d.status()["receivers"], 30, "the new receiver")
    steady_addr = d.status()["receivers"]["steady"]["addresses"]["listen"]
    d.config_path.write_text(text + "[[receiver]]\ntype = 'udp'\nname = 'broken'\n")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the running configuration" in d.log(), 30, "the refusal")
    st = d.status()
    assert set(st["receivers"]) == {"steady", "extra"}
    assert st["receivers"]["steady"]["addresses"]["listen"] == steady_addr
    assert 'key "listen": required key is missing' in d.log()
    assert d.stop() == 0


def test_under_systemd_log_lines_carry_no_timestamp(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    d = daemon(BASE.format(name="jr", directory=workdir / "d"), name="jr", start=False)
    d.env["JOURNAL_STREAM"] = "8:12345"
    d.start()
    runtime = d.runtime
    assert (runtime / "jr.tap").exists()
    assert d.stop() == 0
    assert not (runtime / "jr.tap").exists() and not (runtime / "jr.ctl").exists()
    lines = [ln for ln in d.log().splitlines() if ln.strip()]
    assert lines and all(ln.startswith("daqd.") for ln in lines), lines[:3]


async def test_a_reconfigure_that_fails_part_way_restores_the_running_configuration(
    tmp_path: Path,
) -> None:
    text = BASE.format(name="rb", directory=tmp_path)
    host = Host(parse_config(text, "rb.toml"))
    await host.start()
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    steady = host.receivers["steady"]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def send_and_count(n: int) -> None:
        rec = host.receivers["steady"]
        h, p = rec.addresses["listen"].rsplit(":", 1)
        before = rec.counters.records
        for i in range(n):
            tx.sendto(b"%d" % i, (h, int(p)))
        await wait_for(lambda: rec.counters.records == before + n, 30, f"{n} more records")

    await send_and_count(10)
    # change the steady receiver and add one that cannot bind: the change must be undone
    changed = text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nrcvbuf_bytes = 65536')
    bad = changed + EXTRA.replace("127.0.0.1:0", f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="the previous configuration is running"):
        await host.reconfigure(bad)
    restored = host.receivers["steady"]
    assert set(host.receivers) == {"steady"}
    assert restored.settings.rcvbuf_bytes == 8 << 20 and restored.state == "running"
    assert host.config.text == text
    await send_and_count(10)
    assert restored.counters is steady.counters and restored._seq["steady"] == 20
    await host.stop()
    busy.close()
    tx.close()
