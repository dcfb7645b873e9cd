"""A fake sample camera (Axis snapshot URL) and a fake loop-tip inference service, for trying the
loop DHS without a beamline, and for its test.

The camera serves JPEGs whose comment segment (FF FE) says where the loop tip is; the inference
service reads that comment back out of the base64 image it is sent. Run both:

    .venv/bin/python examples/loop-dhs/fake_services.py [--camera 127.0.0.1:8081]
        [--inference 127.0.0.1:8008] [--tip 0.41 0.58]
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import binascii
import os
import re
from typing import Any

from aiohttp import web

SNAPSHOT_PATH = "/axis-cgi/jpg/image.cgi"
PREDICT_PATH = "/predict"
_TIP = re.compile(rb"tip=([0-9.]+),([0-9.]+)")


def tip_in(image: bytes) -> tuple[float, float] | None:
    """The tip a `jpeg_with_tip` image carries: its first COM segment, read by its length."""
    if not image.startswith(b"\xff\xd8\xff\xfe") or len(image) < 6:
        return None
    comment = image[6 : 4 + int.from_bytes(image[4:6], "big")]
    m = _TIP.fullmatch(comment)
    return None if m is None else (float(m.group(1)), float(m.group(2)))


def jpeg_with_tip(x: float, y: float, filler_bytes: int = 20_000) -> bytes:
    """A JPEG-framed blob (SOI, COM segment `tip=x,y`, filler, EOI)."""
    comment = f"tip={x:.4f},{y:.4f}".encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return b"\xff\xd8" + segment + os.urandom(filler_bytes) + b"\xff\xd9"


class _Service(abc.ABC):
    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.address = ""

    @abc.abstractmethod
    def routes(self, app: web.Application) -> None:
        """Add this service's routes to `app`."""

    async def start(self, listen: str = "127.0.0.1:0") -> str:
        host, _, port = listen.rpartition(":")
        app = web.Application(client_max_size=64 << 20)
        self.routes(app)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, int(port))
        await site.start()
        server: Any = site._server
        self.address = f"{host}:{server.sockets[0].getsockname()[1]}"
        return self.address

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class FakeCamera(_Service):
    """GET /axis-cgi/jpg/image.cgi → a JPEG; `mode` "ok", "fail" (503) or "no_tip"."""

    def __init__(self, tip: tuple[float, float] = (0.41, 0.58)) -> None:
        super().__init__()
        self.tip = tip
        self.mode = "ok"
        self.served: list[bytes] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_get(SNAPSHOT_PATH, self.snapshot)

    @property
    def url(self) -> str:
        return f"http://{self.address}{SNAPSHOT_PATH}?camera=1"

    async def snapshot(self, request: web.Request) -> web.Response:
        if self.mode == "fail":
            return web.Response(status=503, text="camera busy")
        image = jpeg_with_tip(*self.tip)
        if self.mode == "no_tip":
            image = image.replace(b"tip=", b"nop=")
        self.served.append(image)
        return web.Response(body=image, content_type="image/jpeg")


class FakeInference(_Service):
    """POST /predict with {"image": base64, ...} → {"found", "x", "y"}; `mode` "ok", "fail" (500),
    "stall" (never answers) or "garbage" (not JSON)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.received: list[dict[str, Any]] = []
        self._never = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PREDICT_PATH, self.predict)

    @property
    def url(self) -> str:
        return f"http://{self.address}{PREDICT_PATH}"

    async def predict(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            image = base64.b64decode(body["image"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return web.json_response({"error": "expected {'image': base64}"}, status=400)
        self.received.append({**body, "image": image})
        if self.mode == "fail":
            return web.json_response({"error": "model not loaded"}, status=500)
        if self.mode == "stall":
            await self._never.wait()
        if self.mode == "garbage":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        tip = tip_in(image)
        if tip is None:
            return web.json_response({"found": False, "reason": "no loop in view"})
        return web.json_response({"found": True, "x": tip[0], "y": tip[1]})


async def _serve(camera_at: str, inference_at: str, tip: tuple[float, float]) -> None:
    camera, inference = FakeCamera(tip), FakeInference()
    await camera.start(camera_at)
    await inference.start(inference_at)
    print(f"fake camera: {camera.url}\nfake inference: {inference.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await camera.stop()
        await inference.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--camera", default="127.0.0.1:8081", help="host:port of the fake camera")
    ap.add_argument("--inference", default="127.0.0.1:8008", help="host:port of the fake service")
    ap.add_argument("--tip", nargs=2, type=float, default=(0.41, 0.58), metavar=("X", "Y"))
    args = ap.parse_args()
    try:
        asyncio.run(_serve(args.camera, args.inference, (args.tip[0], args.tip[1])))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
