"""Receiver `saturnin`: a `daqd serve` daemon starts a real saturnin 0.10.0 MicroService
(tests/saturnin_toy.py, in the peer venv) through daqd's own launcher as its child, controls it
over ICCP in Saturnin's bytes, and publishes what the service sends on its announced endpoint as
records."""

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
from tests.peers import ROOT, peer_python

pytestmark = pytest.mark.interop

PEER_SCRIPT = str(Path(__file__).with_name("saturnin_peer.py"))

CONFIG = """
[daemon]
name = "{name}"
drain_timeout_s = 5

[[receiver]]
type = "saturnin"
name = "toy"
python = "{python}"
service = "tests.saturnin_toy:SERVICE_DESCRIPTOR"
service_config = "{service_config}"
env = {{ PYTHONPATH = "{root}" }}
take = ["output"]
start_timeout_s = {start_timeout_s}
stop_timeout_s = {stop_timeout_s}
"""

COMMAND = """
[daemon]
name = "{name}"
drain_timeout_s = 5

[[receiver]]
type = "saturnin"
name = "toy"
command = ["{python}", "{script}", "service", "{{controller}}", '{settings}']
start_timeout_s = {start_timeout_s}
"""


@pytest.fixture(scope="module")
def peer() -> str:
    return str(peer_python("saturnin"))


def service_config(workdir: Path, **options: Any) -> Path:
    """The toy's Saturnin configuration file (INI, section [toy])."""
    path = workdir / "toy.cfg"
    lines = ["[toy]", f"report = {workdir / 'report.json'}"]
    for key, value in options.items():
        lines.append(f"{key} = {json.dumps(value) if key == 'inject' else value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def config(
    peer: str,
    name: str,
    workdir: Path,
    start_timeout_s: float = 20,
    stop_timeout_s: float = 20,
    **options: Any,
) -> str:
    return CONFIG.format(
        name=name,
        python=peer,
        service_config=service_config(workdir, **options),
        root=ROOT,
        start_timeout_s=start_timeout_s,
        stop_timeout_s=stop_timeout_s,
    )


def service(d: Daemon) -> dict[str, Any]:
    toy: dict[str, Any] = d.status()["receivers"]["toy"]
    return toy


def report(workdir: Path) -> dict[str, Any]:
    got: dict[str, Any] = json.loads((workdir / "report.json").read_text())
    return got


def test_daqd_runs_a_saturnin_service(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    d = daemon(config(peer, "satd", workdir, count=50), name="satd")
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
    assert report(workdir) == {"sent": 50, "pid": svc["pid"]}
    assert d.stop() == 0


def test_a_killed_service_is_restarted(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    d = daemon(config(peer, "satk", workdir, count=5), name="satk")
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


def serve_fails(workdir: Path, text: str) -> str:
    """`daqd serve` of `text`, which must fail at start; its stderr."""
    path = workdir / "sat.toml"
    path.write_text(text)
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        [DAQD, "serve", str(path)],
        env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("extra", "options", "words"),
    [
        # CONF in the form saturnin's parser reads: its handler then fails on its own bug A7.2
        (
            'conf = { logging_id = "toy" }',
            {},
            "saturnin service refused CONF: AttributeError: 'ICCPMessage' object has no "
            "attribute 'config'",
        ),
        # saturnin's ERROR (a whole traceback) instead of READY: its last line is the reason
        ("", {"fail": "yes"}, "saturnin service could not start: RuntimeError: toy cannot start"),
        # the service's configuration is refused by saturnin itself: the launcher says why
        (
            "",
            {"count": "many"},
            "saturnin service could not start: Error: Configuration error: invalid literal for int()",
        ),
    ],
)
def test_a_service_that_does_not_start_is_a_clear_error(
    peer: str, workdir: Path, extra: str, options: dict[str, Any], words: str
) -> None:
    stderr = serve_fails(workdir, config(peer, "satf", workdir, **options) + extra)
    assert f"receiver 'toy' cannot start: {words}" in stderr


def test_an_unknown_service_is_named_with_those_installed(peer: str, workdir: Path) -> None:
    text = config(peer, "satu", workdir).replace(
        '"tests.saturnin_toy:SERVICE_DESCRIPTOR"', '"saturnin.no.such.reader"'
    )
    stderr = serve_fails(workdir, text)
    assert (
        "receiver 'toy' cannot start: saturnin service could not start: LookupError: no "
        "Saturnin service 'saturnin.no.such.reader' is installed (installed: "
    ) in stderr


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        # a READY saturnin's own parser would call INVALID (uid of 3 bytes)
        (
            {"bad_ready": True},
            "saturnin service: ICCP READY: PeerIdentification.uid must be 16 bytes, got 3",
        ),
        # nothing within start_timeout_s
        ({"silent": True}, "saturnin service sent no READY within 1 s"),
    ],
)
def test_a_command_that_is_no_saturnin_service_is_a_clear_error(
    peer: str, workdir: Path, settings: dict[str, Any], words: str
) -> None:
    text = COMMAND.format(
        name="satc",
        python=peer,
        script=PEER_SCRIPT,
        settings=json.dumps(settings),
        start_timeout_s=1,
    )
    assert f"receiver 'toy' cannot start: {words}" in serve_fails(workdir, text)


def test_saturnin_without_the_launcher_mostly_fails_on_an_ipc_controller(
    peer: str, workdir: Path
) -> None:
    """The bug the launcher works around: the same toy service, warmed up as saturnin itself
    does it but on an ipc controller, fails "Broken component control channel" before sending
    anything, unless the connection wins a race (about 1 start in 6 here, so 20 tries: the
    chance that none fails is below 1e-15)."""
    done = subprocess.run(
        [peer, PEER_SCRIPT, "bare-race", str(service_config(workdir, count=0)), "20"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    race = json.loads(done.stdout)
    assert race["failed"] >= 1
    assert race["errors"] == ["ServiceError: Broken component control channel"]


def test_malformed_control_messages_from_the_service_are_counted(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """After READY the service sends garbage and messages out of turn on its control channel:
    each is counted, the service goes on, and STOP still gets its FINISHED."""
    inject = [["01"], ["0001", "0aff"], ["0063"], ["0003"]]
    d = daemon(config(peer, "satm", workdir, count=3, inject=inject), name="satm")
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
    d = daemon(config(peer, "sate", workdir, count=2, fail_stop="yes"), name="sate")
    wait_until(lambda: service(d)["records"] == 2, 30, "2 records")
    assert d.ctl("transition", "land").returncode == 0
    svc = service(d)["service"]
    assert svc["outcome"] == "ERROR"
    assert svc["details"] == ["RuntimeError: toy cannot park the motor"]
    assert "killing the service" not in d.log()


def test_a_service_that_does_not_finish_is_killed_and_error(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    text = config(peer, "satz", workdir, stop_timeout_s=1, count=1, stall_stop_s=60)
    d = daemon(text, name="satz")
    pid = wait_until(lambda: (s := service(d))["records"] == 1 and s["service"]["pid"], 30, "READY")
    assert d.ctl("transition", "land").returncode == 0
    svc = service(d)["service"]
    assert (svc["outcome"], svc["running"]) == ("ERROR", False)
    assert svc["details"] == ["no FINISHED within 1 s of STOP"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed, and reaped


def test_service_and_command_are_one_or_the_other(workdir: Path) -> None:
    path = workdir / "both.toml"
    path.write_text(
        '[daemon]\nname = "satv"\n\n[[receiver]]\ntype = "saturnin"\nname = "toy"\n'
        'service = "saturnin.text.reader"\ncommand = ["x"]\n'
    )
    done = subprocess.run([DAQD, "check", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f'{path}: [[receiver]] #1 (name "toy"): give either service' in done.stderr


def gone(pid: int) -> bool:
    """The process has ended (a zombie not yet reaped by init counts as ended)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_a_service_whose_daqd_dies_is_stopped_not_orphaned(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """daqd killed -9: the launcher sees its parent gone and sends the service STOP, so it stops
    as it would on daqd's STOP (its stop_activities writes the report) and exits."""
    d = daemon(config(peer, "sato", workdir, count=3), name="sato")
    pid = wait_until(lambda: (s := service(d))["records"] == 3 and s["service"]["pid"], 30, "READY")
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()
    wait_until(lambda: gone(pid), 30, "the service to exit")
    assert report(workdir) == {"sent": 3, "pid": pid}
