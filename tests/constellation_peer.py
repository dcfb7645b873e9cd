"""Run by tests/test_constellation.py with the python of the constellationdaq venv, inside the
test's network namespace: sends malformed CSCP requests to daqd's satellite, then drives it with a
real `ScriptableController`. Settings come as one JSON line on stdin; results go out as JSON lines.
The test answers "go" lines where the script waits (so it can look at daqd with daqctl)."""

from __future__ import annotations

import json
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
    while "RX_RECORDS" not in listener.metrics and time.monotonic() < deadline:
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


def main() -> None:
    settings = json.loads(sys.stdin.readline())
    if settings.get("mode") == "listen":
        listen(settings)
        return
    group, name = settings["group"], settings["name"]
    say(garbage=garbage(f"tcp://127.0.0.1:{settings['cmd_port']}"))
    ctrl = ScriptableController(group=group, interface=["lo"], log_level="WARNING", name="ctl")
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
