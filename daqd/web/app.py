"""The web view, served by the daemon's own event loop (aiohttp).

- `/`: the live page (static files shipped in the package; no build step, no CDN)
- `/events`: Server-Sent Events: the status once a second; with `?watch=RECEIVER` also that
  receiver's last records and, for slow-signal readouts, the camera picture (at most twice a second)
- `/metrics`: Prometheus exposition (daqd/web/collector.py)
- `/api/status`: the snapshot the page shows, as JSON
- `POST /api/control`: start/stop/interrupt/recover with `Authorization: Bearer TOKEN`, only when
  `http_token_file` is set; the same transitions, refusals and messages as `daqctl`

Live records come from the host's tap (the XPUB `daqctl tap` uses): the web view subscribes to a
receiver's topic only while a page watches it, so nothing is tapped while nobody looks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hmac
import json
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from daqd.errors import ControlError
from daqd.web import camera
from daqd.web.collector import make_registry
from daqd.web.settings import parse_http, read_token

if TYPE_CHECKING:
    from daqd.host import Host

log = logging.getLogger("daqd.web")

HISTORY_S = 300  # rate history for the sparklines: the last five minutes, one sample a second
PUSH_INTERVAL_S = 0.5  # live records / camera: at most twice a second per page
TAP_ROWS = 20
FIRST_BYTES = 16
CONTROL_TRANSITIONS = ("start", "stop", "interrupt", "recover")


class WarningBuffer(logging.Handler):
    """The last warnings and errors of the daemon's log, for the page."""

    def __init__(self, size: int = 50) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        self.lines.append(
            {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": text[:500],
            }
        )


class Watch:
    """One receiver's live view: its last records and latest readout, filled from the tap."""

    def __init__(self) -> None:
        self.watchers = 0
        self.rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=TAP_ROWS)
        self.version = 0  # bumped per record taken
        self.readout: tuple[dict[str, Any], bytes] | None = None
        self.readout_version = 0
        self.complete_at = 0.0  # monotonic time of the last complete readout

    def take(self, header: dict[str, Any], blocks: list[bytes]) -> None:
        size = sum(len(b) for b in blocks)
        first = b"".join(blocks)[:FIRST_BYTES] if blocks else b""
        tags = header.get("tags") or {}
        self.rows.append(
            {
                "time_ns": header.get("time_ns"),
                "source": header.get("source"),
                "seq": header.get("seq"),
                "size": size,
                "tags": _short_tags(tags),
                "first": first.hex(" "),
            }
        )
        self.version += 1
        if isinstance(tags, dict) and "modules_present" in tags and len(blocks) == 1:
            complete = bool(tags.get("complete"))
            now = time.monotonic()
            # the latest complete readout; an incomplete one only when none came for 5 s
            if complete or now - self.complete_at > 5.0:
                self.readout = (tags, bytes(blocks[0]))
                self.readout_version += 1
            if complete:
                self.complete_at = now


def _short_tags(tags: Any) -> str:
    try:
        text = json.dumps(tags, default=repr, separators=(",", ":"))
    except Exception:
        text = repr(tags)
    return text if len(text) <= 200 else text[:199] + "…"


class WebView:
    """The aiohttp application and what feeds it."""

    max_pages = 64  # open event streams at once; more get 503 (counted: too_many_pages)

    def __init__(self, host: Host, address: str, token_file: str | None) -> None:
        self.host = host
        self.bind = parse_http(address)
        self.token = read_token(token_file) if token_file else None
        self.http_counters: dict[str, int] = {}
        self.registry = make_registry(host, self.http_counters)
        self.warnings = WarningBuffer()
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_S)
        self.runs: collections.deque[dict[str, Any]] = collections.deque(maxlen=10)
        self._last_run: Any = None
        self._last_totals: dict[str, int] = {}
        self._last_t = 0.0
        self.watches: dict[str, Watch] = {}
        self.clients: set[asyncio.Queue[str | None]] = set()
        self._status_event = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: zmq.asyncio.Socket | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ----- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/api/geometry", self._geometry)
        app.router.add_get("/events", self._events)
        app.router.add_post("/api/control", self._control)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        host, port = self.bind
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ControlError(f"web view cannot listen on {host}:{port}: {exc}") from None
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/"
        logging.getLogger("daqd").addHandler(self.warnings)
        self._tasks.append(asyncio.create_task(self._sample_forever(), name="web-sampler"))
        log.info(
            "web view on %s (run control %s)",
            self.url,
            "with the token" if self.token else "off: no http_token_file",
        )

    async def stop(self) -> None:
        for q in list(self.clients):
            _offer(q, None)  # every open event stream ends
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        logging.getLogger("daqd").removeHandler(self.warnings)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----- the status snapshot, sampled once a second ------------------------------------------
    async def _sample_forever(self) -> None:
        while True:
            try:
                self._sample()
                if self.clients:
                    self._status_event = _event("status", self.snapshot())
                    for q in self.clients:
                        _offer(q, self._status_event)
            except Exception as exc:  # the page must never take the daemon down
                log.error("web view: status sample failed: %r", exc)
            await asyncio.sleep(1.0)

    def _sample(self) -> None:
        host = self.host
        now = time.monotonic()
        dt = now - self._last_t if self._last_t else 0.0
        totals: dict[str, int] = {}
        sample: dict[str, Any] = {"t": time.time()}
        rates: dict[str, float] = {}
        for kind, items in (
            ("receiver", ((n, r.counters) for n, r in host.receivers.items())),
            ("publisher", ((n, p.counters) for n, p in host.publishers.items())),
        ):
            for name, c in items:
                key = f"{kind}/{name}"
                totals[key] = c.records
                before = self._last_totals.get(key)
                if dt > 0 and before is not None and c.records >= before:
                    rates[key] = round((c.records - before) / dt, 2)
        sample["rates"] = rates
        self._last_totals = totals
        self._last_t = now
        if dt > 0:
            self.history.append(sample)
        if host.last_run is not None and host.last_run is not self._last_run:
            self._last_run = host.last_run
            self.runs.appendleft(host.last_run.metadata())

    def snapshot(self) -> dict[str, Any]:
        status = self.host.status()
        status["run_duration_s"] = (
            round((time.time_ns() - self.host.run.start_ns) / 1e9, 1) if self.host.run else None
        )
        return {
            "status": status,
            "history": list(self.history),
            "runs": list(self.runs),
            "warnings": list(self.warnings.lines)[-20:],
            "control": self.token is not None,
            "http_refused": dict(self.http_counters),
            "kinds": {n: r.settings.type for n, r in self.host.receivers.items()},
            "watching": {n: w.watchers for n, w in self.watches.items() if w.watchers},
        }

    # ----- handlers ----------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return await self._static_file("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return await self._static_file(request.match_info["name"])

    async def _static_file(self, name: str) -> web.StreamResponse:
        types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
        kind = next((t for ext, t in types.items() if name.endswith(ext)), None)
        if kind is None or "/" in name or name.startswith("."):
            raise web.HTTPNotFound()
        try:
            data = resources.files("daqd.web").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise web.HTTPNotFound() from None
        return web.Response(
            body=data, content_type=kind, charset="utf-8", headers={"Cache-Control": "no-cache"}
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _api_status(self, request: web.Request) -> web.Response:
        self._sample_if_stale()
        return web.json_response(self.snapshot(), dumps=_dumps)

    async def _geometry(self, request: web.Request) -> web.Response:
        return web.json_response(camera.geometry(self.host.config.daemon.http_camera_modules))

    def _sample_if_stale(self) -> None:
        if time.monotonic() - self._last_t > 2.0:
            self._sample()

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self.clients) >= self.max_pages:
            self._count("too_many_pages")
            raise web.HTTPServiceUnavailable(
                text=f"already {self.max_pages} open pages: close one, or use /api/status"
            )
        watch_name = request.query.get("watch") or None
        if watch_name is not None and watch_name not in self.host.receivers:
            raise web.HTTPNotFound(text=f"no receiver named {watch_name!r}")
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=8)
        self.clients.add(queue)
        watch = self._watch(watch_name) if watch_name else None
        pusher = (
            asyncio.create_task(self._push_watch(watch_name, watch, queue))
            if watch_name and watch
            else None
        )
        try:
            self._sample_if_stale()
            await resp.write(_event("status", self.snapshot()).encode())
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    item = ": keep-alive\n\n"
                if item is None:
                    break
                await resp.write(item.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(queue)
            if pusher is not None:
                pusher.cancel()
            if watch_name:
                self._unwatch(watch_name)
        return resp

    async def _push_watch(self, name: str, watch: Watch, queue: asyncio.Queue[str | None]) -> None:
        """At most twice a second: the watched receiver's new records, and a new readout."""
        seen, seen_readout = -1, -1
        while True:
            if watch.version != seen:
                seen = watch.version
                _offer(queue, _event("records", {"name": name, "rows": list(watch.rows)}))
            if watch.readout is not None and watch.readout_version != seen_readout:
                seen_readout = watch.readout_version
                tags, payload = watch.readout
                picture = camera.readout_json(tags, payload)
                if picture is not None:
                    picture["name"] = name
                    _offer(queue, _event("camera", picture))
            await asyncio.sleep(PUSH_INTERVAL_S)

    # ----- the tap: subscribed only while watched ----------------------------------------------
    def _watch(self, name: str) -> Watch | None:
        endpoint = self.host.tap_endpoint
        if endpoint is None:
            return None
        if self._sub is None:
            sub = self.host.zmq_context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 1000)
            sub.connect(endpoint)
            self._sub = sub
            self._tasks.append(asyncio.create_task(self._tap_forever(sub), name="web-tap"))
        watch = self.watches.setdefault(name, Watch())
        watch.watchers += 1
        if watch.watchers == 1:
            self._sub.setsockopt(zmq.SUBSCRIBE, name.encode())
        return watch

    def _unwatch(self, name: str) -> None:
        watch = self.watches.get(name)
        if watch is None:
            return
        watch.watchers -= 1
        if watch.watchers <= 0:  # kept: the next page sees the last picture at once
            watch.watchers = 0
            if self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, name.encode())

    async def _tap_forever(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart(copy=True)
            if len(frames) < 2:
                continue
            topic = frames[0].decode("utf-8", "replace")
            watch = self.watches.get(topic)  # exact name: "raw" also receives "raw2" by prefix
            if watch is None or not watch.watchers:
                continue
            try:
                header = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
            except Exception:
                continue
            if isinstance(header, dict):
                watch.take(header, frames[2:])

    # ----- run control -------------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        self.http_counters[reason] = self.http_counters.get(reason, 0) + 1

    def _refuse(self, reason: str, message: str) -> web.Response:
        self._count(reason)
        log.warning("web view: run control refused (%s)", reason)
        return web.json_response({"error": message}, status=403)

    async def _control(self, request: web.Request) -> web.Response:
        if self.token is None:
            return self._refuse(
                "control_off", "run control from the web view is off: set http_token_file"
            )
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return self._refuse("no_token", "run control needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            return self._refuse("bad_token", "wrong token")
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        transition = body.get("transition") if isinstance(body, dict) else None
        if transition not in CONTROL_TRANSITIONS:
            return web.json_response(
                {"error": f"transition must be one of {', '.join(CONTROL_TRANSITIONS)}"},
                status=400,
            )
        args: dict[str, Any] = {}
        run_id = body.get("run_id")
        if transition == "start" and run_id:
            args["run_id"] = str(run_id)
        try:
            reply = await self.host.handle_request("CTRL", {"transition": transition, "args": args})
        except ControlError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        log.info("web view: %s by a token holder -> %s", transition, reply.get("state"))
        return web.json_response(reply, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=repr)


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {_dumps(data)}\n\n"


def _offer(queue: asyncio.Queue[str | None], item: str | None) -> None:
    """A page that cannot keep up misses updates (the next one replaces them), never blocks."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(item)


async def start_web(host: Host) -> WebView | None:
    """Start the web view if [daemon] http is set."""
    d = host.config.daemon
    if d.http is None:
        return None
    view = WebView(host, d.http, d.http_token_file)
    await view.start()
    # as `daqd serve` did for what start-up made (tune_for_throughput): the web view's modules
    # and objects live as long as the daemon; the cycle collector need not walk them again and
    # again (bench/web.py and README: one run measured 0.87x of the ingest without the web view
    # before this, runs after it 0.94-0.97x, within that machine's noise)
    gc.freeze()
    return view
