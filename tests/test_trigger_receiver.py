"""The `trigger` receiver through real UDP from the backplane simulator: in-process Host and a
real `daqd serve` with `daqd sim trigger` and `daqctl tap`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.protocols.trigger import decode, encode_v1
from daqd.sim.trigger import FAULTS, TriggerSource

from .conftest import DAQD, wait_for, wait_until


def config_text(tmp_path: Path, publisher: str = "file", **receiver: Any) -> str:
    lines = [
        "[daemon]",
        'name = "trigtest"',
        "drain_timeout_s = 10",
        "[[receiver]]",
        'type = "trigger"',
        'name = "trig"',
        'listen = "127.0.0.1:0"',
        'publish_to = ["out"]',
        *(f'{k} = "{v}"' for k, v in receiver.items()),
        "[[publisher]]",
        'name = "out"',
    ]
    if publisher == "file":
        lines += ['type = "file"', f'directory = "{tmp_path}"', 'fsync = "never"']
    else:
        lines += [
            'type = "zmq"',
            'endpoint = "tcp://127.0.0.1:0"',
            'framing = "payload"',
            'policy = "block"',
        ]
    return "\n".join(lines) + "\n"


class Rig:
    def __init__(self, host: Host, tmp_path: Path) -> None:
        self.host = host
        self.rec: Any = host.receivers["trig"]
        self.tmp_path = tmp_path
        h, port = self.rec.addresses["listen"].rsplit(":", 1)
        self.target = (h, int(port))

    def sim(self, **kw: Any) -> TriggerSource:
        return TriggerSource(self.target, **kw)

    async def wait(self, what: str, cond: Callable[[], bool]) -> None:
        try:
            await wait_for(cond, 30.0, what)
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.rec.cmd_stats()}") from None

    def run_file(self, run_id: str) -> list[Any]:
        with open(self.tmp_path / f"run-{run_id}.daqd", "rb") as f:
            return list(msgpack.Unpacker(f, raw=False, strict_map_key=False))


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hosts: list[Host] = []

    async def make(publisher: str = "file", **receiver: Any) -> Rig:
        host = Host(parse_config(config_text(tmp_path, publisher, **receiver), path="<test>"))
        await host.start()
        hosts.append(host)
        return Rig(host, tmp_path)

    yield make
    for host in hosts:
        await host.stop()


async def test_every_packet_type_is_decoded_and_bad_packets_are_counted_by_reason(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory()
    await rig.host.begin_run("t1")
    n = 80
    faults = dict.fromkeys(FAULTS, 2)
    with rig.sim(readout_length=48) as sim:
        sent = await asyncio.to_thread(sim.run, n, 2000.0, faults)
        assert sent.injected == faults and sent.per_type == {0: 20, 1: 20, 2: 20, 3: 20}
        await rig.wait(
            f"{n} packets and {2 * len(FAULTS)} refused",
            lambda: (
                sum(rig.rec.per_type.values()) == n
                and sum(rig.rec.counters.errors.values()) == 2 * len(FAULTS)
            ),
        )
        await rig.host.end_run()
        items = rig.run_file("t1")
        records = [i for i in items[1:-1] if i[0] == "trig"]
        assert len(records) == n
        for k, (_source, seq, _time_ns, tags, payload) in enumerate(records):
            assert seq == k + 1
            assert payload == [sim.packet(k)]  # the packet, unchanged
            ptype = sim.packet_type(k)
            assert tags["type"] == ("nominal_v1", "busy_v1", "v2", "v3")[ptype]
            assert tags["tack"] == sim.tack(k) and tags["phase"] == k % 8
            counters = (tags["ro_count"], tags["pps_count"], tags["clock_count"])
            assert counters == sim.counters(k)
            assert tags["busy"] is sim.busy(k)
            assert tags["readout_length"] == (16 if ptype <= 1 else 48)
            assert tags["trigger_sps"] == sim.trigger_sps(k)
            assert tags["sps"] == sorted([*sim.trigger_sps(k), sim.other_sp(k)])
            assert re.fullmatch(r"127\.0\.0\.1:\d+", tags["peer"])
    # refused packets are errors (the run is TAINTED), each under its own reason
    assert rig.rec.counters.errors == dict.fromkeys(FAULTS, 2)
    assert not any(rig.rec.counters.drops.values())
    assert items[-1]["end"]["condition"] == "TAINTED"
    stats = rig.rec.cmd_stats()
    assert stats["packets"] == {"nominal_v1": 20, "busy_v1": 20, "v2": 20, "v3": 20}
    assert stats["busy"] == 20 + sum(1 for k in range(n) if sim.packet_type(k) >= 2 and k % 5 == 0)
    assert stats["last_tack"] == sim.tack(n - 1)
    status = rig.host.status()["receivers"]["trig"]
    assert status["errors"]["bad_magic"] == 2 and status["extra"]["packets"]["v3"] == 20


async def test_a_packet_whose_patterns_name_sps_outside_its_union_is_kept_and_counted(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory()
    await rig.host.begin_run("um")
    pat = np.zeros((16, 512), dtype=bool)
    pat[2, [10, 20]] = True
    union = np.zeros(512, dtype=bool)
    union[10] = True  # SP 20 triggered but is not in the union
    bad = encode_v1(77, 2, pat, union=union)
    with rig.sim() as sim:
        sim.send(bad)
        sim.send(sim.packet(0))
        await rig.wait("2 packets", lambda: sum(rig.rec.per_type.values()) == 2)
    await rig.host.end_run()
    items = rig.run_file("um")
    records = [i for i in items[1:-1] if i[0] == "trig"]
    assert [r[4] for r in records] == [[bad], [sim.packet(0)]]
    assert records[0][3]["union_mismatch"] is True and records[0][3]["sps"] == [10]
    assert "union_mismatch" not in records[1][3]
    assert rig.rec.counters.errors == {"union_mismatch": 1}
    assert items[-1]["end"]["condition"] == "TAINTED"


async def test_long_v3_windows_are_published_with_their_real_length(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory()
    await rig.host.begin_run("long")
    with rig.sim(types=(3,), readout_length=4096) as sim:
        for k in range(4):
            sim.send(sim.packet(k))
        await rig.wait("4 packets", lambda: rig.rec.per_type["v3"] == 4)
        await rig.host.end_run()
        records = [i for i in rig.run_file("long")[1:-1] if i[0] == "trig"]
        assert [r[3]["readout_length"] for r in records] == [4096] * 4
        assert all(r[3]["window_beyond_field"] is True for r in records)
        assert [r[3]["trigger_sps"] for r in records] == [sim.trigger_sps(k) for k in range(4)]
        assert decode(records[0][4][0]).pattern_array().shape == (4096, 512)
    assert rig.rec.beyond_field == 4 and not rig.rec.counters.errors
    assert rig.run_file("long")[-1]["end"]["condition"] == "GOOD"


async def test_ssdaq_format_relays_each_payload_unchanged_on_a_pub(
    rig_factory: Callable[..., Any],
) -> None:
    """A drop-in for SSDAQ's PUB 9002: a SUB gets every packet byte for byte, as one frame."""
    rig = await rig_factory(publisher="zmq", format="ssdaq")
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(rig.host.publishers["out"].addresses["endpoint"])
    try:
        with rig.sim(tack_start_ns=5) as primer:
            # a PUB drops what it sends before the subscription arrives: prime until one arrives
            k = 0
            while not await sub.poll(100):
                primer.send(primer.packet(k))
                k += 1
                assert k < 300, "subscription never arrived"
        while await sub.poll(300):
            await sub.recv()
        with rig.sim(tack_start_ns=10**15) as sim:
            sent = [sim.packet(k) for k in range(40)]
            for data in sent:
                sim.send(data)
            got: list[bytes] = []
            while len(got) < len(sent):
                frames = await asyncio.wait_for(sub.recv_multipart(), 30)
                assert len(frames) == 1
                if decode(frames[0]).tack >= 10**15:  # skip a straggler of the primer
                    got.append(frames[0])
        assert got == sent
    finally:
        sub.close(0)
        ctx.term()
    assert not rig.rec.counters.errors and not any(rig.rec.counters.drops.values())


def test_daqctl_tap_shows_what_a_trigger_was(daemon: Callable[..., Any], workdir: Path) -> None:
    """A real `daqd serve`, fed by `daqd sim trigger`; `daqctl tap` prints the decoded tags."""
    d = daemon(
        f"""
[daemon]
name = "trg"

[[receiver]]
type = "trigger"
name = "trig"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{workdir}/data"
fsync = "never"
""",
        name="trg",
    )
    listen = d.status()["receivers"]["trig"]["addresses"]["listen"]
    sim = subprocess.Popen(
        [DAQD, "sim", "trigger", "--target", listen, "--rate", "50", "--types", "2", "--quiet"],
        stderr=subprocess.PIPE,
    )
    try:
        # the tap sees records published after it subscribed: the simulator keeps sending
        tap = d.ctl("tap", "trig", "--count", "3", timeout_s=60)
        assert tap.returncode == 0, tap.stderr
    finally:
        sim.terminate()
        sim.wait(30)
    lines = tap.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        tags = json.loads(re.search(r"(\{.*\})", line).group(1))  # type: ignore[union-attr]
        assert tags["type"] == "v2" and 0 <= tags["phase"] <= 7
        assert tags["readout_length"] == 64 and len(tags["trigger_sps"]) == 2
        assert tags["tack"] > 1_000_000_000_000_000_000 and "ro_count" in tags
    wait_until(
        lambda: d.status()["receivers"]["trig"]["extra"]["packets"]["v2"] >= 3,
        what="packets counted",
    )
    assert not d.status()["receivers"]["trig"]["errors"]


def test_sim_trigger_faults_through_the_cli(daemon: Callable[..., Any], workdir: Path) -> None:
    d = daemon(
        """
[daemon]
name = "trf"

[[receiver]]
type = "trigger"
name = "trig"
listen = "127.0.0.1:0"
""",
        name="trf",
    )
    listen = d.status()["receivers"]["trig"]["addresses"]["listen"]
    args = ["--target", listen, "--rate", "2000", "--count", "40", "--quiet"]
    faults = ["--bad-magic", "1", "--short", "2", "--bad-phase", "1", "--unknown-type", "1"]
    result = subprocess.run(
        [DAQD, "sim", "trigger", *args, *faults, "--bad-length", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    def trig() -> dict[str, Any]:
        status: dict[str, Any] = d.status()["receivers"]["trig"]
        return status

    wait_until(
        lambda: sum(trig()["extra"]["packets"].values()) == 40 and len(trig()["errors"]) == 5,
        what="40 packets and 5 kinds of refused ones",
    )
    assert trig()["errors"] == {
        "bad_magic": 1, "short": 2, "bad_phase": 1, "unknown_type": 1, "bad_length": 1,
    }  # fmt: skip
    assert trig()["extra"]["packets"] == {"nominal_v1": 10, "busy_v1": 10, "v2": 10, "v3": 10}
    # a V2 window that cannot fit a datagram is refused by the simulator with a clear message
    too_long = subprocess.run(
        [DAQD, "sim", "trigger", "--target", listen, "--types", "2", "--readout-length", "4096"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert too_long.returncode == 1 and "exceeds a UDP datagram" in too_long.stderr


@pytest.mark.parametrize(
    ("receiver", "key"),
    [
        ('type = "trigger"\nname = "t"\nformat = "raw"', "format"),
        ('type = "trigger"\nname = "t"\nlisten = "nowhere"', "listen"),
        ('type = "timestamp"\nname = "t"\nconnect = "127.0.0.1:6666"', "connect"),
        ('type = "timestamp"\nname = "t"\nrcvhwm = -1', "rcvhwm"),
    ],
)
def test_bad_settings_are_refused_with_the_key(receiver: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(f"[[receiver]]\n{receiver}\n", path="<test>")
    assert key in str(exc.value)
