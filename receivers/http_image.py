"""HTTP image receiver: instruments POST JPEG/PNG images to it; each image becomes one record."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import Field, field_validator

from daqd.hostport import HostPort, format_hostport, parse_hostport
from daqd.http import GrabError, NextRecord
from daqd.logs import LimitedLogger
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record

# Headers that become tags: pydhsfw's JPEG receiver routes on DHS-Request-Type-Id, and instruments
# put their own metadata in X- headers.
TAG_HEADER_PREFIXES = ("x-", "dhs-")
REQUEST_TYPE_HEADER = "DHS-Request-Type-Id"


class HttpImageSettings(ReceiverSettings):
    listen: HostPort
    allowed_types: list[str] = Field(default_factory=lambda: ["image/jpeg", "image/png"])
    max_body_bytes: int = Field(default=32 << 20, gt=0)
    # A client silent this long (mid-body, mid-headers, or idle between requests) is dropped.
    read_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("allowed_types")
    @classmethod
    def _lower_types(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("allowed_types must name at least one content type")
        return [v.strip().lower() for v in value]


class _TooLarge(Exception):
    pass


class _StallWatch:
    """Fails a body stream with TimeoutError once no bytes came for `stall_s`.

    One timer per request, re-armed only when it fires while bytes still flow: a timeout
    context rescheduled on every chunk costs more than the rest of a small image's handling.
    """

    __slots__ = ("content", "handle", "last", "loop", "stall_s")

    def __init__(self, content: StreamReader, stall_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.content = content
        self.stall_s = stall_s
        self.last = self.loop.time()
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(
            self.last + stall_s, self._check
        )

    def _check(self) -> None:
        due = self.last + self.stall_s
        if self.loop.time() >= due:
            self.handle = None
            self.content.set_exception(TimeoutError(f"no bytes for {self.stall_s:g} s"))
        else:
            self.handle = self.loop.call_at(due, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


# What the router refuses before any handler of ours runs (any method but POST; a target that is
# not a path): the counter each is kept under.
_ROUTER_REFUSALS = {404: "not_found", 405: "method_not_allowed"}


def _render(msg: object, args: tuple[object, ...]) -> str:
    try:
        return str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


class _ServerLog:
    """What aiohttp's request handler logs, for one receiver (its `logger=`).

    aiohttp logs every malformed request (a bad request line, header or method) with a full
    traceback on its own logger, after answering it 400 itself: here each is counted in errors
    `malformed_request` and logged as one rate-limited line. Any other exception it reports (a
    handler failing) is counted `http_handler`, one rate-limited line, the traceback at DEBUG.
    """

    def __init__(self, name: str, counters: Any, limited: LimitedLogger) -> None:
        self.name = name
        self.counters = counters
        self.limited = limited
        self.log = limited.log

    def _problem(self, msg: object, args: tuple[object, ...], exc: object) -> None:
        text = _render(msg, args)
        if isinstance(exc, HttpProcessingError):
            self.counters.error("malformed_request")
            lines = str(exc.message or exc).splitlines()
            remote = args[0] if args else "?"
            self.limited.warning(
                "malformed_request",
                "%s: malformed request from %s refused (400): %s",
                self.name,
                remote,
                lines[0] if lines else type(exc).__name__,
            )
            return
        self.counters.error("http_handler")
        self.limited.warning(
            "http_handler", "%s: %s: %r", self.name, text, exc if exc is not None else "no answer"
        )
        if isinstance(exc, BaseException) and self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s: traceback", self.name, exc_info=exc)

    def exception(self, msg: object, *args: object, exc_info: object = None, **_: Any) -> None:
        self._problem(msg, args, exc_info)

    def error(self, msg: object, *args: object, exc_info: object = None, **_: Any) -> None:
        self._problem(msg, args, exc_info)

    def warning(self, msg: object, *args: object, **_: Any) -> None:
        self.log.warning("%s: %s", self.name, _render(msg, args))

    def info(self, msg: object, *args: object, **_: Any) -> None:
        self.log.debug("%s: %s", self.name, _render(msg, args))

    def debug(self, msg: object, *args: object, exc_info: object = None, **_: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):  # a non-HTTP first line: refused too
            self._problem(msg, args, exc_info)
        elif self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s: %s", self.name, _render(msg, args))


class HttpImageReceiver(ReceiverServer):
    """An HTTP/1.1 server: `POST <any path>` with an image body → one record → 200 {source, seq}."""

    Settings = HttpImageSettings
    settings: HttpImageSettings

    def __init__(self, settings: HttpImageSettings, host: Any) -> None:
        super().__init__(settings, host)
        self._runner: web.AppRunner | None = None
        self._next = NextRecord()
        self._allowed = frozenset(settings.allowed_types)
        self._source_json = json.dumps(self.name)

    # ----- life cycle ------------------------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        app = web.Application(middlewares=[self._count_router_refusals])
        app.router.add_route("POST", "/{path:.*}", self._on_post, expect_handler=self._on_expect)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            logger=_ServerLog(self.name, self.counters, self.limited),
            keepalive_timeout=s.read_timeout_s,
            # Bytes of a rejected body are read and discarded for this long so that the client
            # sees the answer instead of a reset.
            lingering_time=min(5.0, s.read_timeout_s),
            shutdown_timeout=1.0,
        )
        await runner.setup()
        host, port = parse_hostport(s.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.addresses["listen"] = format_hostport(sock.getsockname())
        self.log.info(
            "%s: accepting %s images up to %d bytes on http://%s/",
            self.name,
            "/".join(s.allowed_types),
            s.max_body_bytes,
            self.addresses["listen"],
        )

    async def close(self) -> None:
        self._next.fail(GrabError(f"receiver {self.name!r} closed while waiting for an image"))
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def status(self) -> dict[str, Any]:
        server = self._runner.server if self._runner is not None else None
        self.counters.extra["connections"] = len(server.connections) if server else 0
        return super().status()

    # ----- for daqd.http.grab ----------------------------------------------------------------
    @property
    def grabs_waiting(self) -> int:
        """How many callers wait in next_image() for the next POST."""
        return len(self._next)

    async def next_image(self) -> Record:
        """The next image POSTed to this receiver."""
        return await self._next.wait()

    # ----- HTTP ------------------------------------------------------------------------------
    def _refusal(self, request: web.BaseRequest) -> tuple[int, str, str] | None:
        """(status, counter, message) if the headers alone show the request cannot be accepted."""
        ctype = request.content_type
        if ctype not in self._allowed:
            allowed = ", ".join(sorted(self._allowed))
            return 415, "unsupported_type", f"content type {ctype!r} is not one of: {allowed}"
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            return (
                413,
                "too_large",
                f"body of {length} bytes exceeds max_body_bytes={self.settings.max_body_bytes}",
            )
        return None

    def _reject(
        self, request: web.BaseRequest, status: int, counter: str, message: str
    ) -> web.Response:
        self.counters.error(counter)
        self.limited.warning(
            counter,
            "%s: %s %s from %s refused: %s",
            self.name,
            request.method,
            request.path,
            request.remote,
            message,
        )
        resp = web.json_response({"error": message, "status": status}, status=status)
        resp.force_close()
        return resp

    @web.middleware
    async def _count_router_refusals(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            reason = _ROUTER_REFUSALS.get(exc.status, f"http_{exc.status}")
            self.counters.error(reason)
            self.limited.warning(
                reason,
                "%s: %s %s from %s refused: %d %s",
                self.name,
                request.method,
                request.path,
                request.remote,
                exc.status,
                exc.reason,
            )
            raise

    async def _on_expect(self, request: web.Request) -> web.StreamResponse | None:
        refusal = self._refusal(request)
        if refusal is not None:
            # Answered before the client sends a single byte of the body.
            return self._reject(request, *refusal)
        if request.version != HttpVersion11:
            return None  # HTTP/1.0 has no interim answers: the client sends the body anyway
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return self._reject(request, 417, "bad_request", f"cannot meet Expect: {expect!r}")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim line is not part of the response's size
        return None

    async def _on_post(self, request: web.Request) -> web.StreamResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return self._reject(request, *refusal)
        try:
            body = await self._read_body(request)
        except _TooLarge:
            return self._reject(
                request,
                413,
                "too_large",
                f"body exceeds max_body_bytes={self.settings.max_body_bytes}",
            )
        except TimeoutError:
            return await self._drop_stalled(request)
        except ConnectionError as exc:
            self.counters.error("disconnected")
            self.limited.info(
                "disconnected",
                "%s: client %s went away mid-body: %s",
                self.name,
                request.remote,
                exc,
            )
            return web.Response(status=400)
        except Exception as exc:  # the parser's errors: bad chunking, short body, ...
            return self._reject(request, 400, "bad_body", f"body could not be read: {exc}")

        tags: dict[str, Any] = {
            "content_type": request.content_type,
            "length": len(body),
            "path": request.path,
            "remote": request.remote or "",
        }
        request_type = request.headers.get(REQUEST_TYPE_HEADER)
        if request_type is not None:
            tags["request_type_id"] = request_type
        extra = {
            k.lower(): v
            for k, v in request.headers.items()
            if k.lower().startswith(TAG_HEADER_PREFIXES)
        }
        if extra:
            tags["headers"] = extra
        record = self.new_record([body], tags)
        delivered = await self.publish(record)
        self._next.feed(record)
        answer = (
            f'{{"source": {self._source_json}, "seq": {record.seq}, "bytes": {len(body)}, '
            f'"delivered": {"true" if delivered else "false"}}}'
        )
        return web.Response(body=answer.encode(), content_type="application/json")

    async def _read_body(self, request: web.Request) -> bytearray:
        """The whole body, failing with _TooLarge past the limit or TimeoutError on a stall."""
        limit = self.settings.max_body_bytes
        content = request.content
        # One growing bytearray, passed on as the record's block: measured on 2 MiB images, it
        # page-faults far less than joining chunks or copying into bytes at the end.
        body = bytearray()
        watch = _StallWatch(content, self.settings.read_timeout_s)
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return body
                body += chunk
                if len(body) > limit:
                    raise _TooLarge
                watch.last = watch.loop.time()
        finally:
            watch.cancel()

    async def _drop_stalled(self, request: web.Request) -> web.StreamResponse:
        """Answer 408 and close at once: a stalled client is not worth lingering for."""
        resp = self._reject(
            request,
            408,
            "read_timeout",
            f"no body bytes for read_timeout_s={self.settings.read_timeout_s:g}",
        )
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            pass
        request.protocol.force_close()
        return resp
