"""CHP, Constellation's heartbeat protocol: sans-IO encode and decode of its messages.

Frame 0 holds six concatenated msgpack values: "CHP\\x01", the sender's canonical name, a timestamp
(ext -1), the state code, the flags and the interval until the next heartbeat in ms. An optional
frame 1 carries the sender's status as UTF-8.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from daqd.errors import ProtocolError
from daqd.protocols.msgframes import expect, pack, unpack_values

PROTOCOL = "CHP\x01"
MAX_FRAME_BYTES = 64 << 10
MAX_STATUS_BYTES = 64 << 10


class Flags(enum.IntFlag):
    NONE = 0x00
    DENY_DEPARTURE = 0x01
    TRIGGER_INTERRUPT = 0x02
    MARK_DEGRADED = 0x04
    IS_EXTRASYSTOLE = 0x80


#: The autonomy role -> the flags its heartbeats carry.
ROLE_FLAGS = {
    "NONE": Flags.NONE,
    "TRANSIENT": Flags.MARK_DEGRADED,
    "DYNAMIC": Flags.MARK_DEGRADED | Flags.TRIGGER_INTERRUPT,
    "ESSENTIAL": Flags.MARK_DEGRADED | Flags.TRIGGER_INTERRUPT | Flags.DENY_DEPARTURE,
}


def interval_ms(subscribers: int, max_interval_ms: int) -> int:
    """The interval rule: 500 ms, growing with the square root of the subscribers beyond one,
    never above the configured maximum."""
    grown = 500.0 * max(subscribers - 1, 0) ** 0.5 * 3
    return int(min(max_interval_ms, max(500.0, grown)))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sender: str
    time: msgpack.Timestamp
    state: int
    flags: int
    interval_ms: int
    status: str | None = None


def encode(hb: Heartbeat) -> list[bytes]:
    frames = [pack(PROTOCOL, hb.sender, hb.time, hb.state, int(hb.flags), hb.interval_ms)]
    if hb.status is not None:
        frames.append(hb.status.encode())
    return frames


def decode(frames: Sequence[bytes]) -> Heartbeat:
    if len(frames) not in (1, 2):
        raise ProtocolError(f"CHP message of {len(frames)} frames; it has 1 or 2")
    values = unpack_values(frames[0], "CHP frame 0", MAX_FRAME_BYTES)
    if len(values) != 6:
        raise ProtocolError(f"CHP frame 0 holds {len(values)} msgpack values; it has 6")
    protocol, sender, time, state, flags, interval = values
    if protocol != PROTOCOL:
        raise ProtocolError(f"CHP frame 0: protocol {protocol!r}, expected {PROTOCOL!r}")
    expect(sender, str, "CHP sender")
    expect(time, msgpack.Timestamp, "CHP time")
    for what, v, top in (
        ("state", state, 0xFF),
        ("flags", flags, 0xFF),
        ("interval", interval, 2**32 - 1),
    ):
        expect(v, int, f"CHP {what}")
        if not 0 <= v <= top:
            raise ProtocolError(f"CHP {what} {v} out of range 0..{top}")
    status = None
    if len(frames) == 2:
        if len(frames[1]) > MAX_STATUS_BYTES:
            raise ProtocolError(f"CHP status of {len(frames[1])} bytes, over {MAX_STATUS_BYTES}")
        try:
            status = bytes(frames[1]).decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"CHP status is not UTF-8 at byte {exc.start}") from None
    return Heartbeat(sender, time, state, flags, interval, status)
