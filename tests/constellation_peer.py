"""Run by tests/test_constellation.py with the python of the constellationdaq venv, inside the
test's network namespace: sends malformed CSCP requests to daqd's satellite, then drives it with a
real `ScriptableController`. Settings come as one JSON line on stdin; results go out as JSON lines.
The test answers "go" lines where the script waits (so it can look at daqd with daqctl)."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any

import zmq

# the controller logs to stdout (rich): keep stdout for our JSON lines, its logs to stderr
OUT = sys.stdout
sys.stdout = sys.stderr

from constellation.core.controller import ScriptableController  # noqa: E402
from constellation.core.listener import StandaloneListener  # noqa: E402
from constellation.core.message.cscp1 import CSCP1Message  # noqa: E402
from constellation.core.protocol.cscp1 import SatelliteState  # noqa: E402
from constellation.core.receiver_satellite import ReceiverSatellite  # noqa: E402

T = CSCP1Message.Type


def say(**what: Any) -> None:
    print(json.dumps(what, default=str), file=OUT, flush=True)


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected go, got {line!r}")


def raw_request(endpoint: str, frames: list[bytes]) -> list[Any]:
    """One request on a fresh REQ socket; the reply decoded by constellationdaq itself."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        reply = CSCP1Message.disassemble(sock.recv_multipart())
    finally:
        sock.close()
    return [reply.verb_type.name, reply.verb_msg, reply.payload, sorted(reply.tags)]


def request_frames(verb: tuple[Any, str], payload: Any = None) -> list[bytes]:
    msg = CSCP1Message("garbage.sender", verb)
    if payload is not None:
        msg.payload = payload
    return list(msg.assemble().frames)


def garbage(endpoint: str) -> list[list[Any]]:
    good = request_frames((T.REQUEST, "get_state"))
    cases = [
        [b"garbage"],  # one frame
        [b"\xc1\xc1", b"\xc1"],  # not msgpack
        [good[0], good[1], b"", b""],  # four frames
        request_frames((T.SUCCESS, "get_state")),  # a reply type sent as request
        request_frames((T.REQUEST, "no_such_command")),
        request_frames((T.REQUEST, "start"), 5),
        request_frames((T.REQUEST, "start"), "not a run id!"),
        request_frames((T.REQUEST, "get_name"), "surplus"),
        request_frames((T.REQUEST, "land")),  # not allowed in INIT
        request_frames((T.REQUEST, "GET_STATE")),  # and after all that, it answers
    ]
    return [raw_request(endpoint, frames) for frames in cases]


class Listener(StandaloneListener):
    """constellationdaq's own CMDP listener, keeping what it receives."""

    def __init__(self, group: str) -> None:
        self.logs: list[list[Any]] = []
        self.metrics: dict[str, list[Any]] = {}
        self.notifications: dict[str, dict[str, str]] = {}
        super().__init__(name="mon", group=group, interface=["lo"])

    def receive_log(self, record: Any) -> None:
        self.logs.append([record.sender, record.levelname, record.name, record.msg])

    def receive_metric(self, sender: str, metric: Any, timestamp: Any, value: Any) -> None:
        self.metrics[metric.name] = [sender, value, metric.unit]

    def receive_notification(self, sender: str, prefix: str, topics: dict[str, str]) -> None:
        self.notifications[prefix] = topics


def listen(settings: dict[str, Any]) -> None:
    """Follow daqd's logs and metrics until a log line has `settings["until"]` in it."""
    listener = Listener(settings["group"])
    thread = threading.Thread(target=listener.run_listener, daemon=True)
    thread.start()
    listener.set_topics(["LOG/INFO", "LOG/WARNING", "STAT/", "LOG?", "STAT?"])
    deadline = time.monotonic() + 30
    wanted = set(settings.get("metrics", ["RX_RECORDS"]))
    while not wanted <= set(listener.metrics) and time.monotonic() < deadline:
        time.sleep(0.05)
    say(ready=sorted(listener.metrics))
    while not any(settings["until"] in str(line[3]) for line in listener.logs):
        if time.monotonic() > deadline + 30:
            break
        time.sleep(0.05)
    say(
        logs=listener.logs,
        metrics=listener.metrics,
        notifications=listener.notifications,
    )
    listener.reentry()


class Counting(ReceiverSatellite):
    """A real Constellation receiver satellite that keeps what it receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.bor: list[Any] = []
        self.records: list[list[Any]] = []
        self.eor: list[Any] = []
        super().__init__(*args, **kwargs)

    def receive_bor(
        self, sender: str, user_tags: dict[str, Any], configuration: dict[str, Any]
    ) -> None:
        self.bor.append(sender)

    def receive_data(self, sender: str, data_record: Any) -> None:
        blocks = [bytes(b).hex() for b in data_record.blocks]
        self.records.append([sender, data_record.sequence_number, blocks])

    def receive_eor(
        self, sender: str, user_tags: dict[str, Any], run_metadata: dict[str, Any]
    ) -> None:
        self.eor.append([sender, run_metadata.get("condition")])


def receive(settings: dict[str, Any]) -> None:
    """A controller takes daqd and a Constellation receiver satellite through a run; the receiver
    finds daqd's CDTP publisher (`settings["sender"]`) by its CHIRP DATA offer."""
    rx = Counting(
        name="rx", group=settings["group"], cmd_port=0, hb_port=0, mon_port=0, interface=["lo"]
    )
    threading.Thread(target=rx.run_satellite, daemon=True).start()
    ctrl = ScriptableController(
        group=settings["group"], interface=["lo"], log_level="WARNING", name="ctl"
    )
    daqd_name = f"Daqd.{settings['name']}"
    try:
        ctrl.await_satellites([daqd_name, "Counting.rx"], timeout=30)
        daqd = ctrl.constellation.get_satellite("Daqd", settings["name"])
        recv = ctrl.constellation.get_satellite("Counting", "rx")
        recv.initialize({"_data": {"receive_from": [settings["sender"]]}})
        daqd.initialize({})
        ctrl.await_state(SatelliteState.INIT, timeout=30)
        recv.launch()
        daqd.launch()
        ctrl.await_state(SatelliteState.ORBIT, timeout=30)
        recv.start("run_x")
        daqd.start("run_x")
        ctrl.await_state(SatelliteState.RUN, timeout=30)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for k in range(settings["count"]):
            udp.sendto(b"datagram %d" % k, ("127.0.0.1", settings["udp_port"]))
            time.sleep(0.002)  # no loss in the kernel's buffers on a loaded machine
        deadline = time.monotonic() + 30
        while len(rx.records) < settings["count"] and time.monotonic() < deadline:
            time.sleep(0.05)
        daqd.stop()
        deadline = time.monotonic() + 30
        while not rx.eor and time.monotonic() < deadline:
            time.sleep(0.05)
        recv.stop()
        ctrl.await_state(SatelliteState.ORBIT, timeout=30)
        say(
            bor=rx.bor,
            records=rx.records,
            eor=rx.eor,
            states={k: v.name for k, v in ctrl.states.items()},
        )
    finally:
        ctrl.reentry()
        rx.reentry()


def main() -> None:
    settings = json.loads(sys.stdin.readline())
    if settings.get("mode") == "receive":
        receive(settings)
        return
    if settings.get("mode") == "listen":
        listen(settings)
        return
    group, name = settings["group"], settings["name"]
    address = settings.get("address", "127.0.0.1")  # where daqd is, from this namespace
    say(garbage=garbage(f"tcp://{address}:{settings['cmd_port']}"))
    interface = settings.get("interface", "lo")
    level = settings.get("log_level", "WARNING")
    ctrl = ScriptableController(group=group, interface=[interface], log_level=level, name="ctl")
    try:
        ctrl.await_satellites([f"Daqd.{name}"], timeout=30)
        sat = ctrl.constellation.get_satellite("Daqd", name)
        got: dict[str, Any] = {}
        for cmd in ("get_name", "get_state", "get_commands", "get_role", "get_version"):
            r = getattr(sat, cmd)()
            got[cmd] = [r.msg, r.payload, sorted(r.meta or {})]
        say(found=got, states={k: v.name for k, v in ctrl.states.items()})
        steps = [
            ("initialize", {"_autonomy": {"role": "TRANSIENT"}, "answer": 42}, SatelliteState.INIT),
            ("launch", None, SatelliteState.ORBIT),
            ("start", settings["run_id"], SatelliteState.RUN),
            ("stop", None, SatelliteState.ORBIT),
            ("land", None, SatelliteState.INIT),
        ]
        for cmd, payload, target in steps:
            began = time.monotonic()
            r = getattr(sat, cmd)(payload) if payload is not None else getattr(sat, cmd)()
            ctrl.await_state(target, timeout=30)
            extra: dict[str, Any] = {}
            if cmd == "initialize":
                c = sat.get_config()
                role = sat.get_role()
                extra = {"config": c.payload, "role": [role.msg, role.payload]}
            if cmd in ("start", "stop"):
                extra = {"run_id": sat.get_run_id().msg, "status": sat.get_status().msg}
            say(
                step=cmd,
                reply=[r.success, r.msg, r.payload],
                state=ctrl.states[f"Daqd.{name}"].name,
                seconds=round(time.monotonic() - began, 3),
                **extra,
            )
            wait_go()
        r = sat.start("bad run!")
        say(bad_start=[r.success, r.msg])
    finally:
        ctrl.reentry()
    say(done=True)


if __name__ == "__main__":
    main()
