"""CMDP, Constellation's monitoring protocol: sans-IO encode and decode of its messages.

A message is 3 ZeroMQ frames: the topic as raw bytes; a header of "CMDP\\x01", the sender's name, a
timestamp (ext -1) and a map of tags; a payload. The topic says what the payload is:
`LOG/<LEVEL>[/<COMPONENT>]` (UTF-8 text), `STAT/<METRIC>` (msgpack value, 0, unit string), and the
notifications `LOG?` and `STAT?` (a msgpack map of topic -> description).
"""

from __future__ import annotations

import time as _time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daqd.errors import ProtocolError
from daqd.protocols.msgframes import expect, pack, unpack_values

PROTOCOL = "CMDP\x01"
LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "STATUS", "CRITICAL")
MAX_TOPIC_BYTES = 1024
MAX_FRAME_BYTES = 1 << 20


def _now() -> msgpack.Timestamp:
    return msgpack.Timestamp.from_unix_nano(_time.time_ns())


@dataclass(frozen=True, slots=True)
class Log:
    sender: str
    level: str  # one of LEVELS
    component: str  # "" when the topic has none
    text: str
    tags: dict[str, Any] = field(default_factory=dict)
    time: msgpack.Timestamp = field(default_factory=_now)

    @property
    def topic(self) -> str:
        return f"LOG/{self.level}" + (f"/{self.component}" if self.component else "")


@dataclass(frozen=True, slots=True)
class Stat:
    sender: str
    metric: str
    value: Any
    unit: str
    tags: dict[str, Any] = field(default_factory=dict)
    time: msgpack.Timestamp = field(default_factory=_now)

    @property
    def topic(self) -> str:
        return f"STAT/{self.metric}"


@dataclass(frozen=True, slots=True)
class Notification:
    """What a sender offers: `kind` "LOG?" or "STAT?", topics -> descriptions."""

    sender: str
    kind: str
    topics: dict[str, str]
    tags: dict[str, Any] = field(default_factory=dict)
    time: msgpack.Timestamp = field(default_factory=_now)

    @property
    def topic(self) -> str:
        return self.kind


Message = Log | Stat | Notification


def encode(msg: Message) -> list[bytes]:
    header = pack(PROTOCOL, msg.sender, msg.time, msg.tags)
    if isinstance(msg, Log):
        payload = msg.text.encode()
    elif isinstance(msg, Stat):
        payload = pack(msg.value, 0, msg.unit)
    else:
        payload = pack(msg.topics)
    return [msg.topic.encode(), header, payload]


def decode(frames: Sequence[bytes]) -> Message:
    if len(frames) != 3:
        raise ProtocolError(f"CMDP message of {len(frames)} frames; it has 3")
    raw_topic, raw_header, payload = (bytes(f) for f in frames)
    if len(raw_topic) > MAX_TOPIC_BYTES:
        raise ProtocolError(f"CMDP topic of {len(raw_topic)} bytes, over {MAX_TOPIC_BYTES}")
    try:
        topic = raw_topic.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"CMDP topic is not UTF-8 at byte {exc.start}") from None
    header = unpack_values(raw_header, "CMDP header (frame 1)", MAX_FRAME_BYTES)
    if len(header) != 4:
        raise ProtocolError(f"CMDP header (frame 1) holds {len(header)} msgpack values; it has 4")
    protocol, sender, time, tags = header
    if protocol != PROTOCOL:
        raise ProtocolError(f"CMDP header: protocol {protocol!r}, expected {PROTOCOL!r}")
    expect(sender, str, "CMDP header: sender")
    expect(time, msgpack.Timestamp, "CMDP header: time")
    expect(tags, dict, "CMDP header: tags")
    if not all(isinstance(k, str) for k in tags):
        raise ProtocolError("CMDP header: a tag name is not a string")
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"CMDP payload of {len(payload)} bytes, over {MAX_FRAME_BYTES}")
    if topic.startswith("LOG/"):
        level, _, component = topic[4:].partition("/")
        if level not in LEVELS:
            raise ProtocolError(f"CMDP topic {topic!r}: level {level!r} is not one of {LEVELS}")
        if not component and topic.endswith("/"):
            raise ProtocolError(f"CMDP topic {topic!r}: LOG/<LEVEL>[/<COMPONENT>] expected")
        try:
            text = payload.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"CMDP log text is not UTF-8 at byte {exc.start}") from None
        return Log(sender, level, component, text, tags, time)
    if topic.startswith("STAT/") and len(topic) > 5:
        values = unpack_values(payload, "CMDP metric (frame 2)", MAX_FRAME_BYTES)
        if len(values) != 3:
            raise ProtocolError(f"CMDP metric holds {len(values)} msgpack values; it has 3")
        value, _unused, unit = values
        expect(unit, str, "CMDP metric unit")
        return Stat(sender, topic[5:], value, unit, tags, time)
    if topic in ("LOG?", "STAT?"):
        values = unpack_values(payload, "CMDP notification (frame 2)", MAX_FRAME_BYTES)
        if len(values) != 1 or not isinstance(values[0], dict):
            raise ProtocolError("CMDP notification: payload is not one map")
        topics = values[0]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in topics.items()):
            raise ProtocolError("CMDP notification: topics and descriptions must be strings")
        return Notification(sender, topic, topics, tags, time)
    raise ProtocolError(f"CMDP topic {topic!r} is neither LOG/, STAT/, LOG? nor STAT?")
