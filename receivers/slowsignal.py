"""Slow-signal receiver: assembles CHEC-S TARGET-module datagrams into camera readouts.

Each 144-byte block carries its own TACK, so blocks (not datagrams) are matched to readouts kept in
a TACK-sorted map. A readout is published as soon as every expected module is in, or incomplete when
it is `flush_after_s` old (wall clock), when TACK time has moved `buffer_ns` past it, at a run
boundary and at shutdown. Nothing is held forever, and every discarded block or datagram is counted.
Duplicates and late blocks are judged within a run and within `tack_reset_ns` of the newest TACK; a
block further behind means the camera restarted its TACK count, which starts the matching afresh.
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
    Blocks,
    DatagramError,
    check_datagram_size,
    decode_datagram,
    encode_ssdaq_frame,
)
from daqd.receiver import DatagramSettings, ReceiverServer
from daqd.record import Record
from daqd.runstate import RunInfo

_ALL_MODULES = (1 << N_MODULES) - 1
_BITS = np.arange(N_MODULES, dtype=np.int64)
_MAX_DATAGRAM_BYTES = MAX_BLOCKS * BLOCK_BYTES
# Blocks assembled together at most: each may open a readout, so this bounds how far the store
# can grow past max_pending_readouts before the oldest are published.
_MAX_BATCH_BLOCKS = 4096
_PUBLISHED = -1  # slot codes of blocks whose readout is not pending
_LATE = -2
_MAX_UNKNOWN_SOURCES = 256  # distinct unknown senders listed by address; the rest are summed
_MAX_CPU_BACKDATE_NS = 10_000_000_000


class SlowSignalSettings(DatagramSettings):
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
    # a block this far behind the newest TACK means the camera's TACK count restarted
    tack_reset_ns: int = Field(60_000_000_000, gt=0)
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
        if self.tack_reset_ns <= self.buffer_ns:
            raise ValueError(
                f"tack_reset_ns ({self.tack_reset_ns}) must exceed buffer_ns ({self.buffer_ns}): "
                "a block later than buffer_ns is late, one this far behind starts a new TACK count"
            )
        return self

    def expected_modules(self) -> list[int]:
        return list(range(self.modules)) if isinstance(self.modules, int) else sorted(self.modules)


class Readout:
    """One TACK being assembled: which modules are in; its counts live in the store at `slot`."""

    __slots__ = ("cpu_ns", "created", "mask", "row", "slot", "tack")

    def __init__(self, tack: int, slot: int, created: float, cpu_ns: int) -> None:
        self.tack = tack
        self.slot = slot
        self.row = slot * N_MODULES  # the store row of module 0
        self.created = created
        self.cpu_ns = cpu_ns
        self.mask = 0


class SlowSignalReceiver(ReceiverServer):
    """UDP slow-signal datagrams from TARGET modules in, one record per camera readout out.

    The datagrams received in one turn of the event loop are decoded together with numpy, matched
    block by block (a dict look-up and a bit test each), and copied into the readouts' store with
    one fancy-indexed assignment.
    """

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
        # the newest TACK seen; a block reset_after far behind it restarts the TACK count. It
        # outlives runs, so that a camera restarting its TACKs between runs is reported too.
        self.newest = -1
        self.reset_after = s.tack_reset_ns
        self.tack_resets = 0
        self.next_readout = 1
        self.paused = False
        self.complete = 0
        self.incomplete = 0
        # pending readouts' data, by slot: 32 x 64 counts and 32 second timestamps
        self.store = np.zeros((0, N_MODULES, N_PIXELS), dtype=np.uint16)
        self.seconds = np.zeros((0, N_MODULES), dtype=np.uint64)
        self.free: list[int] = []
        self._grow()
        self._batch: list[bytes] = []
        self._batch_modules: list[int] = []
        self._batch_blocks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._module_cache: dict[str, int] = {}
        self.per_module: dict[str, list[int]] = {
            k: [0] * N_MODULES for k in ("datagrams", "blocks", "missing", "duplicates", "late")
        }
        self.unknown_sources: dict[str, int] = {}
        self.refresh_extra()

    def _grow(self) -> None:
        old = self.store.shape[0]
        new = max(64, 2 * old)
        store = np.zeros((new, N_MODULES, N_PIXELS), dtype=np.uint16)
        store[:old] = self.store
        seconds = np.zeros((new, N_MODULES), dtype=np.uint64)
        seconds[:old] = self.seconds
        self.store, self.seconds = store, seconds
        # flat views: one row per (slot, module), so a batch is stored with one assignment
        self.store_rows = store.reshape(new * N_MODULES, N_PIXELS)
        self.seconds_flat = seconds.reshape(new * N_MODULES)
        self.free.extend(range(new - 1, old - 1, -1))  # pop() hands out low slots first

    # ----- sockets and tasks -----------------------------------------------------------------
    async def setup(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.setup_udp(
            self.settings.listen,
            self.on_datagram,
            rcvbuf_bytes=self.settings.rcvbuf_bytes,
            coalesce_s=self.settings.coalesce_ms / 1000,
        )

    async def ct_flush(self) -> None:
        """Publish readouts older than flush_after_s of wall-clock time; forget TACKs that are
        so far behind the newest that a block carrying one would restart the TACK count."""
        age = self.settings.flush_after_s
        while True:
            await asyncio.sleep(min(age / 4, 0.25))
            cutoff = time.monotonic() - age
            old = [t for t, ro in self.pending.items() if ro.created <= cutoff]
            for tack in sorted(old):
                self._flush(tack)
            self._forget_before(self.newest - self.reset_after)

    async def begin_run(self, run: RunInfo) -> None:
        self.flush_all()  # what was pending belongs before the run
        self._forget()  # duplicates and late blocks are judged within one run
        self.next_readout = 1

    async def end_run(self, run: RunInfo) -> None:
        self.flush_all()
        self._forget()
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
        self._batch_blocks += n // BLOCK_BYTES
        if self._batch_blocks >= _MAX_BATCH_BLOCKS:
            self.process_batch()

    def _bad(self, reason: str, addr: tuple[str, int], message: str) -> None:
        self.counters.error(reason)  # refused input (the run is TAINTED), not a lost readout
        self.limited.warning(reason, "%s: bad datagram from %s:%d: %s", self.name, *addr, message)

    def process_batch(self) -> None:
        """Assemble the datagrams received since the last call (runs once per loop turn)."""
        datagrams, modules = self._batch, self._batch_modules
        if not datagrams:
            return
        self._batch, self._batch_modules, self._batch_blocks = [], [], 0
        try:
            self._assemble(datagrams, modules)
        except Exception as exc:  # a bug here must cost one batch, never the receiver
            self.counters.error("assembly")
            self.counters.drop("assembly_error", len(datagrams))
            self.limited.warning(
                "assembly", "%s: assembling %d datagrams failed: %r", self.name, len(datagrams), exc
            )

    def _assemble(self, datagrams: list[bytes], module_list: list[int]) -> None:
        now_ns = time.time_ns()
        mono = time.monotonic()
        if len(datagrams) == 1:
            blocks = decode_datagram(datagrams[0])
            sizes = [len(blocks)]
        else:
            blocks = decode_datagram(b"".join(datagrams), max_blocks=len(datagrams) * MAX_BLOCKS)
            sizes = [len(d) // BLOCK_BYTES for d in datagrams]
        tacks: list[int] = blocks.tack.tolist()
        starts = [0] * len(sizes)
        for k in range(1, len(sizes)):
            starts[k] = starts[k - 1] + sizes[k - 1]
        d, i = self._match(blocks, tacks, module_list, starts, 0, 0, False, mono, now_ns)
        while d < len(sizes):  # the TACK count restarted at block i of datagram d: go on there
            d, i = self._match(blocks, tacks, module_list, starts, d, i, True, mono, now_ns)

    def _match(
        self,
        blocks: Blocks,
        tacks: list[int],
        module_list: list[int],
        starts: list[int],
        d0: int,
        i0: int,
        resumed: bool,
        mono: float,
        now_ns: int,
    ) -> tuple[int, int]:
        """Match and store the blocks from block i0 (of datagram d0) on. Stops at a block that
        restarts the TACK count: publishes what is pending, forgets the earlier TACKs, and
        returns (datagram, block) to go on from; else returns (datagrams, blocks)."""
        pending = self.pending
        expected = self.expected
        pm_datagrams = self.per_module["datagrams"]
        pm_blocks = self.per_module["blocks"]
        rows: list[int] = []  # per block stored: its row in the store, slot * 32 + module
        store_row = rows.append
        refused: list[int] = []  # indices of the blocks not stored (duplicate, late)
        done: list[Readout] = []
        newest_new = -1
        newest = self.newest
        floor = newest - self.reset_after
        restart = -1
        d = d0
        n_blocks = len(tacks)
        for d in range(d0, len(starts)):
            module = module_list[d]
            end = starts[d + 1] if d + 1 < len(starts) else n_blocks
            first = i0 if d == d0 else starts[d]
            if d > d0 or not resumed:  # a resumed datagram was counted when it was begun
                pm_datagrams[module] += 1
                pm_blocks[module] += end - first
            bit = 1 << module
            needed = bit & expected
            for i, tack in enumerate(tacks[first:end], first):
                if tack < floor:
                    restart = i
                    break
                ro = pending.get(tack)
                if ro is None:
                    # a datagram is sent after its last block: date TACKs back from the arrival
                    backdate = min(max(tacks[end - 1] - tack, 0), _MAX_CPU_BACKDATE_NS)
                    ro = self._find(tack, module, mono, now_ns - backdate)
                    if ro is None:
                        refused.append(i)
                        continue
                    if not ro.mask and tack > newest_new:
                        newest_new = tack
                mask = ro.mask
                if mask & bit:
                    self._duplicate(module)
                    refused.append(i)
                    continue
                mask |= bit
                ro.mask = mask
                store_row(ro.row + module)
                if needed and mask & expected == expected:
                    done.append(ro)
            if restart >= 0:
                break
            top = max(tacks[first:end])
            if top > newest:
                newest = top
                floor = newest - self.reset_after
        self.newest = newest
        stop = restart if restart >= 0 else n_blocks
        if rows:
            index = np.array(rows, dtype=np.intp)
            if not refused and i0 == 0 and stop == n_blocks:
                self.store_rows[index] = blocks.counts
                self.seconds_flat[index] = blocks.second
            else:
                kept = np.arange(i0, stop)
                if refused:
                    kept = np.delete(kept, np.array(refused, dtype=np.intp) - i0)
                self.store_rows[index] = blocks.counts[kept]
                self.seconds_flat[index] = blocks.second[kept]
        # flushing frees slots, so it waits until every block of the batch is stored
        for ro in sorted(done, key=lambda r: r.tack):
            self._flush(ro.tack, complete=True)
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
        if restart < 0:
            return len(starts), n_blocks
        self._tack_reset(tacks[restart], module_list[d])
        return d, restart

    def _find(self, tack: int, module: int, mono: float, cpu_ns: int) -> Readout | None:
        """The readout for a block: within the window, or new; None if refused (counted)."""
        window = self.window
        if window and self.keys:
            keys = self.keys
            j = bisect.bisect_left(keys, tack)
            for k in (j - 1, j):
                if 0 <= k < len(keys) and abs(keys[k] - tack) < window:
                    return self.pending[keys[k]]
        mask = self.recent.get(tack)
        if mask is None and window and self.recent_keys:
            rk = self.recent_keys
            j = bisect.bisect_left(rk, tack)
            for k in (j - 1, j):
                if 0 <= k < len(rk) and abs(rk[k] - tack) < window:
                    mask = self.recent[rk[k]]
                    break
        if mask is not None and mask >> module & 1:
            self._duplicate(module)
            return None
        if mask is not None or tack <= self.watermark:
            self.per_module["late"][module] += 1
            self.counters.drop("late")
            self.limited.warning(
                "late",
                "%s: late block from module %d: readout of TACK %d was already published",
                self.name,
                module,
                tack,
            )
            return None
        if not self.free:
            self._grow()
        ro = Readout(tack, self.free.pop(), mono, cpu_ns)
        self.pending[tack] = ro
        keys = self.keys
        if not keys or tack > keys[-1]:
            keys.append(tack)
        else:
            bisect.insort(keys, tack)
        return ro

    def _duplicate(self, module: int) -> None:
        self.per_module["duplicates"][module] += 1
        self.counters.error("duplicate")

    def _flush(self, tack: int, complete: bool = False) -> None:
        """Take the readout keyed `tack` out of the pending map, publish it, free its slot."""
        ro = self.pending.pop(tack)
        del self.keys[bisect.bisect_left(self.keys, tack)]
        mask = ro.mask
        self._remember(tack, mask)
        absent = None
        if mask != _ALL_MODULES:  # slots are reused: clear what an earlier readout left there
            absent = (mask >> _BITS) & 1 == 0
            self.store[ro.slot][absent] = 0
            self.seconds[ro.slot][absent] = 0
        if complete:
            self.complete += 1
        else:
            self.incomplete += 1
            # published without some modules' blocks: input lost, so the run is INCOMPLETE
            self.counters.drop("incomplete_readout")
            missing = self.per_module["missing"]
            gone = self.expected & ~mask
            while gone:
                low = gone & -gone
                missing[low.bit_length() - 1] += 1
                gone ^= low
        if self.paused:
            self.counters.drop("paused")
        else:
            self.publish_nowait(self._record(ro, absent, complete))
        self.free.append(ro.slot)

    def flush_all(self) -> None:
        """Assemble what was received, then publish every pending readout, oldest TACK first."""
        self.process_batch()
        for tack in list(self.keys):
            self._flush(tack)

    def _tack_reset(self, tack: int, module: int) -> None:
        """Block `tack` is far behind the newest: the camera restarted its TACK count. Publish
        what is pending (it belongs to the old count) and forget the old TACKs, so that the new
        count's blocks are assembled, not refused as duplicates or late."""
        behind = self.newest - tack
        self.tack_resets += 1
        pending = len(self.keys)
        for key in list(self.keys):
            self._flush(key)
        self._forget()
        self.newest = tack
        self.limited.info(
            "tack_reset",
            "%s: TACK count restarted: module %d sent TACK %d, %.3f s behind the newest; "
            "published the %d pending readouts and forgot the earlier TACKs",
            self.name,
            module,
            tack,
            behind / 1e9,
            pending,
        )

    def _forget(self) -> None:
        """Forget published TACKs: nothing earlier counts as a duplicate or as late any more."""
        self.recent.clear()
        self.recent_keys.clear()
        self.watermark = -1

    def _forget_before(self, tack: int) -> None:
        rk = self.recent_keys
        if rk and rk[0] < tack:
            cut = bisect.bisect_left(rk, tack)
            for old in rk[:cut]:
                del self.recent[old]
            del rk[:cut]

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

    def _record(self, ro: Readout, absent: np.ndarray | None, complete: bool) -> Record:
        number = self.next_readout
        self.next_readout += 1
        counts = self.store[ro.slot]
        tags: dict[str, Any] = {
            "tack": ro.tack,
            "readout": number,
            "modules_present": ro.mask,
            "complete": complete,
            "cpu_time_ns": ro.cpu_ns,
            "second_ns": self.seconds[ro.slot].tolist(),
        }
        if self.settings.format == "ssdaq":
            mv = counts * MV_PER_COUNT
            if absent is not None:
                mv[absent] = np.nan
            cpu_s, cpu_ns = divmod(ro.cpu_ns, 1_000_000_000)
            payload = encode_ssdaq_frame(number, ro.tack, cpu_s, cpu_ns, mv)
            tags["format"] = "ssdaq"
        elif self.settings.payload == "mv":
            mv32 = counts.astype(np.float32)
            mv32 *= np.float32(MV_PER_COUNT)
            if absent is not None:
                mv32[absent] = np.nan
            payload = mv32.astype("<f4", copy=False).tobytes()
            tags.update(dtype="<f4", unit="mV", shape=[N_MODULES, N_PIXELS])
        else:
            payload = counts.astype("<u2", copy=False).tobytes()
            tags.update(dtype="<u2", unit="counts", shape=[N_MODULES, N_PIXELS])
        return self.new_record([payload], tags, time_ns=ro.cpu_ns)

    # ----- status and commands ---------------------------------------------------------------
    def refresh_extra(self) -> None:
        extra = self.counters.extra
        extra["readouts_complete"] = self.complete
        extra["readouts_incomplete"] = self.incomplete
        extra["pending_readouts"] = len(self.pending)
        extra["tack_resets"] = self.tack_resets
        extra["remembered_tacks"] = len(self.recent)
        extra["next_readout"] = self.next_readout
        extra["paused"] = self.paused
        extra["modules"] = {k: list(v) for k, v in self.per_module.items()}
        extra["unknown_sources"] = dict(self.unknown_sources)

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
        self.refresh_extra()
        blocks = self.per_module["blocks"]
        shown = sorted(
            {m for m in range(N_MODULES) if blocks[m]} | set(self.settings.expected_modules())
        )
        return {
            "readouts_complete": self.complete,
            "readouts_incomplete": self.incomplete,
            "pending_readouts": len(self.pending),
            "tack_resets": self.tack_resets,
            "next_readout": self.next_readout,
            "paused": self.paused,
            "drops": dict(self.counters.drops),
            "errors": dict(self.counters.errors),
            "unknown_sources": dict(self.unknown_sources),
            "modules": {str(m): {k: v[m] for k, v in self.per_module.items()} for m in shown},
        }
