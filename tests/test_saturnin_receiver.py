"""Receiver `saturnin`: a `daqd serve` daemon starts a real saturnin 0.10.0 MicroService
(tests/saturnin_peer.py service, in the peer venv) as its child, controls it over ICCP in
Saturnin's bytes, and publishes what the service sends on its announced endpoint as records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DAQD, Daemon, wait_until
from tests.peers import peer_python

pytestmark = pytest.mark.interop

PEER_SCRIPT = str(Path(__file__).with_name("saturnin_peer.py"))

CONFIG = """
[daemon]
name = "{name}"
drain_timeout_s = 5

[[receiver]]
type = "saturnin"
name = "toy"
command = ["{python}", "{script}", "service", "{{controller}}", '{settings}']
take = ["output"]
start_timeout_s = {start_timeout_s}
stop_timeout_s = {stop_timeout_s}
"""


@pytest.fixture(scope="module")
def peer() -> str:
    return str(peer_python("saturnin"))


def config(
    peer: str,
    name: str,
    extra: str = "",
    start_timeout_s: float = 20,
    stop_timeout_s: float = 20,
    **settings: Any,
) -> str:
    text = CONFIG.format(
        name=name,
        python=peer,
        script=PEER_SCRIPT,
        settings=json.dumps(settings),
        start_timeout_s=start_timeout_s,
        stop_timeout_s=stop_timeout_s,
    )
    return text + extra


def service(d: Daemon) -> dict[str, Any]:
    toy: dict[str, Any] = d.status()["receivers"]["toy"]
    return toy


def test_daqd_runs_a_saturnin_service(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    report = workdir / "report.json"
    d = daemon(config(peer, "satd", count=50, report=str(report)), name="satd")
    toy = wait_until(lambda: (s := service(d))["records"] == 50 and s, 30, "50 records")
    assert toy["bytes"] == 50 * 11  # [b"toy", 8-byte counter] each
    svc = toy["service"]
    assert svc["running"] and svc["outcome"] is None
    # READY, as the service sent it: its pid, a 16-byte uid, the endpoint its records came from
    assert svc["peer"]["pid"] == svc["pid"]
    assert len(svc["peer"]["uid"]) == 36
    assert svc["peer"]["endpoints"]["output"] == [toy["addresses"]["output"]]
    assert d.ctl("transition", "land").returncode == 0  # closes the receiver: STOP -> FINISHED
    svc = service(d)["service"]
    assert (svc["running"], svc["outcome"]) == (False, "OK"), (svc, d.log())
    assert json.loads(report.read_text()) == {"sent": 50, "pid": svc["pid"]}
    assert d.stop() == 0


def test_a_killed_service_is_restarted(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    report = workdir / "report.json"
    d = daemon(config(peer, "satk", count=5, report=str(report)), name="satk")
    first = wait_until(lambda: (s := service(d))["records"] == 5 and s, 30, "5 records")
    os.kill(first["service"]["pid"], signal.SIGKILL)
    again = wait_until(
        lambda: (s := service(d))["records"] == 10 and s["state"] == "running" and s,
        60,
        "the restarted service's 5 records",
    )
    assert again["errors"]["crash"] == 1
    assert again["service"]["pid"] != first["service"]["pid"]
    assert again["service"]["peer"]["pid"] == again["service"]["pid"]  # a new READY
    assert d.ctl("transition", "land").returncode == 0
    assert service(d)["service"]["outcome"] == "OK"


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        # CONF in the form saturnin's parser reads: its handler then fails on its own bug A7.2
        (
            {"conf": 'conf = { logging_id = "toy" }'},
            "saturnin service refused CONF: AttributeError: 'ICCPMessage' object has no "
            "attribute 'config'",
        ),
        # saturnin's ERROR (a whole traceback) instead of READY: its last line is the reason
        ({"fail": True}, "saturnin service could not start: RuntimeError: toy cannot start"),
        # a READY saturnin's own parser would call INVALID (uid of 3 bytes)
        (
            {"bad_ready": True},
            "saturnin service: ICCP READY: PeerIdentification.uid must be 16 bytes, got 3",
        ),
        # nothing within start_timeout_s
        ({"silent": True, "start_timeout_s": 1}, "saturnin service sent no READY within 1 s"),
        # saturnin connecting straight to an ipc controller: its warm_up fails (can_send race)
        ({"relay": False}, "saturnin service exited with code 1 before READY"),
    ],
)
def test_a_service_that_does_not_start_is_a_clear_error(
    peer: str, workdir: Path, settings: dict[str, Any], words: str
) -> None:
    path = workdir / "sat.toml"
    extra = settings.pop("conf", "")
    path.write_text(config(peer, "satf", extra, report=str(workdir / "r.json"), **settings))
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        [DAQD, "serve", str(path)],
        env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"receiver 'toy' cannot start: {words}" in done.stderr


def test_malformed_control_messages_from_the_service_are_counted(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """After READY the service's side sends garbage and messages out of turn: each is counted,
    the service goes on, and STOP still gets its FINISHED."""
    inject = [["01"], ["0001", "0aff"], ["0063"], ["0003"]]
    settings = {"count": 3, "report": str(workdir / "r.json"), "inject": inject}
    d = daemon(config(peer, "satm", **settings), name="satm")
    toy = wait_until(
        lambda: (s := service(d))["records"] == 3 and len(s["errors"]) == 2 and s,
        30,
        "3 records and the garbage counted",
    )
    assert toy["errors"] == {"iccp_malformed": 3, "iccp_unexpected": 1}
    assert toy["state"] == "running"
    assert d.ctl("transition", "land").returncode == 0
    assert service(d)["service"]["outcome"] == "OK"


def test_a_service_whose_stop_fails_ends_as_error_without_waiting(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """saturnin's run() sends ERROR (a traceback) and no FINISHED when stopping fails: daqd
    takes that and the exit as the end, not a timeout."""
    settings = {"count": 2, "report": str(workdir / "r.json"), "fail_stop": True}
    d = daemon(config(peer, "sate", **settings), name="sate")
    wait_until(lambda: service(d)["records"] == 2, 30, "2 records")
    assert d.ctl("transition", "land").returncode == 0
    svc = service(d)["service"]
    assert svc["outcome"] == "ERROR"
    assert svc["details"] == ["RuntimeError: toy cannot park the motor"]
    assert "killing the service" not in d.log()


def test_a_service_that_does_not_finish_is_killed_and_error(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    settings = {"count": 1, "report": str(workdir / "r.json"), "deaf": True}
    d = daemon(config(peer, "satz", stop_timeout_s=1, **settings), name="satz")
    pid = wait_until(lambda: (s := service(d))["records"] == 1 and s["service"]["pid"], 30, "READY")
    assert d.ctl("transition", "land").returncode == 0
    svc = service(d)["service"]
    assert (svc["outcome"], svc["running"]) == ("ERROR", False)
    assert svc["details"] == ["no FINISHED within 1 s of STOP"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed, and reaped
