"""The dcss receiver (a DHS) against the DCSS simulator, through real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from daqd.config import parse_config
from daqd.dhs import Operation, OperationError, operation
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.protocols import dcss as d
from daqd.sim.dcss import DcssSimulator, DhsLink, SimDevice

from .conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
T = 20.0  # generous timeout for every wait: the test box is a loaded 2-core machine

# ------------------------------------------------------------------ handlers under test

GATES: dict[str, asyncio.Event] = {}


@operation("echo")
async def echo(op: Operation) -> None:
    op.update(*op.args)
    op.complete("normal", *op.args)


@operation("hold")
async def hold(op: Operation) -> None:
    op.update("holding", op.args_raw)
    await GATES["hold"].wait()
    op.complete("normal", "released", op.args_raw)


@operation("slow")
async def slow(op: Operation) -> None:
    op.update("started")
    await asyncio.sleep(3600)


@operation("polite")
async def polite(op: Operation) -> None:
    op.update("started")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        op.complete("stopped_by_abort", "cleaned up")
        raise


@operation("fail")
async def fail(op: Operation) -> None:
    raise ValueError("the sample is missing")


@operation("twice")
async def twice(op: Operation) -> None:
    op.complete("normal", 1)
    try:
        op.complete("normal", 2)
    except OperationError:
        op.data["refused"] = True
        raise


@operation("answer")
async def answer(op: Operation) -> tuple[float, str]:
    return 1.5, "two words"


@operation("plain_echo")
def plain_echo(op: Operation) -> None:  # a plain def: runs at once, no task
    op.update(*op.args)
    op.complete("normal", *op.args)


@operation("plain_answer")
def plain_answer(op: Operation) -> tuple[int, str]:
    return 3, "plain words"


@operation("plain_fail")
def plain_fail(op: Operation) -> None:
    raise KeyError("no such register")


@operation("plain_later")
def plain_later(op: Operation) -> Any:  # a plain def handing back something to await
    return hold(op)


SEEN: dict[str, Operation] = {}


@operation("settings")
async def show_settings(op: Operation) -> tuple[Any, ...]:
    SEEN[op.handle] = op
    s = op.settings
    return s.get("camera", "none"), s.get("limits", {}).get("grab_s", 0), len(s.get("names", ()))


# ------------------------------------------------------------------ fixtures


def devices() -> list[SimDevice]:
    return [
        SimDevice("real_motor", "sample_x", position=5.0, upper_limit=50.0, lower_limit=-50.0),
        SimDevice("real_motor", "table_y"),
        SimDevice("shutter", "shutter", state="closed"),
        SimDevice("ion_chamber", "i0", hardware_name="counter1"),
        SimDevice("encoder", "enc"),
        SimDevice("string", "note"),
        SimDevice("operation", "echo"),
        SimDevice("operation", "orphan"),
    ]


def dhs_config(sim: DcssSimulator, level: int = 2, extra: str = "", dhs_name: str = "dhs") -> str:
    return f"""
[daemon]
name = "t"

[[receiver]]
type = "dcss"
name = "dhs"
connect = "{sim.address}"
dhs_name = "{dhs_name}"
protocol_level = {level}
handlers = ["tests.test_dcss"]
reconnect_first_s = 0.05
{extra}

[receiver.motors.sample_x]
speed_units_per_s = 40.0
update_interval_s = 0.005

[receiver.motors.table_y]
owns_configuration = true
position = 2.5
upper_limit = 9.0
lower_limit = -9.0

[receiver.ion_chambers.i0]
rate_hz = 1000.0
"""


@pytest.fixture
async def sim() -> AsyncIterator[DcssSimulator]:
    GATES["hold"] = asyncio.Event()
    async with DcssSimulator({"dhs": 2, "dhs1": 1}, devices(), duplicate_close_s=0.2) as s:
        yield s


@pytest.fixture
async def host(sim: DcssSimulator) -> AsyncIterator[Host]:
    h = Host(parse_config(dhs_config(sim), "<test>"))
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def slow_motor_host(sim: DcssSimulator) -> AsyncIterator[Host]:
    """The host, its sample_x moving at 1 unit/s: a 40-unit move is surely still under way when
    the test acts (at 40/s, one second on a loaded machine could see it end first)."""
    text = dhs_config(sim).replace("speed_units_per_s = 40.0", "speed_units_per_s = 1.0")
    h = Host(parse_config(text, "<test>"))
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


async def online(sim: DcssSimulator, name: str = "dhs", after: int = 0) -> DhsLink:
    link = await sim.wait_online(name, timeout=T, after=after)
    # registrations are answered once the DHS is reading: wait for the configuration request
    await link.wait_for(lambda m: isinstance(m, d.HtosSendConfiguration), T)
    return link


async def done(op: Any) -> str:
    return str(await asyncio.wait_for(asyncio.shield(op.done), T))


# ------------------------------------------------------------------ handshake and levels


@pytest.mark.parametrize("level", [1, 2])
async def test_handshake_and_operation_at_each_protocol_level(level: int) -> None:
    GATES["hold"] = asyncio.Event()
    name = "dhs1" if level == 1 else "dhs"
    devs = [SimDevice("real_motor", "sample_x", dhs=name)]
    async with DcssSimulator({"dhs": 2, "dhs1": 1}, devs) as sim:
        h = Host(parse_config(dhs_config(sim, level=level, dhs_name=name), "<test>"))
        await h.start()
        try:
            link = await online(sim, name)
            assert link.level == level
            # the reply is one 200-byte v1 frame whatever the level, and the first thing sent
            assert link.handshake_reply == d.encode_v1(f"htos_client_is_hardware {name}")
            assert isinstance(link.received[0], d.HtosSendConfiguration)
            op = link.start_operation("echo", "3 {two words} x")
            assert await done(op) == "normal"
            assert op.updates == ["3 {two words} x"]
            assert op.completion is not None and op.completion.args == "3 {two words} x"
            assert sim.protocol_errors == []
        finally:
            await h.stop()


class TimedEvents(list[tuple[int, str]]):
    """The simulator's event list, also noting when each event happened."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: tuple[int, str]) -> None:
        self.times.append(time.monotonic())
        super().append(item)

    def times_of(self, what: str) -> list[float]:
        return [t for t, (_, e) in zip(self.times, self, strict=True) if e == what]


async def test_unknown_name_is_rejected_and_retried_with_backoff(sim: DcssSimulator) -> None:
    events = sim.events = TimedEvents()
    h = Host(
        parse_config(dhs_config(sim, dhs_name="nobody", extra="rejected_backoff_s = 0.1"), "<test>")
    )
    await h.start()
    try:
        rx = h.receivers["dhs"]

        def refusals() -> int:
            return sum(e == "unknown_name" for _, e in events)

        # every refusal DCSS made is counted once, nothing else: exact once the DHS has seen
        # the close (it then waits its backoff before the next try)
        await wait_for(
            lambda: refusals() >= 3 and rx.counters.errors == {"rejected": refusals()},
            T,
            "three attempts, each counted rejected",
        )
        assert rx.state == "running"
    finally:
        await h.stop()
    # a refused name is retried only after rejected_backoff_s (a lower bound: load only adds)
    tries = events.times_of("unknown_name")
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(tries)), tries


async def test_duplicate_name_is_closed_after_a_delay_and_backed_off(
    sim: DcssSimulator, host: Host
) -> None:
    await online(sim)
    extra = "rejected_backoff_s = 0.1"
    second = Host(
        parse_config(dhs_config(sim, extra=extra).replace('name = "t"', 'name = "u"'), "<t>")
    )
    await second.start()
    try:
        duplicates = lambda: sum(e == "duplicate" for _, e in sim.events)  # noqa: E731
        await wait_for(
            lambda: (
                duplicates() >= 1
                and second.receivers["dhs"].counters.errors == {"rejected": duplicates()}
            ),
            T,
            "each duplicate connection counted rejected",
        )
        assert sim.online["dhs"].id == 1  # the first DHS is untouched
    finally:
        await second.stop()


async def test_silent_server_gets_nothing_and_the_dhs_retries() -> None:
    got: list[bytes] = []
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read())  # until the DHS gives up and closes
        accepted.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    text = f"""
[daemon]
name = "t"

[[receiver]]
type = "dcss"
name = "dhs"
connect = "127.0.0.1:{port}"
dhs_name = "dhs"
handshake_timeout_s = 0.2
reconnect_first_s = 0.05
"""
    h = Host(parse_config(text, "<test>"))
    await h.start()
    try:
        await asyncio.wait_for(accepted.wait(), T)
        rx = h.receivers["dhs"]
        # each connection the server saw end was one handshake timeout, counted once
        await wait_for(
            lambda: rx.counters.errors == {"handshake_timeout": len(got)}, T, "timeouts counted"
        )
        assert got and all(g == b"" for g in got)  # nothing at all before stoc_send_client_type
    finally:
        await h.stop()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ operations


async def test_fifty_operations_in_flight_with_updates_and_completions(
    sim: DcssSimulator, host: Host
) -> None:
    link = await online(sim)
    rx: Any = host.receivers["dhs"]
    ops = [link.start_operation("hold", f"n{i}") for i in range(50)]
    await wait_for(lambda: all(op.updates for op in ops), T, "50 updates")
    assert len(rx.dhs.operations) == 50
    assert all(op.updates == [f"holding n{i}"] for i, op in enumerate(ops))
    assert all(op.status is None for op in ops)
    GATES["hold"].set()
    statuses = await asyncio.gather(*(done(op) for op in ops))
    assert statuses == ["normal"] * 50
    for i, op in enumerate(ops):
        assert op.completion is not None and op.completion.args == f"released n{i}"
    await wait_for(lambda: not rx.dhs.operations, T, "operation table empty")
    assert sim.stray_completions == []


async def test_slow_handlers_do_not_delay_abort_all(
    sim: DcssSimulator, slow_motor_host: Host
) -> None:
    link = await online(sim)
    slow_ops = [link.start_operation("slow", str(i)) for i in range(5)]
    polite_op = link.start_operation("polite")
    await wait_for(lambda: all(op.updates for op in [*slow_ops, polite_op]), T, "handlers running")
    link.move_motor("sample_x", 45.0)
    await link.wait_for(lambda m: isinstance(m, d.HtosUpdateMotorPosition) and m.position > 5.0, T)
    link.abort_all("soft")
    assert await asyncio.gather(*(done(op) for op in slow_ops)) == ["aborted"] * 5
    assert await done(polite_op) == "stopped_by_abort"
    assert polite_op.completion is not None and polite_op.completion.args == "{cleaned up}"
    moved = await link.wait_for(lambda m: isinstance(m, d.HtosMotorMoveCompleted), T)
    assert isinstance(moved, d.HtosMotorMoveCompleted) and moved.status == "aborted"
    assert 5.0 < moved.position < 45.0
    # an operation started after the abort runs normally
    assert await done(link.start_operation("echo", "after")) == "normal"


async def test_abort_all_right_behind_the_starts_aborts_operations_whose_tasks_never_ran(
    sim: DcssSimulator, host: Host
) -> None:
    link = await online(sim)
    ops = [link.start_operation("hold", str(i)) for i in range(3)]
    # same segment: each handler ran its first step (eagerly, up to its await) but its task has
    # not run yet when the abort cancels it; the cancellation must still reach the handler
    link.abort_all("hard")
    assert await asyncio.gather(*(done(op) for op in ops)) == ["aborted"] * 3
    assert all(op.updates == [f"holding {i}"] for i, op in enumerate(ops))
    assert await done(link.start_operation("echo", "next")) == "normal"


async def test_every_operation_gets_exactly_one_completion(sim: DcssSimulator, host: Host) -> None:
    link = await online(sim)
    failing = link.start_operation("fail")
    assert await done(failing) == "error"
    assert failing.completion is not None
    assert d.tcl_split(failing.completion.args) == ["ValueError: the sample is missing"]
    doubled = link.start_operation("twice")
    assert await done(doubled) == "normal"
    unknown = link.start_operation("no_such_op", "x")
    assert await done(unknown) == "error"
    returned = link.start_operation("answer")
    assert await done(returned) == "normal"
    assert returned.completion is not None and returned.completion.args == "1.5 {two words}"
    # nothing more arrives for those handles after a later round trip
    assert await done(link.start_operation("echo")) == "normal"
    handles = [op.handle for op in (failing, doubled, unknown, returned)]
    completions = [
        m for m in link.received if isinstance(m, d.HtosOperationCompleted) and m.handle in handles
    ]
    assert len(completions) == 4
    stats = host.receivers["dhs"].dhs.stats  # type: ignore[attr-defined]
    # the failing handler and the one completing twice; the unknown operation is its own count
    assert stats["unknown_operation"] == 1 and stats["operation_errors"] == 2
    assert stats["operations_started"] == stats["operations_completed"] == 5


async def test_plain_def_handlers_answer_at_once_and_complete_like_async_ones(
    sim: DcssSimulator, host: Host
) -> None:
    link = await online(sim)
    echoed = link.start_operation("plain_echo", "7 {a b}")
    assert await done(echoed) == "normal"
    assert echoed.updates == ["7 {a b}"]
    assert echoed.completion is not None and echoed.completion.args == "7 {a b}"
    returned = link.start_operation("plain_answer")
    assert await done(returned) == "normal"
    assert returned.completion is not None and returned.completion.args == "3 {plain words}"
    failed = link.start_operation("plain_fail")
    assert await done(failed) == "error"
    assert failed.completion is not None
    assert d.tcl_split(failed.completion.args) == ["KeyError: 'no such register'"]
    later = link.start_operation("plain_later", "x")
    await link.wait_for(
        lambda m: isinstance(m, d.HtosOperationUpdate) and m.handle == later.handle, T
    )
    assert not later.done.done()  # still running as a task, abortable as any other
    link.abort_all()
    assert await done(later) == "aborted"
    stats = host.receivers["dhs"].dhs.stats  # type: ignore[attr-defined]
    assert stats["operation_errors"] == 1 and stats["operations_aborted"] == 1
    dhs = host.receivers["dhs"].dhs  # type: ignore[attr-defined]
    assert dhs.operations == {}


# ------------------------------------------------------------------ devices


async def test_motor_configure_and_move_round_trips(sim: DcssSimulator, host: Host) -> None:
    link = await online(sim)
    dhs: Any = host.receivers["dhs"].dhs  # type: ignore[attr-defined]
    # sample_x asked for its configuration and got DCSS's 16-field reply
    await wait_for(
        lambda: "sample_x" in dhs.devices and dhs.devices["sample_x"].configured, T, "cfg"
    )
    motor = dhs.devices["sample_x"]
    assert (motor.position, motor.upper_limit, motor.lower_limit) == (5.0, 50.0, -50.0)
    # table_y owns its configuration and pushed it
    pushed = await link.wait_for(lambda m: isinstance(m, d.HtosConfigureRealMotor), T)
    assert isinstance(pushed, d.HtosConfigureRealMotor)
    assert (pushed.motor, pushed.position, pushed.upper_limit) == ("table_y", 2.5, 9.0)
    assert sim.devices["table_y"].position == 2.5

    mark = len(link.received)
    link.move_motor("sample_x", 6.0)
    end = await link.wait_for(lambda m: isinstance(m, d.HtosMotorMoveCompleted), T, mark)
    assert end == d.HtosMotorMoveCompleted("sample_x", 6.0, "normal")
    moves = [m for m in link.received[mark:] if m.device == "sample_x"]
    assert moves[0] == d.HtosMotorMoveStarted("sample_x", 6.0)
    assert all(5.0 <= m.position <= 6.0 for m in moves if isinstance(m, d.HtosUpdateMotorPosition))
    assert sim.devices["sample_x"].position == 6.0 and not sim.devices["sample_x"].active

    # a GUI configure reaches the motor; set position answers with a completion
    link.configure_device("sample_x", position=-3.0, upper_limit=4.0)
    await wait_for(lambda: motor.position == -3.0 and motor.upper_limit == 4.0, T, "configure")
    mark = len(link.received)
    link.set_motor_position("sample_x", 1.25)
    end = await link.wait_for(lambda m: isinstance(m, d.HtosMotorMoveCompleted), T, mark)
    assert end == d.HtosMotorMoveCompleted("sample_x", 1.25, "normal")
    # past the upper limit (on in DCSS's configuration): stops at the limit
    mark = len(link.received)
    link.move_motor("sample_x", 4.5)
    end = await link.wait_for(lambda m: isinstance(m, d.HtosMotorMoveCompleted), T, mark)
    assert end == d.HtosMotorMoveCompleted("sample_x", 4.0, "cw_hw_limit")


async def test_shutter_ion_chamber_encoder_and_string(sim: DcssSimulator, host: Host) -> None:
    link = await online(sim)
    link.set_shutter("shutter", "open")
    await link.wait_for(lambda m: m == d.HtosReportShutterState("shutter", "open"), T)
    assert sim.devices["shutter"].state == "open"
    link.read_ion_chambers(0.05, "i0")
    report = await link.wait_for(lambda m: isinstance(m, d.HtosReportIonChambers), T)
    assert report == d.HtosReportIonChambers(0.05, (("i0", 50.0),))
    link.send_text("stoh_set_encoder enc 7.250000")
    await link.wait_for(lambda m: m == d.HtosSetEncoderCompleted("enc", 7.25, "normal"), T)
    link.send_text("stoh_get_encoder enc")
    await link.wait_for(lambda m: m == d.HtosGetEncoderCompleted("enc", 7.25, "normal"), T)
    link.send_text("stoh_set_string note sample 12 {loop 3}")
    await link.wait_for(lambda m: isinstance(m, d.HtosSetStringCompleted), T)
    assert sim.devices["note"].contents == "sample 12 {loop 3}"
    # an oscillation opens the shutter, moves by the delta, closes the shutter
    mark = len(link.received)
    link.send_text("stoh_start_oscillation sample_x shutter 0.5 0.1")
    await link.wait_for(lambda m: m == d.HtosReportShutterState("shutter", "closed"), T, mark)
    seen = [m for m in link.received[mark:] if not isinstance(m, d.HtosUpdateMotorPosition)]
    assert seen == [
        d.HtosReportShutterState("shutter", "open"),
        d.HtosMotorMoveStarted("sample_x", 5.5),
        d.HtosMotorMoveCompleted("sample_x", 5.5, "normal"),
        d.HtosReportShutterState("shutter", "closed"),
    ]


# ------------------------------------------------------------------ connection faults


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_reconnect_after_close_sends_nothing_stale(
    sim: DcssSimulator, slow_motor_host: Host, how: str
) -> None:
    rx: Any = slow_motor_host.receivers["dhs"]
    link = await online(sim)
    stuck = [link.start_operation("slow", str(i)) for i in range(3)]
    await wait_for(lambda: all(op.updates for op in stuck), T, "operations running")
    link.move_motor("sample_x", 45.0)
    await link.wait_for(lambda m: isinstance(m, d.HtosUpdateMotorPosition), T)
    assert sim.devices["sample_x"].active  # the move is under way when the link drops
    link.drop(how)
    # DCSS fails the lost DHS's operations itself
    assert await asyncio.gather(*(done(op) for op in stuck)) == ["no_hw_host_dhs"] * 3
    new = await online(sim, after=link.id)
    assert new.handshake_reply == d.encode_v1("htos_client_is_hardware dhs")
    fresh = new.start_operation("echo", "fresh")
    assert await done(fresh) == "normal"
    old_handles = {op.handle for op in stuck}
    for m in new.received:
        assert getattr(m, "handle", None) not in old_handles, m
        assert not isinstance(m, (d.HtosMotorMoveCompleted, d.HtosUpdateMotorPosition)), m
    assert sim.stray_completions == []
    assert rx.dhs.stats["operations_dropped_on_disconnect"] == 3
    assert rx.connections == 2 and rx.state == "running"


async def test_non_ascii_bytes_are_replaced_counted_and_survived(
    sim: DcssSimulator, host: Host
) -> None:
    rx: Any = host.receivers["dhs"]
    link = await online(sim)
    op = link.start_operation("echo", "café Å")
    assert await done(op) == "normal"
    assert op.updates == ["café Å"]
    raw = link.start_operation("echo", b"x\xff\xfe y")
    assert await done(raw) == "normal"
    assert raw.updates == ["x\ufffd\ufffd y"]
    assert rx.counters.errors["bad_bytes"] == 2
    assert sim.online["dhs"] is link  # same connection throughout


async def test_oversize_v2_header_drops_the_connection_and_reconnects(
    sim: DcssSimulator, host: Host
) -> None:
    rx: Any = host.receivers["dhs"]
    link = await online(sim)
    link.send_raw(b"%12d %12d " % (10**11, 0))
    new = await online(sim, after=link.id)
    assert rx.counters.errors["protocol"] == 1
    assert "exceeds the limit" in rx.last_disconnect
    assert "crash" not in rx.counters.errors and rx.state == "running"
    assert await done(new.start_operation("echo", "ok")) == "normal"


async def test_malformed_and_unknown_messages_are_counted_not_fatal(
    sim: DcssSimulator, host: Host
) -> None:
    rx: Any = host.receivers["dhs"]
    link = await online(sim)
    link.send_text("stoh_start_motor_move sample_x nowhere")
    link.send_text("stoh_start_vector_move a b 1 2")
    link.send_text("stoh_brand_new_thing 1 2 3")
    assert await done(link.start_operation("echo", "still here")) == "normal"
    assert rx.counters.errors["malformed"] == 1
    assert rx.dhs.stats["unhandled"] == 2
    assert sim.online["dhs"] is link


# ------------------------------------------------------------------ records


async def test_every_received_message_is_published_with_tags(sim: DcssSimulator) -> None:
    extra = 'publish_to = ["live"]'
    text = dhs_config(sim, extra=extra) + (
        '\n[[publisher]]\ntype = "zmq"\nname = "live"\nendpoint = "tcp://127.0.0.1:0"\n'
    )
    h = Host(parse_config(text, "<test>"))
    await h.start()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.subscribe(b"")
        sub.connect(h.publishers["live"].addresses["endpoint"])
        link = await online(sim)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        # a SUB socket joins late: send operations until records flow, then check one
        async with asyncio.timeout(T):
            while not await poller.poll(50):
                await done(link.start_operation("echo", "warmup"))
        op = link.start_operation("echo", "{tagged word}")
        await done(op)
        async with asyncio.timeout(T):
            while True:
                source, header, *payload = await sub.recv_multipart()
                meta = msgpack.unpackb(header)
                if meta["tags"].get("handle") == op.handle:
                    break
        assert source == b"dhs"
        assert meta["tags"] == {
            "command": "stoh_start_operation",
            "device": "echo",
            "handle": op.handle,
        }
        assert payload == [f"stoh_start_operation echo {op.handle} {{tagged word}}".encode()]
    finally:
        sub.close()
        ctx.term()
        await h.stop()


# ------------------------------------------------------------------ handler settings

HANDLER_SETTINGS = """
[receiver.handler_settings]
camera = "sample cam"
names = ["a", "b", "c"]
limits = { grab_s = 2.5 }
"""


async def test_handlers_read_settings_from_the_toml_and_cannot_change_them(
    sim: DcssSimulator,
) -> None:
    h = Host(parse_config(dhs_config(sim, extra=HANDLER_SETTINGS), "<test>"))
    await h.start()
    try:
        link = await online(sim)
        first = link.start_operation("settings")
        assert await done(first) == "normal"
        assert first.completion is not None and first.completion.args == "{sample cam} 2.5 3"
        seen = SEEN[first.handle].settings
        assert isinstance(seen, types.MappingProxyType)
        assert sorted(seen) == ["camera", "limits", "names"]
        assert seen["names"] == ("a", "b", "c") and dict(seen["limits"]) == {"grab_s": 2.5}
        with pytest.raises(TypeError):
            seen["camera"] = "other"  # type: ignore[index]
        with pytest.raises(TypeError):
            del seen["names"]  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            seen["limits"]["grab_s"] = 99.0
        with pytest.raises(AttributeError):
            seen["names"].append("d")
        # what one handler tried to change, the next operation still gets as configured
        second = link.start_operation("settings")
        assert await done(second) == "normal"
        assert second.completion is not None and second.completion.args == "{sample cam} 2.5 3"
    finally:
        await h.stop()


async def test_handler_settings_default_empty_and_reject_non_msgpack_values(
    sim: DcssSimulator, host: Host
) -> None:
    link = await online(sim)
    op = link.start_operation("settings")
    assert await done(op) == "normal"
    assert op.completion is not None and op.completion.args == "none 0 0"
    assert len(SEEN[op.handle].settings) == 0
    dated = "[receiver.handler_settings]\nwhen = 1979-05-27T07:32:00Z\n"
    with pytest.raises(ConfigError, match=r'"handler_settings\.when": input was not a valid JSON'):
        parse_config(dhs_config(sim, extra=dated), "<test>")


# ------------------------------------------------------------------ the shipped example


async def test_example_config_runs_its_handlers() -> None:
    devs = [
        SimDevice("real_motor", "sample_x"),
        SimDevice("real_motor", "detector_z"),
        SimDevice("operation", "readTemperature"),
        SimDevice("operation", "collectFrames"),
    ]
    async with DcssSimulator({"beamline_dhs": 2}, devs) as sim:
        path = ROOT / "examples" / "beamline-dhs.toml"
        text = path.read_text()
        text = re.sub(r'connect = "[^"]*"', f'connect = "{sim.address}"', text, count=1)
        text = text.replace("tcp://127.0.0.1:9010", "tcp://127.0.0.1:0")
        # the handler file is found next to the config file, wherever the daemon runs
        h = Host(parse_config(text, str(path)))
        await h.start()
        try:
            link = await online(sim, "beamline_dhs")
            pushed = await link.wait_for(
                lambda m: isinstance(m, d.HtosConfigureRealMotor) and m.motor == "detector_z", T
            )
            assert isinstance(pushed, d.HtosConfigureRealMotor) and pushed.position == 300.0
            temp = link.start_operation("readTemperature", "room")
            assert await done(temp) == "normal"
            assert temp.completion is not None and temp.completion.args == "295.4"
            frames = link.start_operation("collectFrames", "3 0.01 {my sample}")
            assert await done(frames) == "normal"
            assert frames.updates[-1] == "frame 3 {my sample_0003.img}"
            bad = link.start_operation("collectFrames", "three")
            assert await done(bad) == "error"
            link.move_motor("detector_z", 400.0)
            end = await link.wait_for(lambda m: isinstance(m, d.HtosMotorMoveCompleted), T)
            assert end == d.HtosMotorMoveCompleted("detector_z", 400.0, "normal")
        finally:
            await h.stop()


def test_every_dhs_counter_used_is_declared() -> None:
    # stats is a plain dict of the declared counters (no Counter default): a counter bumped
    # somewhere but missing from STATS would raise KeyError on that (possibly rare) path
    import daqd.dhs

    source = "".join(f.read_text() for f in Path(daqd.dhs.__file__).parent.glob("*.py"))
    used = set(re.findall(r"stats\[\"(\w+)\"\]", source))
    assert used and used <= set(daqd.dhs.STATS), used - set(daqd.dhs.STATS)
    assert len(set(daqd.dhs.STATS)) == len(daqd.dhs.STATS)


# ------------------------------------------------------------------ the wire, byte by byte

# Written from the protocol notes (/work/shared/protocols/dcss.md §2, §3), not produced by the
# codec under test: what DCSS and the other DHS libraries put on the wire.
CLIENT_TYPE = b"stoc_send_client_type" + b"\0" * 179  # v1: 200 bytes, NUL padded
IS_HARDWARE = b"htos_client_is_hardware dhs" + b"\0" * 173  # v1 whatever the level

# level 2, DCSS to the DHS, in each writer's header layout (§3.2's table)
FROM_DCSS = [
    # DCSS: "%12d %12d ", the text and its NUL (counted)
    b"          35            0 " + b"stoh_register_operation echo echo\n\0",
    # SSRL C++ DHS library: "%12lu %12lu" then a NUL at byte 25; the text and its NUL
    b"          38            0\0" + b"stoh_start_operation echo 1.1 a {b c}\0",
    # pydhsfw: rjust(12) + rjust(13) + space; the text, a space and a NUL (both counted)
    b"          33" + b"            0" + b" " + b"stoh_start_operation echo 1.2 x \0",
    # ALS pyDHS: "%12d %12d ", the text without a NUL
    b"          31            0 " + b"stoh_start_operation echo 1.3 y",
    # SSRL java_dcss_sim: "<len> 0" left-justified, NUL padded; the text without a NUL
    b"31 0" + b"\0" * 22 + b"stoh_start_operation echo 1.4 z",
]

# what the DHS must answer, in DCSS's own form ("%12d %12d ", text, NUL; §3.2 writer rule)
TO_DCSS = (
    b"          39            0 htos_operation_update echo 1.1 a {b c}\0"
    b"          49            0 htos_operation_completed echo 1.1 normal a {b c}\0"
    b"          33            0 htos_operation_update echo 1.2 x\0"
    b"          43            0 htos_operation_completed echo 1.2 normal x\0"
    b"          33            0 htos_operation_update echo 1.3 y\0"
    b"          43            0 htos_operation_completed echo 1.3 normal y\0"
    b"          33            0 htos_operation_update echo 1.4 z\0"
    b"          43            0 htos_operation_completed echo 1.4 normal z\0"
)


def v1(text: bytes) -> bytes:
    return text + b"\0" * (200 - len(text))


async def converse(level: int, send: list[bytes], expect: bytes) -> bytes:
    """A DCSS written by hand: the handshake, then `send` (frames in one write), then read
    until `expect`'s length has come. Returns what the DHS sent after its handshake answer."""
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def dcss(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CLIENT_TYPE)
        handshake = await reader.readexactly(200)
        writer.write(b"".join(send))
        try:
            got = await asyncio.wait_for(reader.readexactly(len(expect)), T)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            got = getattr(exc, "partial", b"") or b"(nothing)"
        await answers.put(handshake)
        await answers.put(got)
        writer.close()

    server = await asyncio.start_server(dcss, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    text = f"""
[daemon]
name = "t"

[[receiver]]
type = "dcss"
name = "dhs"
connect = "127.0.0.1:{port}"
dhs_name = "dhs"
protocol_level = {level}
handlers = ["tests.test_dcss"]
"""
    h = Host(parse_config(text, "<test>"))
    await h.start()
    try:
        handshake = await asyncio.wait_for(answers.get(), T)
        got = await asyncio.wait_for(answers.get(), T)
    finally:
        await h.stop()
        server.close()
        await server.wait_closed()
    assert handshake == IS_HARDWARE
    errors = h.receivers["dhs"].counters.errors
    assert errors == {}, errors
    return got


async def test_level_2_frames_of_every_known_writer_are_read_and_answered_as_dcss_writes() -> None:
    assert all(frame.index(b"stoh_") == 26 for frame in FROM_DCSS)  # every header: 26 bytes
    assert await converse(2, FROM_DCSS, TO_DCSS) == TO_DCSS


async def test_level_1_frames_are_200_bytes_each_way() -> None:
    send = [v1(b"stoh_register_operation echo echo\n"), v1(b"stoh_start_operation echo 1.5 w")]
    expect = v1(b"htos_operation_update echo 1.5 w") + v1(
        b"htos_operation_completed echo 1.5 normal w"
    )
    assert len(expect) == 400
    assert await converse(1, send, expect) == expect
