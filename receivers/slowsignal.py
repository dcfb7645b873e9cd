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
    BLOCK_BYTES,
    MAX_BLOCKS,
    MV_PER_COUNT,
    N_MODULES,
    N_PIXELS,
    DatagramError,
    check_datagram_size,
    decode_datagram,
    encode_ssdaq_frame,
)
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runstate import RunInfo

_ALL_MODULES = (1 << N_MODULES) - 1
_MAX_DATAGRAM_BYTES = MAX_BLOCKS * BLOCK_BYTES
_MAX_BATCH = 256  # datagrams assembled together at most
_PUBLISHED = -1  # slot codes of blocks whose readout is not pending
_LATE = -2
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
    """One TACK being assembled; its counts live in the receiver's store at `slot`."""

    __slots__ = ("cpu_ns", "created", "slot", "tack")

    def __init__(self, tack: int, slot: int, created: float, cpu_ns: int) -> None:
        self.tack = tack
        self.slot = slot
        self.created = created
        self.cpu_ns = cpu_ns


class SlowSignalReceiver(ReceiverServer):
    """UDP slow-signal datagrams from TARGET modules in, one record per camera readout out.

    Datagrams received in one turn of the event loop are decoded and assembled together with
    numpy: the Python work per datagram is a dict look-up and an append; the rest is per batch,
    per distinct TACK, or per published readout.
    """

    Settings = SlowSignalSettings
    settings: SlowSignalSettings

    def __init__(self, settings: SlowSignalSettings, host: Any) -> None:
        super().__init__(settings, host)
        s = settings
        self.expected_idx = np.asarray(s.expected_modules(), dtype=np.int64)
        self.expected_bool = np.zeros(N_MODULES, dtype=bool)
        self.expected_bool[self.expected_idx] = True
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
        # pending readouts' data: slot -> 32 x 64 counts, second timestamps, modules present
        self.store = np.zeros((0, N_MODULES, N_PIXELS), dtype=np.uint16)
        self.seconds = np.zeros((0, N_MODULES), dtype=np.uint64)
        self.present = np.zeros((0, N_MODULES), dtype=bool)
        self.by_slot: list[Readout | None] = []
        self.free: list[int] = []
        self._grow()
        self._batch: list[bytes] = []
        self._batch_modules: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._module_cache: dict[str, int] = {}
        self.per_module: dict[str, np.ndarray] = {
            k: np.zeros(N_MODULES, dtype=np.int64)
            for k in ("datagrams", "blocks", "missing", "duplicates", "late")
        }
        self.unknown_sources: dict[str, int] = {}
        self._refresh_extra()

    def _grow(self) -> None:
        old = len(self.by_slot)
        new = max(64, 2 * old)
        for name in ("store", "seconds", "present"):
            arr = getattr(self, name)
            grown = np.zeros((new, *arr.shape[1:]), dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        self.by_slot.extend([None] * (new - old))
        self.free.extend(range(new - 1, old - 1, -1))  # pop() hands out low slots first

    # ----- sockets and tasks -----------------------------------------------------------------
    async def setup(self) -> None:
        self._loop = asyncio.get_running_loop()
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
        module = self._module_cache.get(addr[0])
        if module is None:
            module = self.module_of(addr[0])
        if module < 0:
            self._bad("unknown_module", addr, f"sender {addr[0]} maps to no module 0-31")
            key = addr[0] if len(self.unknown_sources) < _MAX_UNKNOWN_SOURCES else "other"
            self.unknown_sources[key] = self.unknown_sources.get(key, 0) + 1
            return
        n = len(data)
        if n == 0 or n % BLOCK_BYTES or n > _MAX_DATAGRAM_BYTES:
            try:
                check_datagram_size(n)
            except DatagramError as exc:
                self._bad(exc.reason, addr, str(exc))
            return
        batch = self._batch
        if not batch:
            assert self._loop is not None
            self._loop.call_soon(self.process_batch)
        batch.append(data)
        self._batch_modules.append(module)
        if len(batch) >= _MAX_BATCH:
            self.process_batch()

    def _bad(self, reason: str, addr: tuple[str, int], message: str) -> None:
        self.counters.drop(reason)
        self.limited.warning(reason, "%s: bad datagram from %s:%d: %s", self.name, *addr, message)

    def process_batch(self) -> None:
        """Assemble the datagrams received since the last call (runs once per loop turn)."""
        datagrams, modules = self._batch, self._batch_modules
        if not datagrams:
            return
        self._batch, self._batch_modules = [], []
        try:
            self._assemble(datagrams, modules)
        except Exception as exc:  # a bug here must cost one batch, never the receiver
            self.counters.error("assembly")
            self.counters.drop("assembly_error", len(datagrams))
            self.log.exception(
                "%s: assembling %d datagrams failed: %r", self.name, len(datagrams), exc
            )

    def _assemble(self, datagrams: list[bytes], module_list: list[int]) -> None:
        now_ns = time.time_ns()
        mono = time.monotonic()
        nd = len(datagrams)
        if nd == 1:
            blocks = decode_datagram(datagrams[0])
            sizes = [len(blocks)]
            mods = np.full(sizes[0], module_list[0], dtype=np.int64)
        else:
            blocks = decode_datagram(b"".join(datagrams), max_blocks=nd * MAX_BLOCKS)
            sizes = [len(d) // BLOCK_BYTES for d in datagrams]
            mods = np.repeat(np.asarray(module_list, dtype=np.int64), sizes)
        pm = self.per_module
        pm["datagrams"] += np.bincount(module_list, minlength=N_MODULES)
        pm["blocks"] += np.bincount(mods, minlength=N_MODULES)
        tacks = blocks.tack
        # a datagram is sent after its last block: date each TACK back from its arrival by that
        last = np.repeat(tacks[np.cumsum(sizes) - 1], sizes)
        uniq, first, inverse = np.unique(tacks, return_index=True, return_inverse=True)
        pending = self.pending
        slot_u = np.empty(len(uniq), dtype=np.int64)
        published: dict[int, int] = {}  # index into uniq -> mask of its published readout
        newest_new = -1
        for j, (tack, last_tack) in enumerate(
            zip(uniq.tolist(), last[first].tolist(), strict=True)
        ):
            ro = pending.get(tack)
            if ro is None and self.window:
                ro = self._match(tack, self.keys)
            if ro is not None:
                slot_u[j] = ro.slot
                continue
            mask = self._published(tack)
            if mask is not None:
                slot_u[j] = _PUBLISHED
                published[j] = mask
            elif tack <= self.watermark:
                slot_u[j] = _LATE
            else:
                backdate = min(max(last_tack - tack, 0), _MAX_CPU_BACKDATE_NS)
                slot_u[j] = self._new_readout(tack, mono, now_ns - backdate).slot
                newest_new = tack
        slot_b = slot_u[inverse.reshape(-1)]
        ok = slot_b >= 0
        if ok.all():
            idx = np.arange(len(slot_b))
        else:
            self._refused(~ok, slot_b, inverse.reshape(-1), mods, published, tacks)
            idx = np.flatnonzero(ok)
        s_ok = slot_b[idx]
        m_ok = mods[idx]
        again = self.present[s_ok, m_ok]
        if nd > 1:  # the same module twice for one readout within this batch
            key = s_ok * N_MODULES + m_ok
            firsts = np.unique(key, return_index=True)[1]
            if len(firsts) < len(key):
                repeat = np.ones(len(key), dtype=bool)
                repeat[firsts] = False
                again |= repeat
        if again.any():
            self._duplicates(m_ok[again])
            keep = ~again
            idx, s_ok, m_ok = idx[keep], s_ok[keep], m_ok[keep]
        self.store[s_ok, m_ok] = blocks.counts[idx]
        self.seconds[s_ok, m_ok] = blocks.second[idx]
        self.present[s_ok, m_ok] = True
        touched = np.unique(slot_u[slot_u >= 0])
        if touched.size:
            full = self.present[touched][:, self.expected_idx].all(axis=1)
            if full.any():
                by_slot = self.by_slot
                done = sorted(by_slot[s].tack for s in touched[full].tolist())
                for tack in done:
                    self._flush(tack, complete=True)
        keys = self.keys
        if newest_new >= 0:
            horizon = newest_new - self.settings.buffer_ns
            while keys and keys[0] < horizon:  # TACK time moved on: the oldest will not fill up
                self.watermark = max(self.watermark, keys[0])
                self._flush(keys[0])
        while len(keys) > self.settings.max_pending_readouts:
            self.counters.error("overflow")
            self.watermark = max(self.watermark, keys[0])
            self._flush(keys[0])

    def _match(self, tack: int, keys: list[int]) -> Readout | None:
        """The readout whose TACK is within readout_window_ns of `tack`, if any."""
        i = bisect.bisect_left(keys, tack)
        for j in (i - 1, i):
            if 0 <= j < len(keys) and abs(keys[j] - tack) < self.window:
                return self.pending[keys[j]]
        return None

    def _published(self, tack: int) -> int | None:
        """Module mask of the recently published readout matching `tack`, if any."""
        mask = self.recent.get(tack)
        if mask is None and self.window and self.recent_keys:
            rk = self.recent_keys
            i = bisect.bisect_left(rk, tack)
            for j in (i - 1, i):
                if 0 <= j < len(rk) and abs(rk[j] - tack) < self.window:
                    return self.recent[rk[j]]
        return mask

    def _refused(
        self,
        refused: np.ndarray,
        slot_b: np.ndarray,
        inverse: np.ndarray,
        mods: np.ndarray,
        published: dict[int, int],
        tacks: np.ndarray,
    ) -> None:
        """Count blocks whose readout is already published: duplicates or late."""
        late_mods: list[int] = []
        dup_mods: list[int] = []
        for i in np.flatnonzero(refused).tolist():
            module = int(mods[i])
            mask = published.get(int(inverse[i]))
            if mask is not None and mask >> module & 1:
                dup_mods.append(module)
            else:
                late_mods.append(module)
        if dup_mods:
            self._duplicates(np.asarray(dup_mods))
        if late_mods:
            self.per_module["late"] += np.bincount(late_mods, minlength=N_MODULES)
            self.counters.drop("late", len(late_mods))
            first = int(np.flatnonzero(refused)[0])
            self.limited.warning(
                "late",
                "%s: %d late blocks, e.g. module %d TACK %d: their readout was already published",
                self.name,
                len(late_mods),
                late_mods[0],
                int(tacks[first]),
            )

    def _duplicates(self, modules: np.ndarray) -> None:
        self.per_module["duplicates"] += np.bincount(modules, minlength=N_MODULES)
        self.counters.error("duplicate", len(modules))

    def _new_readout(self, tack: int, created: float, cpu_ns: int) -> Readout:
        if not self.free:
            self._grow()
        ro = Readout(tack, self.free.pop(), created, cpu_ns)
        self.by_slot[ro.slot] = ro
        self.pending[tack] = ro
        keys = self.keys
        if not keys or tack > keys[-1]:
            keys.append(tack)
        else:
            bisect.insort(keys, tack)
        return ro

    def _flush(self, tack: int, complete: bool = False) -> None:
        """Take the readout keyed `tack` out of the pending map, publish it, free its slot."""
        ro = self.pending.pop(tack)
        del self.keys[bisect.bisect_left(self.keys, tack)]
        slot = ro.slot
        present = self.present[slot]
        mask = int(np.packbits(present, bitorder="little").view("<u4")[0])
        self._remember(tack, mask)
        if mask != _ALL_MODULES:  # slots are reused: clear what an earlier readout left there
            absent = ~present
            self.store[slot][absent] = 0
            self.seconds[slot][absent] = 0
        if complete:
            self.complete += 1
        else:
            self.incomplete += 1
            self.per_module["missing"] += self.expected_bool & ~present
        if self.paused:
            self.counters.drop("paused")
        else:
            self.publish_nowait(self._record(ro, mask, complete))
        present[:] = False
        self.by_slot[slot] = None
        self.free.append(slot)

    def flush_all(self) -> None:
        """Assemble what was received, then publish every pending readout, oldest TACK first."""
        self.process_batch()
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

    def _record(self, ro: Readout, mask: int, complete: bool) -> Record:
        number = self.next_readout
        self.next_readout += 1
        slot = ro.slot
        counts = self.store[slot]
        tags: dict[str, Any] = {
            "tack": ro.tack,
            "readout": number,
            "modules_present": mask,
            "complete": complete,
            "cpu_time_ns": ro.cpu_ns,
            "second_ns": self.seconds[slot].tolist(),
        }
        if self.settings.format == "ssdaq":
            mv = counts * MV_PER_COUNT
            if mask != _ALL_MODULES:
                mv[~self.present[slot]] = np.nan
            cpu_s, cpu_ns = divmod(ro.cpu_ns, 1_000_000_000)
            payload = encode_ssdaq_frame(number, ro.tack, cpu_s, cpu_ns, mv)
            tags["format"] = "ssdaq"
        elif self.settings.payload == "mv":
            mv32 = counts.astype(np.float32)
            mv32 *= np.float32(MV_PER_COUNT)
            if mask != _ALL_MODULES:
                mv32[~self.present[slot]] = np.nan
            payload = mv32.astype("<f4", copy=False).tobytes()
            tags.update(dtype="<f4", unit="mV", shape=[N_MODULES, N_PIXELS])
        else:
            payload = counts.astype("<u2", copy=False).tobytes()
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
        extra["modules"] = {k: v.tolist() for k, v in self.per_module.items()}
        extra["unknown_sources"] = dict(self.unknown_sources)

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
        blocks = self.per_module["blocks"]
        shown = sorted({m for m in range(N_MODULES) if blocks[m]} | set(self.expected_idx.tolist()))
        return {
            "readouts_complete": self.complete,
            "readouts_incomplete": self.incomplete,
            "pending_readouts": len(self.pending),
            "next_readout": self.next_readout,
            "paused": self.paused,
            "drops": dict(self.counters.drops),
            "errors": dict(self.counters.errors),
            "unknown_sources": dict(self.unknown_sources),
            "modules": {str(m): {k: int(v[m]) for k, v in self.per_module.items()} for m in shown},
        }
