"""daqd as a component of a real Saturnin controller: saturnin 0.10.0's PairChannel +
ICCPController (tests/saturnin_peer.py, in the peer venv) starts `daqd serve --controller ADDR
--iccp saturnin CONFIG` and drives it READY -> [CONF] -> STOP -> FINISHED over ipc, reading every
message with saturnin's own parser and session rules; data goes through the daemon meanwhile."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import daqd
from daqd.control_client import ControlClient
from tests.conftest import DAQCTL, DAQD, wait_until
from tests.peers import peer_python

pytestmark = pytest.mark.interop

PEER_SCRIPT = str(Path(__file__).with_name("saturnin_peer.py"))

CONFIG = """
[daemon]
name = "satc"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:{port}"
publish_to = ["disk", "live"]

[[publisher]]
type = "file"
name = "disk"
directory = "{data}"

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
"""

EXTRA = """
[[receiver]]
type = "udp"
name = "extra"
listen = "127.0.0.1:0"
publish_to = ["disk"]
"""


@pytest.fixture(scope="module")
def peer() -> str:
    return str(peer_python("saturnin"))


class Controller:
    """The Saturnin controller process: one command line in, one JSON line out."""

    def __init__(self, peer: str, workdir: Path, config: str) -> None:
        self.runtime = workdir / "run"
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        self.config_path = workdir / "satc.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / "satc.log"
        env = {**os.environ, "RUNTIME_DIRECTORY": str(self.runtime)}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [peer, PEER_SCRIPT, "control"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        settings = {
            "address": f"ipc://{self.runtime}/saturnin.ctl",
            "command": [
                DAQD,
                "serve",
                "--controller",
                "{controller}",
                "--iccp",
                "saturnin",
                str(self.config_path),
            ],
            "log": str(self.log_path),
            "ready_timeout_ms": 30000,
            "stop_timeout_ms": 30000,
        }
        self.send(json.dumps(settings))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def line(self, timeout_s: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        text = self.proc.stdout.readline() if ready else ""
        if not text:
            raise AssertionError(f"saturnin controller said nothing; daqd log:\n{self.log()}")
        reply: dict[str, Any] = json.loads(text)
        return reply

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        return self.line()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def controller(peer: str, workdir: Path) -> Iterator[Any]:
    made: list[Controller] = []

    def make(port: int = 0) -> Controller:
        c = Controller(peer, workdir, CONFIG.format(port=port, data=workdir / "data"))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def stat(endpoint: str) -> dict[str, Any]:
    with ControlClient(endpoint, timeout_s=10.0) as c:
        result: dict[str, Any] = c.request("STAT", {})
        return result


def check_ready(ready: dict[str, Any], runtime: Path) -> dict[str, Any]:
    assert ready["type"] == "READY", ready
    peer = ready["peer"]
    assert peer["pid"] == ready["pid"]  # the daqd process the controller started
    assert len(peer["uid"]) == 32 and peer["host"] == socket.gethostname()
    assert peer["supplement"]["name"] == "satc"
    assert peer["supplement"]["version"] == daqd.__version__
    endpoints = ready["endpoints"]
    assert endpoints["control"] == [f"ipc://{runtime}/satc.ctl"]
    assert endpoints["tap"] == [f"ipc://{runtime}/satc.tap"]
    (live,) = endpoints["publisher.live.endpoint"]
    assert live.startswith("tcp://127.0.0.1:") and int(live.rsplit(":", 1)[1]) > 0
    # what is no ZeroMQ address (Saturnin would refuse it as an endpoint) is in the supplement
    addresses = peer["supplement"]["addresses"]
    assert addresses["publisher.disk.directory"].endswith("data")
    return addresses


def send_datagrams(address: str, n: int) -> None:
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(n):
            s.sendto(f"datagram {i}".encode(), (host, int(port)))


@pytest.mark.parametrize("conf", ["none", "saturnin-form", "spec-form"])
def test_saturnin_controller_runs_daqd(controller: Any, conf: str) -> None:
    c = controller()
    addresses = check_ready(c.line(), c.runtime)
    control = f"ipc://{c.runtime}/satc.ctl"
    if conf == "saturnin-form":  # [type, ConfigProto]: what saturnin's controller really sends
        options = {"agent": {"$uuid": "0" * 31 + "5"}, "logging_id": "toylog"}
        assert c.ask("conf " + json.dumps({"options": options})) == {"type": "OK"}
        assert "agent 00000000-0000-0000-0000-000000000005, logging_id toylog" in c.log()
    elif conf == "spec-form":  # [type, "CONF", ConfigProto]: a new daqd configuration
        options = {"config": c.config_path.read_text() + EXTRA, "logging_id": "x"}
        reply = c.ask("conf " + json.dumps({"form": "spec", "options": options}))
        assert reply == {"type": "OK"}
        assert "extra" in stat(control)["receivers"]
    # daqctl works on the control endpoint READY announced: a run, under the Saturnin controller
    env = {**os.environ, "RUNTIME_DIRECTORY": str(c.runtime)}
    started = subprocess.run([DAQCTL, "--name", "satc", "start"], env=env, capture_output=True)
    assert started.returncode == 0, started
    run_id = stat(control)["run"]["run_id"]
    send_datagrams(addresses["receiver.raw.listen"], 5)
    wait_until(lambda: stat(control)["receivers"]["raw"]["records"] == 5, 30, "5 records in daqd")
    finished = c.ask("stop")
    assert finished["type"] == "FINISHED", finished
    assert finished["outcome"] == "OK"
    # the run STOP cut short, drained: all 5 records in it, INTERRUPTED by the stop
    assert finished["details"][0] == f"last run {run_id}: INTERRUPTED"
    assert "5 records received" in finished["details"]
    assert all(len(d) > 1 for d in finished["details"])
    assert finished["exit_code"] == 0
    assert not Path(control[len("ipc://") :]).exists()  # drained and closed


def test_bad_conf_is_error_and_changes_nothing(controller: Any) -> None:
    c = controller()
    check_ready(c.line(), c.runtime)
    control = f"ipc://{c.runtime}/satc.ctl"
    bad = {"config": "[[receiver]]\ntype = 'nope'\n"}
    reply = c.ask("conf " + json.dumps({"form": "spec", "options": bad}))
    assert reply["type"] == "ERROR" and reply["error"].startswith("CONF refused:")
    assert "nope" in reply["error"] and "\n" not in reply["error"]
    reply = c.ask("conf " + json.dumps({"options": {"colour": "blue"}}))
    assert reply == {
        "type": "ERROR",
        "error": "CONF refused: unknown option(s) colour; daqd takes config, agent, logging_id",
    }
    assert sorted(stat(control)["receivers"]) == ["raw"]
    finished = c.ask("stop")
    assert (finished["type"], finished["outcome"], finished["exit_code"]) == ("FINISHED", "OK", 0)


def test_malformed_frames_from_the_controller_get_error_and_daqd_serves_on(
    controller: Any,
) -> None:
    c = controller()
    check_ready(c.line(), c.runtime)
    cases = [
        (["01"], "frame 0: expected 2 bytes"),
        (["0063"], "unknown message type 99"),
        (["0002", "0aff"], "REQUEST (Saturnin protobuf): truncated varint"),
        (["0002", "53544154", ""], "not CONF"),
        (["0003"], "unexpected OK"),
        (["0006", "4f4b"], "unexpected FINISHED"),
    ]
    for frames, words in cases:
        reply = c.ask("raw " + json.dumps(frames))
        assert reply["type"] == "ERROR" and words in reply["error"], (frames, reply)
    assert c.ask("conf " + json.dumps({"options": {"logging_id": "after"}})) == {"type": "OK"}
    finished = c.ask("stop")
    assert (finished["type"], finished["outcome"], finished["exit_code"]) == ("FINISHED", "OK", 0)
    assert "control messages refused: 4 malformed, 2 unexpected" in finished["details"]


def test_daqd_that_cannot_start_sends_error_instead_of_ready(controller: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        c = controller(port=taken.getsockname()[1])
        first = c.line()
        assert first["type"] == "ERROR", first
        assert first["error"].startswith("daqd satc could not start:")
        assert "\n" not in first["error"]
        assert c.ask("exit") == {"exit_code": 1}


def test_sigterm_ends_the_component_with_finished(controller: Any) -> None:
    c = controller()
    ready = c.line()
    check_ready(ready, c.runtime)
    os.kill(ready["pid"], signal.SIGTERM)
    finished = c.ask("recv")
    assert (finished["type"], finished["outcome"], finished["exit_code"]) == ("FINISHED", "OK", 0)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--iccp", "saturnin"], "daqd: --iccp saturnin needs --controller ENDPOINT"),
        (
            ["--controller", "ipc:///nowhere", "--iccp", "saturnin"],
            "daqd: serve --iccp saturnin needs CONFIG (the daemon the component runs)",
        ),
        (["--controller", "ipc:///nowhere", "--iccp", "protobuf"], "'protobuf' is not one of"),
    ],
)
def test_serve_iccp_usage_errors(args: list[str], words: str) -> None:
    done = subprocess.run([DAQD, "serve", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr, done
