"""The web view through real sockets: /metrics against `daqctl status --json`, run control with
and without the token, the event stream, the tap subscribed only while watched, the config keys."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daqd.config import check_daemon, parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.protocols.slowsignal import MV_PER_COUNT, encode_ssdaq_frame
from daqd.web import camera
from daqd.web.app import WebView

from .conftest import DAQD, Daemon, wait_for, wait_until

TOKEN = "s3cret-token-for-tests-0123"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def config(tmp_path: Path, *, token: bool = True, http: str = "127.0.0.1:0") -> str:
    lines = ["[daemon]", 'name = "web"', f'http = "{http}"']
    if token:
        (tmp_path / "token").write_text(TOKEN + "\n")
        lines.append(f'http_token_file = "{tmp_path / "token"}"')
    lines += [
        "[[receiver]]",
        'type = "udp"',
        'name = "raw"',
        'listen = "127.0.0.1:0"',
        'publish_to = ["disk", "tiny"]',
        "[[receiver]]",
        'type = "slowsignal"',
        'name = "cam"',
        'listen = "127.0.0.1:0"',
        "modules = 4",
        'publish_to = ["disk"]',
        "[[publisher]]",
        'type = "file"',
        'name = "disk"',
        f'directory = "{tmp_path / "out"}"',
        'fsync = "never"',
        "[[publisher]]",  # a queue that drops: daqd_dropped_total for a publisher
        'type = "file"',
        'name = "tiny"',
        f'directory = "{tmp_path / "out2"}"',
        'fsync = "never"',
        "queue_size = 1",
        'policy = "drop"',
    ]
    return "\n".join(lines) + "\n"


def url(d: Daemon) -> str:
    return str(wait_until(lambda: d.status().get("http"), 10, "the web view's address"))


def udp_port(d: Daemon, name: str) -> int:
    return int(d.status()["receivers"][name]["addresses"]["listen"].rsplit(":", 1)[1])


def get(address: str, path: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(address + path.lstrip("/"), timeout=10) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def post(address: str, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        address + "api/control", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metrics(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text, headers = get(address, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def status_json(d: Daemon) -> dict[str, Any]:
    out = d.ctl("status", "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_metrics_equal_daqctl_status(daemon: Any, tmp_path: Path) -> None:
    d = daemon(config(tmp_path), name="web")
    address = url(d)
    raw, cam = udp_port(d, "raw"), udp_port(d, "cam")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(300):
            s.sendto(i.to_bytes(4, "big") * 25, ("127.0.0.1", raw))
        for _ in range(3):  # not a multiple of 144 bytes: counted under a reason
            s.sendto(b"x" * 100, ("127.0.0.1", cam))

    def settled() -> bool:
        st = d.status()
        r, c = st["receivers"]["raw"], st["receivers"]["cam"]
        pubs = st["publishers"].values()
        return (
            r["records"] + r["drops"].get("kernel", 0) == 300
            and sum(c["errors"].values()) + sum(c["drops"].values()) >= 3
            and all(
                p["queue"] == 0 and p["offered"] == p["records"] + sum(p["drops"].values())
                for p in pubs
            )
        )

    wait_until(settled, 30, "every datagram counted and every queue empty")
    st = status_json(d)
    m = metrics(address)

    def value(metric: str, **labels: str) -> float:
        return m.get((metric, tuple(sorted(labels.items()))), 0.0)

    checked = 0
    for kind, group in (("receiver", st["receivers"]), ("publisher", st["publishers"])):
        for name, s in group.items():
            assert value("daqd_records_total", component=kind, name=name) == s["records"]
            assert value("daqd_bytes_total", component=kind, name=name) == s["bytes"]
            for reason, n in s["drops"].items():
                assert value("daqd_dropped_total", component=kind, name=name, reason=reason) == n
                checked += 1
            for reason, n in s["errors"].items():
                assert value("daqd_errors_total", component=kind, name=name, reason=reason) == n
                checked += 1
            # no reason in /metrics that status does not have
            for (metric, labels), _ in m.items():
                lab = dict(labels)
                if metric in ("daqd_dropped_total", "daqd_errors_total") and (
                    lab.get("component"),
                    lab.get("name"),
                ) == (kind, name):
                    table = s["drops"] if metric == "daqd_dropped_total" else s["errors"]
                    assert lab["reason"] in table
    assert st["receivers"]["raw"]["records"] > 0
    assert st["publishers"]["tiny"]["drops"], "the tiny drop queue dropped nothing"
    cam = st["receivers"]["cam"]
    assert cam["errors"] or cam["drops"], "the cam's refusals were not counted"
    assert checked >= 2  # the cam's refusals, tiny's drops (and the kernel's, where counted)
    assert value("daqd_dropped_total", component="receiver", name="raw", reason="kernel") == (
        st["receivers"]["raw"]["drops"].get("kernel", 0)
    )
    for name, p in st["publishers"].items():
        assert value("daqd_queue_depth", name=name) == p["queue"]
        assert value("daqd_queue_capacity", name=name) == p["queue_size"]
        assert value("daqd_publisher_offered_total", name=name) == p["offered"]
    assert value("daqd_state", state="ORBIT") == 1
    assert sum(v for (n, _), v in m.items() if n == "daqd_state") == 1
    assert value("daqd_run_active") == 0
    assert abs(value("daqd_uptime_seconds") - st["uptime_s"]) < 30
    assert value("daqd_receiver_up", name="cam") == 1

    # a run: its state, id and number
    code, reply = post(address, {"transition": "start", "run_id": "4711"}, TOKEN)
    assert (code, reply["state"]) == (200, "RUN")
    m = metrics(address)
    assert value("daqd_state", state="RUN") == 1
    assert value("daqd_run_active") == 1
    assert value("daqd_run_number") == 4711
    assert value("daqd_run_info", run_id="4711") == 1
    assert value("daqd_run_start_time_seconds") == pytest.approx(
        status_json(d)["run"]["time_start"] / 1e9
    )
    # every metric the shipped Grafana dashboard asks for is in the exposition
    families = {f.name for f in text_string_to_metric_families(get(address, "/metrics")[1])}
    known = {n for n, _ in m} | families | {f + "_total" for f in families}
    dashboard = (EXAMPLES / "grafana-daqd.json").read_text()
    exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\bdaqd_[a-z_]+", e)}
    assert len(used) >= 10 and used <= known, used - known
    assert 'targets: ["127.0.0.1:8080"]' in (EXAMPLES / "prometheus.yml").read_text()


def test_run_control_needs_the_token_and_says_what_daqctl_says(daemon: Any, tmp_path: Path) -> None:
    d = daemon(config(tmp_path), name="web")
    address = url(d)
    assert post(address, {"transition": "start"}, None)[0] == 403
    assert post(address, {"transition": "start"}, "wrong-token-wrong-token")[0] == 403
    assert d.status()["state"] == "ORBIT"  # nothing happened
    refused = {
        labels: v
        for (name, labels), v in metrics(address).items()
        if name == "daqd_http_refused_total"
    }
    assert refused == {(("reason", "no_token"),): 1.0, (("reason", "bad_token"),): 1.0}

    code, reply = post(address, {"transition": "start", "run_id": "web-1"}, TOKEN)
    assert code == 200 and reply["state"] == "RUN"
    assert d.status()["run"]["run_id"] == "web-1"
    # a refused transition: the same message daqctl prints
    code, reply = post(address, {"transition": "start", "run_id": "web-2"}, TOKEN)
    out = d.ctl("start", "web-3")
    assert code == 409 and out.returncode != 0
    assert reply["error"].replace("web-2", "X") in out.stderr.replace("web-3", "X")
    code, reply = post(address, {"transition": "stop"}, TOKEN)
    assert code == 200 and reply["state"] == "ORBIT"
    assert reply["run"]["run_id"] == "web-1" and reply["run"]["condition"] == "GOOD"
    code, reply = post(address, {"transition": "interrupt"}, TOKEN)
    assert (code, reply["state"]) == (200, "SAFE")
    code, reply = post(address, {"transition": "recover"}, TOKEN)
    assert (code, reply["state"]) == (200, "INIT")
    code, reply = post(address, {"transition": "shutdown"}, TOKEN)
    assert code == 400 and "start, stop, interrupt, recover" in reply["error"]
    code, reply = post(address, {"transition": "start", "run_id": "bad id!"}, TOKEN)
    assert code == 409
    assert d.status()["state"] == "INIT"


def test_control_off_without_token_file(daemon: Any, tmp_path: Path) -> None:
    d = daemon(config(tmp_path, token=False), name="web")
    address = url(d)
    code, reply = post(address, {"transition": "start"}, TOKEN)
    assert code == 403 and "http_token_file" in reply["error"]
    assert d.status()["state"] == "ORBIT"
    status, text, _ = get(address, "/api/status")
    assert status == 200 and json.loads(text)["control"] is False
    assert metrics(address)[("daqd_http_refused_total", (("reason", "control_off"),))] == 1


def test_page_and_assets_are_served(daemon: Any, tmp_path: Path) -> None:
    d = daemon(config(tmp_path), name="web")
    address = url(d)
    status, page, headers = get(address, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "/static/app.js" in page and "http" not in page.replace("http-equiv", "").split(
        "<body>"
    )[0].replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    status, js, headers = get(address, "/static/app.js")
    assert (
        status == 200
        and "EventSource" in js
        and "http://" not in js.replace("http://www.w3.org/2000/svg", "")
    )
    assert get(address, "/static/../settings.py")[0] == 404
    assert get(address, "/static/nothing.js")[0] == 404
    snapshot = json.loads(get(address, "/api/status")[1])
    assert set(snapshot["status"]["receivers"]) == {"raw", "cam"}
    assert snapshot["control"] is True and snapshot["kinds"] == {"raw": "udp", "cam": "slowsignal"}


def test_camera_module_placement_is_configurable(daemon: Any, tmp_path: Path) -> None:
    """The page draws modules where [daemon] http_camera_modules puts them; a layout that does
    not fit the focal plane is refused naming the key."""
    default = camera.module_positions()
    mirrored = [[r, 5 - c] for r, c in default]  # the grid seen from the other side
    text = config(tmp_path).replace(
        'http = "127.0.0.1:0"\n', f'http = "127.0.0.1:0"\nhttp_camera_modules = {mirrored}\n'
    )
    d = daemon(text, name="web")
    status, body, _ = get(url(d), "/api/geometry")
    assert status == 200 and json.loads(body)["modules"] == mirrored
    for bad, why in (
        (mirrored[:31], "needs 32"),
        ([[0, 6], *mirrored[1:]], "outside the 6x6 grid"),
        ([mirrored[1], *mirrored[1:]], "two modules at the same place"),
    ):
        text = config(tmp_path).replace(
            'http = "127.0.0.1:0"\n', f'http = "127.0.0.1:0"\nhttp_camera_modules = {bad}\n'
        )
        with pytest.raises(ConfigError, match=rf"http_camera_modules.*{why}"):
            parse_config(text, "w.toml")


def test_off_unless_set(daemon: Any, tmp_path: Path) -> None:
    text = config(tmp_path).replace('http = "127.0.0.1:0"\n', "")
    d = daemon(text, name="web")
    assert "http" not in d.status()
    assert "web view" not in d.log()


def test_config_keys(tmp_path: Path) -> None:
    parse_config(config(tmp_path, token=False), "w.toml")  # loopback without a token: fine
    for http in ("0.0.0.0:8080", "[::]:8080", "example.org:80"):
        with pytest.raises(ConfigError, match="reachable from other hosts: set http_token_file"):
            parse_config(config(tmp_path, token=False, http=http), "w.toml")
    parse_config(config(tmp_path, token=True, http="0.0.0.0:8080"), "w.toml")
    for bad, why in (("8080", "not HOST:PORT"), ("127.0.0.1:99999", "out of range")):
        with pytest.raises(ConfigError, match=why):
            parse_config(config(tmp_path, token=False, http=bad), "w.toml")
    (tmp_path / "short").write_text("abc\n")
    text = config(tmp_path).replace(str(tmp_path / "token"), str(tmp_path / "short"))
    with pytest.raises(ConfigError, match=r"http_token_file.*at least 16 characters"):
        check_daemon(parse_config(text, "w.toml"))
    # the command line says the same
    (tmp_path / "w.toml").write_text(config(tmp_path, token=False, http="0.0.0.0:1"))
    out = subprocess.run([DAQD, "check", str(tmp_path / "w.toml")], capture_output=True, text=True)
    assert out.returncode != 0 and 'key "http"' in out.stderr


def test_geometry() -> None:
    modules = camera.module_positions()
    assert len(modules) == 32 == len(set(modules))
    assert not {(0, 0), (0, 5), (5, 0), (5, 5)} & set(modules)
    assert all(0 <= r < 6 and 0 <= c < 6 for r, c in modules)
    channels = camera.channel_positions()
    assert sorted(channels) == [(r, c) for r in range(8) for c in range(8)]
    # SSDAQ's ssl2colrow: position 0 (top left) shows channel 8, position 57 shows channel 0
    assert channels[8] == (0, 0) and channels[0] == (7, 1)


def test_readouts_decode_in_every_format() -> None:
    counts = (np.arange(32 * 64, dtype=np.int64).reshape(32, 64) * 7 % 65536).astype("<u2")
    mask = (1 << 32) - 1 - (1 << 5)  # module 5 missing
    tags = {"modules_present": mask, "dtype": "<u2", "readout": 3, "tack": 9, "complete": False}
    ro = camera.readout_json(tags, counts.tobytes())
    assert ro is not None and ro["mv"][5] == [] and ro["readout"] == 3
    assert ro["mv"][1][2] == round(float(counts[1, 2]) * MV_PER_COUNT, 2)
    mv = counts.astype(np.float64) * MV_PER_COUNT
    mv[5] = np.nan
    f4 = camera.readout_json({**tags, "dtype": "<f4"}, mv.astype("<f4").tobytes())
    assert f4 is not None and f4["mv"][5] == [] and f4["mv"][1][2] == pytest.approx(ro["mv"][1][2])
    frame = encode_ssdaq_frame(3, 9, 1, 2, mv)
    ss = camera.readout_json({"modules_present": mask, "format": "ssdaq"}, frame)
    assert ss is not None and ss["mv"][5] == [] and ss["mv"][1][2] == ro["mv"][1][2]
    present = mv[~np.isnan(mv)]
    assert ss["min_mv"] == round(float(present.min()), 2)
    assert ss["max_mv"] == round(float(present.max()), 2)
    assert camera.readout_json({"modules_present": mask, "dtype": "<u2"}, b"short") is None
    assert camera.readout_json({"dtype": "<u2"}, counts.tobytes()) is None


async def test_tap_only_while_watched_and_pushes_are_few(tmp_path: Path) -> None:
    """In-process: the host's tap is off until a page watches a receiver, on while it does, off
    again when it leaves; the stream sends a few updates a second however fast records come."""
    cfg = parse_config(config(tmp_path), "w.toml")
    host = Host(cfg)
    await host.start()
    host.open_tap(f"ipc://{tmp_path}/w.tap")
    view = WebView(host, "127.0.0.1:0", str(tmp_path / "token"))
    await view.start()
    port = int(host.receivers["raw"].addresses["listen"].rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = asyncio.Event()

    async def blast() -> None:
        i = 0
        while not stop.is_set():
            for _ in range(200):
                sock.sendto(i.to_bytes(8, "big"), ("127.0.0.1", port))
                i += 1
            await asyncio.sleep(0.01)

    sender = asyncio.create_task(blast())
    try:
        await asyncio.sleep(0.3)
        assert host.taps_active is False  # nobody watches: the data path taps nothing
        events: list[tuple[str, Any]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.get(view.url + "events?watch=raw") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            await wait_for(lambda: host.taps_active, 10, "the tap to be subscribed")
            assert view.snapshot()["watching"] == {"raw": 1}
            view.max_pages = 1  # one more page is refused, and counted
            async with session.get(view.url + "events") as second:
                assert second.status == 503
            assert view.http_counters == {"too_many_pages": 1}
            loop = asyncio.get_running_loop()
            started = loop.time()
            kind = ""
            while loop.time() - started < 3.0:
                line = (await asyncio.wait_for(resp.content.readline(), 10)).decode()
                if line.startswith("event: "):
                    kind = line[7:].strip()
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
            elapsed = loop.time() - started
        await wait_for(lambda: not host.taps_active, 10, "the tap to be unsubscribed")
        assert view.snapshot()["watching"] == {}
    finally:
        stop.set()
        await sender
        sock.close()
        await view.stop()
        await host.stop()
    records = [data for kind, data in events if kind == "records"]
    statuses = [data for kind, data in events if kind == "status"]
    assert host.receivers["raw"].counters.records > 1000
    assert records and records[-1]["rows"], "no live records pushed"
    rows = records[-1]["rows"]
    assert all(r["source"] == "raw" and r["size"] == 8 for r in rows)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    assert rows[-1]["first"] == " ".join(
        f"{b:02x}" for b in (rows[-1]["seq"] - 1).to_bytes(8, "big")
    )
    # at most a few a second (records twice a second, status once), however fast data came
    assert len(records) <= 2 * elapsed + 2 and len(statuses) <= elapsed + 2
    rates = [s["history"][-1]["rates"].get("receiver/raw", 0) for s in statuses if s["history"]]
    assert any(r > 0 for r in rates)


def test_a_taken_port_stops_the_start_with_one_line(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = workdir / "run"
        runtime.mkdir(mode=0o700)
        (workdir / "c.toml").write_text(f'[daemon]\nname = "webp"\nhttp = "127.0.0.1:{port}"\n')
        out = subprocess.run(
            [DAQD, "serve", str(workdir / "c.toml")],
            env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"daqd: web view cannot listen on 127.0.0.1:{port}:")
    assert "address already in use" in last and "Traceback" not in out.stderr
