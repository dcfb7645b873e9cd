"""Run by tests/test_constellation_data.py with the python of the constellationdaq venv, inside the
test's network namespace: a real `ScriptableController` takes daqd, a `SatellitePyRandomTransmitter`
(its own process, started by the test) and a `PyDevNullReceiver` (run here, in a thread, so that
what it received can be read) through runs. daqd receives the transmitter's data by CHIRP
discovery and sends it on to the DevNullReceiver, which finds daqd's `cdtp` publisher by CHIRP.

Settings come as one JSON line on stdin; results go out as JSON lines; the script waits for a "go"
line after each run so that the test can look at daqd and act (kill the transmitter).
"""

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
from constellation.core.message.cscp1 import CSCP1Message  # noqa: E402
from constellation.core.protocol.cscp1 import SatelliteState  # noqa: E402
from constellation.satellites.PyDevNullReceiver.PyDevNullReceiver import (  # noqa: E402
    PyDevNullReceiver,
)

S = SatelliteState


def say(**what: Any) -> None:
    print(json.dumps(what, default=str), file=OUT, flush=True)


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected go, got {line!r}")


def garbage(endpoint: str) -> list[Any]:
    """A request that is not CSCP, then get_state: daqd must answer both."""
    ctx = zmq.Context.instance()
    replies: list[Any] = []
    for frames in ([b"\x00garbage", b"\xc1"], None):
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.connect(endpoint)
        try:
            if frames is None:
                msg = CSCP1Message("garbage.sender", (CSCP1Message.Type.REQUEST, "get_state"))
                frames = list(msg.assemble().frames)
            sock.send_multipart(frames)
            reply = CSCP1Message.disassemble(sock.recv_multipart())
        finally:
            sock.close()
        replies.append([reply.verb_type.name, reply.verb_msg])
    return replies


def until_state(
    ctrl: ScriptableController, name: str, state: SatelliteState, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while ctrl.states.get(name) != state:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{name} not in {state.name} after {timeout} s: {ctrl.states.get(name)}"
            )
        time.sleep(0.02)


def reaches(ctrl: ScriptableController, name: str, states: tuple[Any, ...], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while ctrl.states.get(name) not in states:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main() -> None:
    settings = json.loads(sys.stdin.readline())
    group = settings["group"]
    daqd_name, tx_name = f"Daqd.{settings['daqd']}", f"PyRandomTransmitter.{settings['tx']}"
    null_name = "PyDevNullReceiver.null"
    say(garbage=garbage(f"tcp://127.0.0.1:{settings['cmd_port']}"))

    null = PyDevNullReceiver(
        name="null", group=group, cmd_port=0, hb_port=0, mon_port=0, interface=["lo"]
    )
    eors: list[list[Any]] = []

    def receive_eor(sender: str, user_tags: dict[str, Any], run_metadata: dict[str, Any]) -> None:
        eors.append([sender, run_metadata.get("condition"), run_metadata.get("data_records")])

    null.receive_eor = receive_eor  # type: ignore[method-assign]  # seen before initialize binds it
    threading.Thread(target=null.run_satellite, daemon=True).start()
    ctrl = ScriptableController(group=group, interface=["lo"], log_level="WARNING", name="ctl")
    began = time.monotonic()
    try:
        ctrl.await_satellites([daqd_name, tx_name, null_name], timeout=60)
        sats = ctrl.constellation
        daqd = sats.get_satellite("Daqd", settings["daqd"])
        tx = sats.get_satellite("PyRandomTransmitter", settings["tx"])
        rx = sats.get_satellite("PyDevNullReceiver", "null")
        found_s = round(time.monotonic() - began, 3)
        replies = {
            "tx": tx.initialize(settings["tx_config"]).success,
            "null": rx.initialize({"_data": {"receive_from": [settings["sender"]]}}).success,
            "daqd": daqd.initialize(settings["daqd_config"]).success,
        }
        ctrl.await_state(S.INIT, timeout=60)
        for sat, name in ((daqd, daqd_name), (tx, tx_name), (rx, null_name)):
            sat.launch()
            until_state(ctrl, name, S.ORBIT, 60)
        say(found_s=found_s, initialize=replies, states={k: v.name for k, v in ctrl.states.items()})

        for run_id in settings["runs"]:
            for sat, name in ((rx, null_name), (daqd, daqd_name), (tx, tx_name)):
                sat.start(run_id)
                until_state(ctrl, name, S.RUN, 60)
            if run_id == settings["kill_in"]:
                say(running=run_id)
                wait_go()  # the test kills the transmitter and watches daqd act
                until_state(ctrl, daqd_name, S.SAFE, 60)
                # the DevNullReceiver follows its own rules (it interrupts for a DYNAMIC peer's
                # death too); if it is still in RUN after that, the controller stops it
                if not reaches(ctrl, null_name, (S.SAFE, S.ORBIT), 15):
                    rx.stop()
                if not reaches(ctrl, null_name, (S.SAFE, S.ORBIT), 60):
                    raise SystemExit(f"{null_name} stays in {ctrl.states.get(null_name)}")
                say(
                    killed_run=run_id, eors=eors, states={k: v.name for k, v in ctrl.states.items()}
                )
                break
            # until the DevNullReceiver has some of this run's data from daqd
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = (null._drc._data_transmitter_states if null._drc else {}).get(
                    settings["sender"]
                )
                if state is not None and state.seq >= settings["records"]:
                    break
                time.sleep(0.02)
            for sat, name in ((tx, tx_name), (daqd, daqd_name), (rx, null_name)):
                sat.stop()
                until_state(ctrl, name, S.ORBIT, 60)
            assert null._drc is not None
            state = null._drc._data_transmitter_states[settings["sender"]]
            say(
                run=run_id,
                null=[state.state.name, state.seq, state.missed],
                eors=eors,
                states={k: v.name for k, v in ctrl.states.items()},
            )
            eors.clear()
            if run_id == settings["land_after"]:  # all three land, then launch again
                for sat, name in ((tx, tx_name), (daqd, daqd_name), (rx, null_name)):
                    sat.land()
                    until_state(ctrl, name, S.INIT, 60)
                landed = {k: v.name for k, v in ctrl.states.items()}
                for sat, name in ((daqd, daqd_name), (tx, tx_name), (rx, null_name)):
                    sat.launch()
                    until_state(ctrl, name, S.ORBIT, 60)
                say(landed=landed, states={k: v.name for k, v in ctrl.states.items()})
            wait_go()
    finally:
        ctrl.reentry()
        null.reentry()
    say(done=True)


if __name__ == "__main__":
    main()
