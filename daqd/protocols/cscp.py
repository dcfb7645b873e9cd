"""CSCP, Constellation's satellite control protocol: sans-IO encode and decode of its messages.

A message is 2 or 3 ZeroMQ frames. Frame 0 (header): "CSCP\\x01", the sender's name, a timestamp
(ext -1) and a map of tags. Frame 1 (verb): the type (REQUEST, or one of the reply types) and a text
(the command in a request, a human-readable message in a reply). Frame 2, only when there is one:
one msgpack payload value. A payload of None is sent as no frame 2.
"""

from __future__ import annotations

import enum
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daqd.errors import ProtocolError
from daqd.protocols.msgframes import expect, pack, unpack_values

PROTOCOL = "CSCP\x01"
#: Bound on each frame (a controller's configuration map goes in frame 2).
MAX_FRAME_BYTES = 16 << 20


class Type(enum.IntEnum):
    REQUEST = 0
    SUCCESS = 1
    NOTIMPLEMENTED = 2
    INCOMPLETE = 3
    INVALID = 4
    UNKNOWN = 5
    ERROR = 6


def now() -> msgpack.Timestamp:
    return msgpack.Timestamp.from_unix_nano(_time.time_ns())


@dataclass(frozen=True, slots=True)
class Message:
    sender: str
    type: Type
    text: str
    payload: Any = None
    tags: dict[str, Any] = field(default_factory=dict)
    time: msgpack.Timestamp = field(default_factory=now)


def encode(msg: Message) -> list[bytes]:
    frames = [pack(PROTOCOL, msg.sender, msg.time, msg.tags), pack(int(msg.type), msg.text)]
    if msg.payload is not None:
        frames.append(pack(msg.payload))
    return frames


def decode(frames: Sequence[bytes]) -> Message:
    """2 or 3 frames -> Message, or ProtocolError naming the frame and what is wrong in it."""
    if len(frames) not in (2, 3):
        raise ProtocolError(f"CSCP message of {len(frames)} frames; it has 2 or 3")
    header = unpack_values(frames[0], "CSCP header (frame 0)", MAX_FRAME_BYTES)
    if len(header) != 4:
        raise ProtocolError(f"CSCP header (frame 0) holds {len(header)} msgpack values; it has 4")
    protocol, sender, time, tags = header
    if protocol != PROTOCOL:
        raise ProtocolError(f"CSCP header: protocol {protocol!r}, expected {PROTOCOL!r}")
    expect(sender, str, "CSCP header: sender")
    expect(time, msgpack.Timestamp, "CSCP header: time")
    expect(tags, dict, "CSCP header: tags")
    if not all(isinstance(k, str) for k in tags):
        raise ProtocolError("CSCP header: a tag name is not a string")
    verb = unpack_values(frames[1], "CSCP verb (frame 1)", MAX_FRAME_BYTES)
    if len(verb) != 2:
        raise ProtocolError(f"CSCP verb (frame 1) holds {len(verb)} msgpack values; it has 2")
    kind, text = verb
    expect(kind, int, "CSCP verb: type")
    try:
        verb_type = Type(kind)
    except ValueError:
        raise ProtocolError(f"CSCP verb: type {kind} is not 0 to 6") from None
    expect(text, str, "CSCP verb: text")
    payload = None
    if len(frames) == 3:
        values = unpack_values(frames[2], "CSCP payload (frame 2)", MAX_FRAME_BYTES)
        if len(values) != 1:
            raise ProtocolError(
                f"CSCP payload (frame 2) holds {len(values)} msgpack values; it has 1"
            )
        payload = values[0]
    return Message(sender, verb_type, text, payload, tags, time)
