"""Slow-signal receiver: assembles CHEC-S TARGET-module datagrams into camera readouts.

Each 144-byte block carries its own TACK, so blocks (not datagrams) are matched to readouts kept in
a TACK-sorted map. A readout is published as soon as every expected module is in, or incomplete when
it is `flush_after_s` old (wall clock), when TACK time has moved `buffer_ns` past it, at a run
boundary and at shutdown. Nothing is held forever, and every discarded block or datagram is counted.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from daqd.protocols.slowsignal import (
    MV_PER_COUNT,
    N_MODULES,
    N_PIXELS,
    Blocks,
    DatagramError,
    decode_datagram,
    encode_ssdaq_frame,
)
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.runstate import RunInfo

_BITS = np.arange(N_MODULES, dtype=np.int64)
_MAX_UNKNOWN_SOURCES = 256  # distinct unknown senders listed by address; the rest are summed
_MAX_CPU_BACKDATE_NS = 10_000_000_000


class SlowSignalSettings(ReceiverSettings):
    listen: str = "0.0.0.0:17000"
    rcvbuf_bytes: int = Field(8 << 20, ge=4096)
    modules: int | list[int] = 32
    module_from: Literal["ip_last_octet_mod_100", "table"] = "ip_last_octet_mod_100"
    module_table: dict[str, int] = Field(default_factory=dict)
    relaxed_module_range: bool = False
    readout_window_ns: int = Field(100_000, ge=0)
    flush_after_s: float = Field(3.0, gt=0)
    buffer_ns: int = Field(5_000_000_000, gt=0)
    max_pending_readouts: int = Field(10_000, ge=1)
    format: Literal["record", "ssdaq"] = "record"
    payload: Literal["counts", "mv"] = "counts"

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if not 1 <= value <= N_MODULES:
                raise ValueError(f"modules must be 1 to {N_MODULES}, or a list of module ids")
        elif not value or len(set(value)) != len(value) or not all(0 <= m < 32 for m in value):
            raise ValueError("a modules list needs distinct module ids 0 to 31")
        return value

    @field_validator("module_table")
    @classmethod
    def _table(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {a: m for a, m in value.items() if not 0 <= m < N_MODULES}
        if bad:
            raise ValueError(f"module ids must be 0 to 31: {bad}")
        return value

    @model_validator(mode="after")
    def _table_needed(self) -> SlowSignalSettings:
        if self.module_from == "table" and not self.module_table:
            raise ValueError('module_from = "table" needs a module_table {address = module}')
        return self

    def expected_modules(self) -> list[int]:
        return list(range(self.modules)) if isinstance(self.modules, int) else sorted(self.modules)


class Readout:
    """One TACK being assembled: counts per module and which modules are in."""

    __slots__ = ("counts", "cpu_ns", "created", "mask", "seconds", "tack")

    def __init__(self, tack: int, created: float, cpu_ns: int) -> None:
        self.tack = tack
        self.created = created
        self.cpu_ns = cpu_ns
        self.mask = 0
        self.counts = np.zeros((N_MODULES, N_PIXELS), dtype=np.uint16)
        self.seconds = [0] * N_MODULES


class SlowSignalReceiver(ReceiverServer):
    """UDP slow-signal datagrams from TARGET modules in, one record per camera readout out."""

    Settings = SlowSignalSettings
    settings: SlowSignalSettings

    def __init__(self, settings: SlowSignalSettings, host: Any) -> None:
        super().__init__(settings, host)
        s = settings
        self.expected = sum(1 << m for m in s.expected_modules())
        self.window = s.readout_window_ns
        self.pending: dict[int, Readout] = {}
        self.keys: list[int] = []  # TACKs of pending readouts, sorted
        self.recent: dict[int, int] = {}  # TACK -> module mask of recently published readouts
        self.recent_keys: list[int] = []
        self.recent_limit = max(4096, 2 * s.max_pending_readouts)
        self.watermark = -1  # readouts at or below this TACK were flushed by TACK progress
        self.next_readout = 1
        self.paused = False
        self.complete = 0
        self.incomplete = 0
        self._module_cache: dict[str, int] = {}
        zero = [0] * N_MODULES
        self.per_module: dict[str, list[int]] = {
            k: list(zero) for k in ("datagrams", "blocks", "missing", "duplicates", "late")
        }
        self.unknown_sources: dict[str, int] = {}
        self.counters.extra["modules"] = self.per_module
        self.counters.extra["unknown_sources"] = self.unknown_sources
        self._refresh_extra()

    # ----- sockets and tasks -----------------------------------------------------------------
    async def setup(self) -> None:
        await self.setup_udp(
            self.settings.listen, self.on_datagram, rcvbuf_bytes=self.settings.rcvbuf_bytes
        )

    async def ct_flush(self) -> None:
        """Publish readouts older than flush_after_s of wall-clock time."""
        age = self.settings.flush_after_s
        while True:
            await asyncio.sleep(min(age / 4, 0.25))
            cutoff = time.monotonic() - age
            old = [t for t, ro in self.pending.items() if ro.created <= cutoff]
            for tack in sorted(old):
                self._flush(tack)

    async def begin_run(self, run: RunInfo) -> None:
        self.flush_all()  # what was pending belongs before the run
        self.next_readout = 1

    async def end_run(self, run: RunInfo) -> None:
        self.flush_all()
        self.next_readout = 1

    async def close(self) -> None:
        self.flush_all()

    # ----- the data path ---------------------------------------------------------------------
    def module_of(self, address: str) -> int:
        """Module id of a sender address, or -1 if it is not one of ours."""
        module = self._module_cache.get(address)
        if module is not None:
            return module
        s = self.settings
        if s.module_from == "table":
            module = s.module_table.get(address, -1)
        else:
            octet = address.rpartition(".")[2]
            module = int(octet) % 100 if octet.isdigit() else -1
            if module >= N_MODULES:
                module = module % N_MODULES if s.relaxed_module_range else -1
        if len(self._module_cache) >= 4096:
            self._module_cache.clear()
        self._module_cache[address] = module
        return module

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        module = self.module_of(addr[0])
        if module < 0:
            self._bad("unknown_module", addr, f"sender {addr[0]} maps to no module 0-31")
            key = addr[0] if len(self.unknown_sources) < _MAX_UNKNOWN_SOURCES else "other"
            self.unknown_sources[key] = self.unknown_sources.get(key, 0) + 1
            return
        try:
            blocks = decode_datagram(data)
        except DatagramError as exc:
            self._bad(exc.reason, addr, str(exc))
            return
        self.add(module, blocks, time.time_ns(), time.monotonic())

    def _bad(self, reason: str, addr: tuple[str, int], message: str) -> None:
        self.counters.drop(reason)
        self.limited.warning(reason, "%s: bad datagram from %s:%d: %s", self.name, *addr, message)

    def add(self, module: int, blocks: Blocks, arrival_ns: int, now: float) -> None:
        """Put every block of one module's datagram into its readout."""
        bit = 1 << module
        expected = self.expected
        pending = self.pending
        tacks: list[int] = blocks.tack.tolist()
        seconds: list[int] = blocks.second.tolist()
        counts = blocks.counts
        newest = max(tacks)
        self.per_module["datagrams"][module] += 1
        self.per_module["blocks"][module] += len(tacks)
        for i, tack in enumerate(tacks):
            ro = pending.get(tack)
            if ro is None:
                ro = self._find(tack, module, bit, arrival_ns, now)
                if ro is None:
                    continue
            if ro.mask & bit:
                self.per_module["duplicates"][module] += 1
                self.counters.error("duplicate")
                continue
            ro.counts[module] = counts[i]
            ro.mask |= bit
            ro.seconds[module] = seconds[i]
            cpu = arrival_ns - min(newest - tack, _MAX_CPU_BACKDATE_NS)
            if cpu < ro.cpu_ns:
                ro.cpu_ns = cpu
            if ro.mask & expected == expected:
                self._flush(ro.tack, complete=True)

    def _find(
        self, tack: int, module: int, bit: int, arrival_ns: int, now: float
    ) -> Readout | None:
        """The pending readout within the window of `tack`, a new one, or None (late/duplicate)."""
        window = self.window
        keys = self.keys
        if window and keys:
            i = bisect.bisect_left(keys, tack)
            for j in (i - 1, i):
                if 0 <= j < len(keys) and abs(keys[j] - tack) < window:
                    return self.pending[keys[j]]
        published = self.recent.get(tack)
        if published is None and window and self.recent_keys:
            rk = self.recent_keys
            i = bisect.bisect_left(rk, tack)
            for j in (i - 1, i):
                if 0 <= j < len(rk) and abs(rk[j] - tack) < window:
                    published = self.recent[rk[j]]
                    break
        if published is not None and published & bit:
            self.per_module["duplicates"][module] += 1
            self.counters.error("duplicate")
            return None
        if published is not None or tack <= self.watermark:
            self.per_module["late"][module] += 1
            self.counters.drop("late")
            self.limited.warning(
                "late",
                "%s: late block from module %d: TACK %d was already published",
                self.name,
                module,
                tack,
            )
            return None
        horizon = tack - self.settings.buffer_ns
        while keys and keys[0] < horizon:  # TACK time has moved on: the oldest will not fill up
            self.watermark = max(self.watermark, keys[0])
            self._flush(keys[0])
        while len(keys) >= self.settings.max_pending_readouts:
            self.counters.error("overflow")
            self.watermark = max(self.watermark, keys[0])
            self._flush(keys[0])
        ro = Readout(tack, now, arrival_ns)
        self.pending[tack] = ro
        if not keys or tack > keys[-1]:
            keys.append(tack)
        else:
            bisect.insort(keys, tack)
        return ro

    def _flush(self, tack: int, complete: bool = False) -> None:
        """Take the readout keyed `tack` out of the pending map and publish it."""
        ro = self.pending.pop(tack)
        keys = self.keys
        i = bisect.bisect_left(keys, tack)
        del keys[i]
        self._remember(tack, ro.mask)
        if complete:
            self.complete += 1
        else:
            self.incomplete += 1
            missing = self.per_module["missing"]
            absent = self.expected & ~ro.mask
            while absent:
                low = absent & -absent
                missing[low.bit_length() - 1] += 1
                absent ^= low
        if self.paused:
            self.counters.drop("paused")
            return
        self.publish_nowait(self._record(ro, complete))

    def flush_all(self) -> None:
        """Publish every pending readout, oldest TACK first."""
        for tack in list(self.keys):
            self._flush(tack)

    def _remember(self, tack: int, mask: int) -> None:
        self.recent[tack] = mask
        rk = self.recent_keys
        if not rk or tack > rk[-1]:
            rk.append(tack)
        else:
            bisect.insort(rk, tack)
        if len(rk) > 2 * self.recent_limit:
            for old in rk[: self.recent_limit]:
                del self.recent[old]
            del rk[: self.recent_limit]

    def _record(self, ro: Readout, complete: bool) -> Any:
        number = self.next_readout
        self.next_readout += 1
        present = ((ro.mask >> _BITS) & 1).astype(bool)
        tags: dict[str, Any] = {
            "tack": ro.tack,
            "readout": number,
            "modules_present": ro.mask,
            "complete": complete,
            "cpu_time_ns": ro.cpu_ns,
            "second_ns": ro.seconds,
        }
        fmt = self.settings.format
        if fmt == "ssdaq":
            mv = ro.counts * MV_PER_COUNT
            mv[~present] = np.nan
            cpu_s, cpu_ns = divmod(ro.cpu_ns, 1_000_000_000)
            payload = encode_ssdaq_frame(number, ro.tack, cpu_s, cpu_ns, mv)
            tags["format"] = "ssdaq"
        elif self.settings.payload == "mv":
            mv32 = ro.counts.astype(np.float32)
            mv32 *= np.float32(MV_PER_COUNT)
            mv32[~present] = np.nan
            payload = mv32.astype("<f4", copy=False).tobytes()
            tags.update(dtype="<f4", unit="mV", shape=[N_MODULES, N_PIXELS])
        else:
            payload = ro.counts.astype("<u2", copy=False).tobytes()
            tags.update(dtype="<u2", unit="counts", shape=[N_MODULES, N_PIXELS])
        return self.new_record([payload], tags, time_ns=ro.cpu_ns)

    # ----- status and commands ---------------------------------------------------------------
    def _refresh_extra(self) -> None:
        extra = self.counters.extra
        extra["readouts_complete"] = self.complete
        extra["readouts_incomplete"] = self.incomplete
        extra["pending_readouts"] = len(self.pending)
        extra["next_readout"] = self.next_readout
        extra["paused"] = self.paused

    def sample(self) -> None:
        self._refresh_extra()
        super().sample()

    def status(self) -> dict[str, Any]:
        self._refresh_extra()
        return super().status()

    def cmd_reset_readout_count(self) -> dict[str, Any]:
        """The next published readout is number 1 again."""
        self.next_readout = 1
        self.log.info("%s: readout count reset", self.name)
        return {"next_readout": 1}

    def cmd_pause(self) -> dict[str, Any]:
        """Stop publishing; assembled readouts are counted in drops["paused"]."""
        self.paused = True
        self.log.info("%s: publishing paused", self.name)
        return {"paused": True}

    def cmd_resume(self) -> dict[str, Any]:
        self.paused = False
        self.log.info("%s: publishing resumed", self.name)
        return {"paused": False}

    def cmd_stats(self) -> dict[str, Any]:
        """Readout counters, drops, and per-module datagrams, blocks, missing, duplicates, late."""
        self._refresh_extra()
        expected = self.settings.expected_modules()
        seen = {m for m in range(N_MODULES) if self.per_module["blocks"][m]}
        return {
            "readouts_complete": self.complete,
            "readouts_incomplete": self.incomplete,
            "pending_readouts": len(self.pending),
            "next_readout": self.next_readout,
            "paused": self.paused,
            "drops": dict(self.counters.drops),
            "errors": dict(self.counters.errors),
            "unknown_sources": dict(self.unknown_sources),
            "modules": {
                str(m): {k: v[m] for k, v in self.per_module.items()}
                for m in sorted(seen | set(expected))
            },
        }
