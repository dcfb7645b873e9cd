"""A real constellationdaq `ScriptableController` driven line by line, run with the python of the
constellationdaq venv inside a test's (or a benchmark's) network namespace.

The first stdin line is JSON settings: `group`, `interface` (a list of interface names). Each
further line is one JSON operation, answered with one JSON line:

- `{"op": "await", "names": [...], "timeout": s}`: wait until the controller knows each satellite
  (by its CONTROL offer) and has its heartbeat state; answers `states` and `seen` (the monotonic
  time it was first complete, comparable with other processes' `time.monotonic()`).
- `{"op": "cmd", "name": "Type.Name", "cmd": ..., "payload": ...}`: one CSCP command; answers
  `reply` = [success, verb message, payload].
- `{"op": "transition", "name": ..., "cmd": ..., "payload": ..., "state": ..., "timeout": s}`:
  the command, then wait until the controller sees the satellite in `state` (from its heartbeats,
  after a state change since the command, as the controller's own `await_state` does);
  answers `reply`, `state` and `seconds` from sending the command to seeing the state.
- `{"op": "states"}`: answers `states`, every known satellite's state as the controller sees it.
- `{"op": "quit"}`: leaves the constellation and exits.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

# the controller logs to stdout (rich): keep stdout for our JSON lines, its logs to stderr
OUT = sys.stdout
sys.stdout = sys.stderr

from constellation.core.controller import ScriptableController  # noqa: E402

POLL_S = 0.001  # how often the heartbeat states are looked at while waiting for one


def say(**what: Any) -> None:
    print(json.dumps(what, default=str), file=OUT, flush=True)


def states(ctrl: ScriptableController) -> dict[str, str]:
    return {name: state.name for name, state in ctrl.states.items()}


def known(ctrl: ScriptableController, names: list[str]) -> bool:
    satellites = {str(s).lower() for s in ctrl.constellation.satellites.values()}
    heartbeats = {name.lower() for name in ctrl.states}
    return all(n.lower() in satellites and n.lower() in heartbeats for n in names)


def in_state(ctrl: ScriptableController, name: str, state: str) -> bool:
    """The satellite reported `state` since the last transition command sent to it: the command
    marks its heartbeat state outdated until a state change comes (INIT -> initialize -> INIT)."""
    for hb in list(ctrl._remote_heartbeat_states.values()):
        if hb.name.lower() == name.lower():
            return not hb.outdated and bool(hb.state.name == state)
    return False


def wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def command(ctrl: ScriptableController, op: dict[str, Any]) -> list[Any]:
    sat_type, sat_name = op["name"].split(".", 1)
    r = ctrl.command(op["cmd"], op.get("payload"), sat_type, sat_name)
    return [r.success, r.msg or r.errmsg, r.payload]


def main() -> None:
    settings = json.loads(sys.stdin.readline())
    ctrl = ScriptableController(
        group=settings["group"],
        interface=settings.get("interface", ["lo"]),
        log_level=settings.get("log_level", "WARNING"),
        name=settings.get("name", "ctl"),
    )
    try:
        say(ready=True)
        for line in sys.stdin:
            op = json.loads(line)
            what = op["op"]
            if what == "quit":
                break
            if what == "await":
                names = op["names"]
                ok = wait(lambda: known(ctrl, names), op.get("timeout", 30))  # noqa: B023
                say(ok=ok, seen=time.monotonic(), states=states(ctrl))
            elif what == "cmd":
                say(reply=command(ctrl, op))
            elif what == "transition":
                began = time.monotonic()
                reply = command(ctrl, op)
                replied = time.monotonic() - began
                ok = reply[0] and wait(
                    lambda: in_state(ctrl, op["name"], op["state"]),  # noqa: B023
                    op.get("timeout", 30),
                )
                seconds = time.monotonic() - began
                state = states(ctrl).get(op["name"])
                say(ok=ok, reply=reply, seconds=seconds, replied=replied, state=state)
            elif what == "states":
                say(states=states(ctrl))
            else:
                say(error=f"unknown op {what!r}")
    finally:
        ctrl.reentry()


if __name__ == "__main__":
    main()
