"""The `zmq` publisher: a PUB socket in SSDAQ's modes, records or bare payload frames."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import threading
from typing import Any, Literal

import msgpack
import zmq
import zmq.backend
from pydantic import Field, model_validator

from daqd.hostport import zmq_bindable
from daqd.publisher import Publisher, PublisherSettings
from daqd.record import Record

_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_backend_send: Any = zmq.backend.Socket.send  # typed loosely: its overloads hide copy=bool
_ZERO_COPY_BYTES = 65536  # below this, copying into a zmq message is cheaper than tracking a Frame
# the parts of a record header, msgpack {"seq": int, "time_ns": int, "tags": map}
_HEAD_SEQ = b"\x83\xa3seq"
_HEAD_TIME = b"\xa7time_ns"
_HEAD_TAGS = b"\xa4tags"
_SCHED_BATCH: int | None = getattr(os, "SCHED_BATCH", None)  # Linux


@functools.cache
def _batch_policy() -> int | None:
    """SCHED_BATCH, if a new thread of this process may switch itself to it, else None.

    libzmq aborts the whole process when it cannot set its I/O thread's policy, and the kernel
    refuses under a seccomp filter without @resources or for a SCHED_IDLE process without
    CAP_SYS_NICE: ask first, from a throwaway thread, as libzmq's thread would."""
    if _SCHED_BATCH is None:
        return None
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, _SCHED_BATCH, os.sched_param(0))
        except OSError:
            allowed.append(False)
        else:
            allowed.append(True)

    thread = threading.Thread(target=probe, name="daqd-sched-probe")
    thread.start()
    thread.join()
    return _SCHED_BATCH if allowed == [True] else None


def _endpoint_host(endpoint: str) -> str:
    rest = endpoint.split("://", 1)[-1]
    return rest.rpartition(":")[0].strip("[]") if ":" in rest else rest


class ZmqSettings(PublisherSettings):
    endpoint: str
    mode: Literal["local", "outbound", "remote"] = "local"
    framing: Literal["record", "payload"] = "record"
    policy: Literal["block", "drop"] = "drop"  # a slow live monitor must not stall the data path
    sndhwm: int = Field(10000, ge=0)

    @model_validator(mode="after")
    def _check_mode(self) -> ZmqSettings:
        scheme = self.endpoint.split("://", 1)[0]
        if scheme not in ("tcp", "ipc", "inproc"):
            raise ValueError(f"endpoint {self.endpoint!r}: expected tcp://, ipc:// or inproc://")
        if self.mode == "local" and scheme == "tcp":
            host = _endpoint_host(self.endpoint)
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    f"mode 'local' binds a loopback address (127.x), not {host!r}; "
                    "use mode 'outbound' to bind an interface address"
                )
        return self


class ZmqPublisher(Publisher):
    """PUB socket. `local`/`outbound` bind `endpoint`; `remote` connects to a SUB that binds.

    framing "record": [topic = source, msgpack {seq, time_ns, tags}, *payload blocks];
    framing "payload": the record's payload as one bare frame (SSDAQ-compatible consumers).
    Messages a full socket cannot take are never dropped silently: with policy "drop" they are
    counted as drops "hwm", with "block" the publisher waits (and its queue fills behind it).
    """

    Settings = ZmqSettings
    settings: ZmqSettings

    async def start(self) -> None:
        s = self.settings
        # tcp/ipc: a context of its own, whose I/O thread runs SCHED_BATCH (Linux), so that
        # waking it for each batch does not preempt the event loop thread (on a busy 2-core host:
        # ~20-45% less I/O-thread CPU per message, far fewer preemptions of the loop).
        # inproc peers can only be in the daemon's context.
        self._ctx: zmq.Context[Any] | None = None
        ctx: zmq.Context[Any] = self.host.zmq_context
        if not s.endpoint.startswith("inproc://"):
            ctx = self._ctx = zmq.Context()
            policy = _batch_policy()
            if policy is not None:
                ctx.set(zmq.THREAD_SCHED_POLICY, policy)
        try:
            self.sock = ctx.socket(zmq.PUB)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.SNDHWM, s.sndhwm)
            # without NODROP a PUB discards silently at its high-water mark; with it, send says
            # EAGAIN
            self.sock.setsockopt(zmq.XPUB_NODROP, 1)
            if s.mode == "remote":
                self.sock.connect(s.endpoint)
                self.addresses["endpoint"] = s.endpoint
            else:
                self.sock.bind(zmq_bindable(s.endpoint))
                self.addresses["endpoint"] = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            if self._ctx is not None:
                self._ctx.destroy(linger=0)
            raise
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._topics: dict[str, bytes] = {}

    def _send_ready(self, records: list[Record]) -> int:
        """Send records in order until one would have to wait for room; return how many were
        handled (sent, or counted as dropped under policy "drop")."""
        # The backend's send() with int flags: send_multipart() costs ~4x more per message, and
        # the sugar send() wrapper another ~40%.
        # With XPUB_NODROP, EAGAIN can only come at a message's first frame: libzmq checks the
        # high-water mark in whole messages, so once a first frame is taken the rest are too.
        sock = self._sync
        send = _backend_send
        drop = self.settings.policy == "drop"
        if self.settings.framing == "payload":
            for n, r in enumerate(records):
                blocks = r.payload
                frame = blocks[0] if len(blocks) == 1 else b"".join(blocks)
                try:
                    send(sock, frame, _LAST, len(frame) < _ZERO_COPY_BYTES)
                except zmq.Again:
                    if drop:
                        self.counters.drop("hwm")
                        continue
                    return n  # policy block: this one waits for room (send() below)
            return len(records)
        pack = self._packer.pack
        topics = self._topics
        # consecutive records often share one tags dict (one per sender): pack it once per batch
        last_tags: object = None
        packed_tags = b""
        for n, r in enumerate(records):
            topic = topics.get(r.source) or topics.setdefault(r.source, r.source.encode())
            tags = r.tags
            if tags is not last_tags:
                last_tags, packed_tags = tags, pack(tags)
            # the msgpack map {seq, time_ns, tags}, byte for byte, without building a dict
            header = b"".join(
                (_HEAD_SEQ, pack(r.seq), _HEAD_TIME, pack(r.time_ns), _HEAD_TAGS, packed_tags)
            )
            try:
                send(sock, topic, _MORE)
            except zmq.Again:
                if drop:
                    self.counters.drop("hwm")
                    continue
                return n
            blocks = r.payload
            if len(blocks) == 1:  # the common case, unrolled
                send(sock, header, _MORE)
                block = blocks[0]
                send(sock, block, _LAST, len(block) < _ZERO_COPY_BYTES)
                continue
            last = len(blocks) - 1
            send(sock, header, _LAST if last < 0 else _MORE)
            for i, block in enumerate(blocks):
                send(sock, block, _LAST if i == last else _MORE, len(block) < _ZERO_COPY_BYTES)
        return len(records)

    async def send(self, records: list[Record]) -> None:
        """_send_ready(), waiting for room where policy "block" makes a record wait. A PUB always
        polls writable, so waiting is retrying with backoff."""
        done = self._send_ready(records)
        delay = 0.0005
        while done < len(records):
            self.progress = done  # a shutdown deadline may cut the wait short
            await asyncio.sleep(delay)
            n = self._send_ready(records[done:])
            delay = 0.0005 if n else min(delay * 2, 0.05)
            done += n

    async def close(self) -> None:
        # give subscribers what is left of the shutdown deadline (drain_timeout_s; none after a
        # second signal) to take what the socket still holds; ending our context waits for
        # that, in a thread so that the loop goes on meanwhile
        deadline = self.host.deadline
        linger_s = (
            deadline.remaining()
            if deadline is not None
            else self.host.config.daemon.drain_timeout_s
        )
        self.sock.close(linger=int(linger_s * 1000))
        if self._ctx is not None:
            await asyncio.to_thread(self._ctx.term)
