"""HTTP camera poller: GET a URL (an Axis snapshot) on a timer or on demand; image → record."""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from yarl import URL

from daqd.errors import ConfigError, DaqdError
from daqd.http import NextRecord
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record


class HttpPollSettings(ReceiverSettings):
    url: str
    # Seconds between GETs; 0 fetches only on `daqctl cmd NAME grab` or daqd.http.grab().
    interval_s: float = Field(default=1.0, ge=0)
    timeout_s: float = Field(default=5.0, gt=0)  # one GET, connect to last body byte
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=32 << 20, gt=0)
    auth: Literal["none", "basic", "digest"] = "none"
    username: str | None = None
    password: SecretStr | None = None
    # A file whose first line is `user:password` (keep it mode 0600); preferred to `password`.
    credentials_file: Path | None = Field(default=None, validate_default=True)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("expected an http:// or https:// URL with a host")
        if url.user is not None or url.password is not None:
            raise ValueError("put credentials in username/credentials_file, not in the URL")
        return value

    @field_validator("backoff_max_s")
    @classmethod
    def _check_backoff(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("backoff_initial_s", 0):
            raise ValueError("must be at least backoff_initial_s")
        return value

    # Cross-checks of the credentials sit on this last field (validated even when absent), so that
    # an error reports this key alone and never echoes the whole table with its password.
    @field_validator("credentials_file")
    @classmethod
    def _check_auth(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        auth = info.data.get("auth", "none")
        has_inline = info.data.get("username") is not None or info.data.get("password") is not None
        if auth == "none":
            if has_inline or value is not None:
                raise ValueError('credentials given but auth = "none"; set auth = "basic"/"digest"')
        elif value is None and (info.data.get("username") is None or not info.data.get("password")):
            raise ValueError(f'auth = "{auth}" needs credentials_file, or username and password')
        elif value is not None and has_inline:
            raise ValueError("give either credentials_file or username/password, not both")
        return value


def read_credentials(path: Path) -> tuple[str, str]:
    """(user, password) from the first line `user:password` of `path`; errors never show it."""
    try:
        st = path.stat()
        with path.open(encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"credentials_file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"credentials_file {path}: not UTF-8 text") from None
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise ConfigError(f"credentials_file {path}: the first line must be user:password")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger("daqd.receiver").warning(
            "credentials_file %s is readable by group/others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(st.st_mode),
        )
    return user, password


class FetchError(DaqdError):
    """One GET that gave no image; `kind` is the counter it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class HttpPollReceiver(ReceiverServer):
    """GETs `url` every `interval_s` (or on demand); failures are counted and retried, never fatal."""

    Settings = HttpPollSettings
    settings: HttpPollSettings

    def __init__(self, settings: HttpPollSettings, host: Any) -> None:
        super().__init__(settings, host)
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}  # never logged: may hold the Authorization header
        self._lock = asyncio.Lock()  # one GET at a time: a camera serves one frame per request
        self._next = NextRecord()
        self.failures_in_a_row = 0
        self.last_failure = ""
        self.counters.extra.update(url=settings.url, failures_in_a_row=0)

    # ----- life cycle ------------------------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        self._headers = {}
        middlewares: tuple[aiohttp.DigestAuthMiddleware, ...] = ()
        if s.auth != "none":
            if s.credentials_file is not None:
                user, password = read_credentials(s.credentials_file)
            else:
                assert s.username is not None and s.password is not None
                user, password = s.username, s.password.get_secret_value()
            if s.auth == "basic":
                self._headers["Authorization"] = aiohttp.encode_basic_auth(user, password)
            else:
                middlewares = (aiohttp.DigestAuthMiddleware(user, password),)
        self._session = aiohttp.ClientSession(
            middlewares=middlewares,
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=None),  # each fetch sets its own deadline
        )
        self.addresses["url"] = s.url
        mode = f"every {s.interval_s:g} s" if s.interval_s > 0 else "on grab only"
        self.log.info("%s: polling %s %s (auth %s)", self.name, s.url, mode, s.auth)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def ct_poll(self) -> None:
        """Fetch on the timer; a failure waits a backoff that doubles up to backoff_max_s."""
        s = self.settings
        if s.interval_s <= 0:
            return
        loop = asyncio.get_running_loop()
        backoff = s.backoff_initial_s
        next_at = loop.time()
        while True:
            try:
                await self.fetch()
            except FetchError:
                await self._back_off(backoff)
                backoff = min(backoff * 2, s.backoff_max_s)
                next_at = loop.time()
                continue
            backoff = s.backoff_initial_s
            # A fixed rate, not a fixed gap: a slow camera does not stretch the period.
            next_at = max(next_at + s.interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())

    async def _back_off(self, delay_s: float) -> None:
        self.counters.extra["retry_in_s"] = delay_s  # status shows how long the next try waits
        await asyncio.sleep(delay_s)

    # ----- fetching --------------------------------------------------------------------------
    async def fetch(self) -> Record:
        """One GET → one published record; raises FetchError (already counted and logged)."""
        async with self._lock:
            try:
                record = await self._get()
            except FetchError as exc:
                self._failed(exc)
                raise
        if self.failures_in_a_row:
            self.log.info(
                "%s: %s answers again after %d failures",
                self.name,
                self.settings.url,
                self.failures_in_a_row,
            )
        self.failures_in_a_row = 0
        self.counters.extra.update(failures_in_a_row=0, last_ok_ns=record.time_ns, retry_in_s=0)
        await self.publish(record)
        self._next.feed(record)
        return record

    def _failed(self, exc: FetchError) -> None:
        self.counters.error(exc.kind)
        self.failures_in_a_row += 1
        self.last_failure = str(exc)
        self.counters.extra.update(failures_in_a_row=self.failures_in_a_row, last_error=str(exc))
        self.limited.warning(
            "fetch",
            "%s: GET %s failed (%d in a row): %s",
            self.name,
            self.settings.url,
            self.failures_in_a_row,
            exc,
        )

    async def _get(self) -> Record:
        s = self.settings
        session = self._session
        if session is None:
            raise FetchError("closed", "the receiver is not running")
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(s.timeout_s):
                async with session.get(s.url, headers=self._headers) as resp:
                    if resp.status != 200:
                        raise FetchError(
                            "http_status", f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                        )
                    body = await self._read_body(resp)
                    ctype = resp.content_type
                    status = resp.status
        except TimeoutError:
            raise FetchError("timeout", f"no complete answer within {s.timeout_s:g} s") from None
        except aiohttp.ClientConnectionError as exc:
            raise FetchError("connect", f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise FetchError("protocol", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise FetchError("connect", str(exc)) from None
        elapsed = time.monotonic() - t0
        tags = {
            "status": status,
            "content_type": ctype,
            "length": len(body),
            "elapsed_s": round(elapsed, 6),
            "url": s.url,
        }
        return self.new_record([body], tags)

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.max_body_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise FetchError(
                "too_large", f"answer of {resp.content_length} bytes exceeds max_body_bytes={limit}"
            )
        body = bytearray()
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise FetchError("too_large", f"answer exceeds max_body_bytes={limit}")
        return bytes(body)

    # ----- for daqd.http.grab and daqctl -----------------------------------------------------
    async def next_image(self) -> Record:
        """A fresh frame now, retrying with backoff until the caller's deadline cancels us."""
        backoff = self.settings.backoff_initial_s
        while True:
            try:
                return await self.fetch()
            except FetchError:
                await self._back_off(backoff)
                backoff = min(backoff * 2, self.settings.backoff_max_s)

    async def cmd_grab(self) -> dict[str, Any]:
        """`daqctl cmd NAME grab`: one GET now; what came back, or an error saying why not."""
        record = await self.fetch()
        return {"source": record.source, "seq": record.seq, **record.tags}
