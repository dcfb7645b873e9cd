"""The loop-DHS example end to end: DCSS simulator → getLoopTip → camera grab → inference → DCSS.

Also daqd.http.post_json against a real HTTP service: answers, failures, timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daqd.config import parse_config
from daqd.host import Host
from daqd.http import HttpError, HttpStatusError, HttpTimeout, post_json
from daqd.sim.dcss import DcssSimulator, SimDevice

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "loop-dhs"
T = 20.0  # generous: the test box is a loaded 2-core machine


def _load_fakes() -> Any:
    spec = importlib.util.spec_from_file_location(
        "loop_fake_services", EXAMPLE / "fake_services.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fakes = _load_fakes()


@pytest.fixture
async def camera() -> AsyncIterator[Any]:
    cam = fakes.FakeCamera(tip=(0.25, 0.75))
    await cam.start()
    yield cam
    await cam.stop()


@pytest.fixture
async def inference() -> AsyncIterator[Any]:
    service = fakes.FakeInference()
    await service.start()
    yield service
    await service.stop()


def _set(text: str, key: str, value: str) -> str:
    """`text` with the one line `key = ...` of the example's TOML now `key = value`."""
    text, n = re.subn(rf"(?m)^{key} = \S+", lambda _: f"{key} = {value}", text)
    assert n == 1, f"the example config has no single {key!r} line"
    return text


def example_config(
    sim: DcssSimulator,
    camera_url: str,
    inference_url: str,
    grab_timeout_s: str = "20.0",
    inference_timeout_s: str = "20",
) -> str:
    """The example's own TOML, pointed at the simulator, the fake services and free ports.

    The timeouts are generous unless a test is about one running out: an answer that comes must
    never miss a short window because the machine is loaded."""
    text = (EXAMPLE / "loop-dhs.toml").read_text()
    text = _set(text, "connect", f'"{sim.address}"')
    text = _set(text, "url", f'"{camera_url}"')
    text = _set(text, "listen", '"127.0.0.1:0"')
    text = _set(text, "inference_url", f'"{inference_url}"')
    text = _set(text, "grab_timeout_s", grab_timeout_s)
    return _set(text, "inference_timeout_s", inference_timeout_s)


async def start_host(text: str) -> Host:
    # parsed as the example's own file: its handler module is found next to it
    host = Host(parse_config(text, str(EXAMPLE / "loop-dhs.toml")))
    await host.start()
    return host


@pytest.fixture
async def sim() -> AsyncIterator[DcssSimulator]:
    async with DcssSimulator({"loop_dhs": 2}, [SimDevice("operation", "getLoopTip")]) as s:
        yield s


@pytest.fixture
async def dcss(
    sim: DcssSimulator, camera: Any, inference: Any
) -> AsyncIterator[tuple[DcssSimulator, Host]]:
    host = await start_host(example_config(sim, camera.url, inference.url))
    try:
        yield sim, host
    finally:
        await host.stop()


async def get_loop_tip(sim: DcssSimulator) -> tuple[str, str, list[str]]:
    link = await sim.wait_online("loop_dhs", timeout=T)
    op = link.start_operation("getLoopTip", "0")
    status = await asyncio.wait_for(asyncio.shield(op.done), T)
    assert op.completion is not None
    return status, op.completion.args, op.updates


async def test_get_loop_tip_completes_with_the_tip(
    dcss: tuple[DcssSimulator, Host], camera: Any, inference: Any
) -> None:
    sim, host = dcss
    status, args, updates = await get_loop_tip(sim)
    assert (status, args) == ("normal", "0.25 0.75")
    assert updates[0] == "grabbing camera"
    assert updates[1].startswith("inferring 1 ")
    # The frame the camera served is the one the inference service was given.
    assert len(camera.served) == 1 and len(inference.received) == 1
    assert inference.received[0]["image"] == camera.served[0]
    assert inference.received[0]["content_type"] == "image/jpeg"
    assert inference.received[0]["source"] == "camera"
    assert host.receivers["camera"].counters.records == 1
    # A second operation grabs a fresh frame.
    status, args, _ = await get_loop_tip(sim)
    assert (status, args) == ("normal", "0.25 0.75")
    assert len(camera.served) == 2


async def test_inference_failure_fails_the_operation(
    dcss: tuple[DcssSimulator, Host], inference: Any
) -> None:
    sim, _ = dcss
    inference.mode = "fail"
    status, args, _ = await get_loop_tip(sim)
    assert status == "error"
    assert "HTTP 500" in args and "model not loaded" in args
    inference.mode = "garbage"
    status, args, _ = await get_loop_tip(sim)
    assert status == "error" and "not JSON" in args


async def test_an_inference_service_that_never_answers_fails_the_operation_in_time(
    sim: DcssSimulator, camera: Any, inference: Any
) -> None:
    host = await start_host(example_config(sim, camera.url, inference.url, inference_timeout_s="1"))
    try:
        inference.mode = "stall"
        status, args, _ = await get_loop_tip(sim)
    finally:
        await host.stop()
    assert status == "error" and "no answer within 1 s" in args
    assert len(inference.received) == 1  # it was asked, once


async def test_no_tip_found_fails_the_operation(
    dcss: tuple[DcssSimulator, Host], camera: Any
) -> None:
    sim, _ = dcss
    camera.mode = "no_tip"
    status, args, _ = await get_loop_tip(sim)
    assert (status, args) == ("error", "{no tip: no loop in view}")


async def test_camera_failure_fails_the_operation(
    sim: DcssSimulator, camera: Any, inference: Any
) -> None:
    host = await start_host(example_config(sim, camera.url, inference.url, grab_timeout_s="2.0"))
    try:
        camera.mode = "fail"
        status, args, _ = await get_loop_tip(sim)
        assert status == "error"
        assert "no image from 'camera' within 2 s" in args and "HTTP 503" in args
        assert inference.received == []
        # every try in those 2 s was a 503 (how many depends on the backoff and the load)
        errors = host.receivers["camera"].counters.errors
        assert set(errors) == {"http_status"} and errors["http_status"] >= 1
        camera.mode = "ok"  # the camera is back: the next operation works
        status, args, _ = await get_loop_tip(sim)
        assert (status, args) == ("normal", "0.25 0.75")
    finally:
        await host.stop()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("inference_url", None, "{setting inference_url missing from [receiver.handler_settings]}"),
        ("camera", None, "{setting camera missing from [receiver.handler_settings]}"),
        ("camera", "3", "{setting camera = 3 is not a non-empty string}"),
        ("grab_timeout_s", '"soon"', "{setting grab_timeout_s = 'soon' is not a positive number"),
        ("inference_timeout_s", "0", "{setting inference_timeout_s = 0 is not a positive number"),
    ],
)
async def test_missing_or_bad_setting_fails_the_operation_naming_it(
    sim: DcssSimulator, camera: Any, inference: Any, key: str, value: str | None, reason: str
) -> None:
    text = example_config(sim, camera.url, inference.url)
    if value is None:
        text, n = re.subn(rf"(?m)^{key} = .*\n", "", text)
        assert n == 1
    else:
        text = _set(text, key, value)
    host = await start_host(text)
    try:
        status, args, updates = await get_loop_tip(sim)
    finally:
        await host.stop()
    assert status == "error" and args.startswith(reason)
    assert updates == []  # refused before touching the camera or the service
    assert camera.served == [] and inference.received == []


async def test_timeouts_default_when_not_set(
    sim: DcssSimulator, camera: Any, inference: Any
) -> None:
    text = example_config(sim, camera.url, inference.url)
    text, n = re.subn(r"(?m)^(grab|inference)_timeout_s = .*\n", "", text)
    assert n == 2
    host = await start_host(text)
    try:
        camera.mode = "fail"
        status, args, _ = await get_loop_tip(sim)
    finally:
        await host.stop()
    assert status == "error" and "no image from 'camera' within 5 s" in args


# ------------------------------------------------------------------ post_json on its own


async def test_post_json_answers_and_errors(inference: Any) -> None:
    image = fakes.jpeg_with_tip(0.5, 0.125)
    answer = await post_json(inference.url, {"image": base64.b64encode(image).decode()}, 5)
    assert answer == {"found": True, "x": 0.5, "y": 0.125}
    with pytest.raises(HttpStatusError, match="HTTP 400") as err:
        await post_json(inference.url, {"no": "image"}, 5)
    assert err.value.status == 400
    inference.mode = "stall"
    with pytest.raises(HttpTimeout, match=r"no answer within 0\.3 s"):
        await post_json(inference.url, {"image": ""}, 0.3)
    with pytest.raises(HttpError, match="not JSON-serialisable"):
        await post_json(inference.url, {"image": object()}, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(HttpError, match=f"127.0.0.1:{closed_port}"):
        await post_json(f"http://127.0.0.1:{closed_port}/predict", {}, 5)
