"""HTTP for operation handlers: grab the next image from a receiver, post JSON to a service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import aiohttp

from daqd.errors import DaqdError
from daqd.record import Record

# A service's answer is read into memory: bound it so a misbehaving service cannot exhaust it.
MAX_RESPONSE_BYTES = 16 << 20


class HttpError(DaqdError):
    """An HTTP exchange a handler asked for did not give a usable answer; the message says why."""


class GrabError(HttpError):
    """No image from the named receiver: unknown, not an image source, or timed out."""


class HttpTimeout(HttpError):
    """The peer did not answer within the time the caller allowed."""


class HttpStatusError(HttpError):
    """The peer answered with a status outside 2xx; `status` and the start of the body are kept."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@runtime_checkable
class ImageSource(Protocol):
    """What `grab` needs from a receiver: http_image and http_poll implement it."""

    async def next_image(self) -> Record:
        """The next image record (the caller bounds the wait)."""
        ...


class NextRecord:
    """Futures of callers waiting for the next record a receiver publishes.

    The receiver calls `feed(record)` after publishing; every waiter at that moment gets the record.
    """

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[Record]] = set()

    def __len__(self) -> int:
        return len(self._waiters)

    def feed(self, record: Record) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(record)

    def fail(self, exc: BaseException) -> None:
        """Wake every waiter with `exc` (the receiver is closing)."""
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)

    async def wait(self) -> Record:
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            return await fut
        finally:
            self._waiters.discard(fut)


def image_bytes(record: Record) -> bytes:
    """The image in a record from http_image / http_poll as one bytes object."""
    blocks = record.payload
    if len(blocks) == 1 and isinstance(blocks[0], bytes):
        return blocks[0]
    return b"".join(blocks)


async def grab(receiver_name: str, timeout_s: float = 10.0) -> Record:
    """The next image from the `http_poll` or `http_image` receiver `receiver_name` of this host.

    An http_poll receiver fetches a fresh frame now (retrying until `timeout_s`); an http_image
    receiver waits for the next image POSTed to it. Raises GrabError with the reason.
    """
    from daqd.host import current_host  # the host imports receivers; import it only when used

    try:
        host = current_host()
    except RuntimeError:
        raise GrabError("grab: no daqd host is running in this event loop") from None
    receiver = host.receivers.get(receiver_name)
    if receiver is None:
        known = ", ".join(sorted(host.receivers)) or "none"
        raise GrabError(f"grab: no receiver named {receiver_name!r} (receivers: {known})")
    if not isinstance(receiver, ImageSource):
        raise GrabError(
            f"grab: receiver {receiver_name!r} (type {receiver.settings.type!r}) does not "
            "give images; use an http_poll or http_image receiver"
        )
    try:
        async with asyncio.timeout(timeout_s):
            return await receiver.next_image()
    except TimeoutError:
        detail = getattr(receiver, "last_failure", "")
        raise GrabError(
            f"grab: no image from {receiver_name!r} within {timeout_s:g} s"
            + (f" (last error: {detail})" if detail else "")
        ) from None


async def post_json(
    url: str,
    payload: Any,
    timeout_s: float = 10.0,
    *,
    headers: Mapping[str, str] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> Any:
    """POST `payload` as JSON to `url` and return the decoded JSON answer (None if it is empty).

    Raises HttpTimeout, HttpStatusError (non-2xx) or HttpError (connection refused, not JSON, ...).
    Pass a `session` to reuse connections across many calls.
    """
    try:
        body = json.dumps(payload).encode()
    except (TypeError, ValueError) as exc:
        raise HttpError(f"post_json {url}: payload is not JSON-serialisable: {exc}") from None
    own = session is None
    client = aiohttp.ClientSession() if session is None else session
    try:
        async with asyncio.timeout(timeout_s):
            async with client.post(
                url,
                data=body,
                headers={"Content-Type": "application/json", **(headers or {})},
            ) as resp:
                text = await _read_limited(resp, url)
                if not 200 <= resp.status < 300:
                    excerpt = text[:200].decode("utf-8", "replace")
                    reason = resp.reason or ""
                    raise HttpStatusError(
                        f"post_json {url}: HTTP {resp.status} {reason}: {excerpt}".rstrip(),
                        resp.status,
                        excerpt,
                    )
    except TimeoutError:
        raise HttpTimeout(f"post_json {url}: no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise HttpError(f"post_json {url}: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise HttpError(f"post_json {url}: {exc}") from None
    finally:
        if own:
            await client.close()
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise HttpError(f"post_json {url}: the answer is not JSON ({exc})") from None


async def _read_limited(resp: aiohttp.ClientResponse, url: str) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise HttpError(
            f"{url}: answer of {resp.content_length} bytes exceeds {MAX_RESPONSE_BYTES}"
        )
    data = bytearray()
    async for chunk in resp.content.iter_any():
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            raise HttpError(f"{url}: answer exceeds {MAX_RESPONSE_BYTES} bytes")
    return bytes(data)
