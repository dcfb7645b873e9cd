"""CHIRP, Constellation's discovery: sans-IO encode and decode of its 42-byte UDP beacons.

A beacon says that a host (identified by the MD5 of its lower-cased canonical name) of a group (the
MD5 of the lower-cased group name) OFFERs a service on a TCP port, REQUESTs offers of a service, or
DEPARTs from it. The service's address is the beacon's UDP source address, so it is not in the beacon.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from daqd.errors import ProtocolError

PORT = 7123
MULTICAST_ADDRESS = "239.192.7.123"
MULTICAST_TTL = 8
HEADER = b"CHIRP\x01"
BEACON_BYTES = 42

_LAYOUT = struct.Struct(">6sB16s16sBH")
assert _LAYOUT.size == BEACON_BYTES


class BeaconType(enum.IntEnum):
    REQUEST = 1
    OFFER = 2
    DEPART = 3


class Service(enum.IntEnum):
    CONTROL = 1  # CSCP
    HEARTBEAT = 2  # CHP
    MONITORING = 3  # CMDP
    DATA = 4  # CDTP


def name_uuid(name: str) -> bytes:
    """The 16 raw bytes identifying a group or a host: MD5 of the lower-cased name."""
    return hashlib.md5(name.lower().encode(), usedforsecurity=False).digest()


@dataclass(frozen=True, slots=True)
class Beacon:
    type: BeaconType
    group: bytes  # 16 bytes
    host: bytes  # 16 bytes
    service: Service
    port: int  # 0 in a REQUEST


def encode(beacon: Beacon) -> bytes:
    if len(beacon.group) != 16 or len(beacon.host) != 16:
        raise ValueError("group and host must be 16-byte UUIDs")
    if not 0 <= beacon.port <= 0xFFFF:
        raise ValueError(f"port {beacon.port} out of range")
    return _LAYOUT.pack(
        HEADER,
        BeaconType(beacon.type),
        beacon.group,
        beacon.host,
        Service(beacon.service),
        beacon.port,
    )


def decode(data: bytes) -> Beacon:
    """One datagram -> Beacon, or ProtocolError saying what is wrong with it."""
    if len(data) != BEACON_BYTES:
        raise ProtocolError(f"CHIRP beacon of {len(data)} bytes; a beacon has {BEACON_BYTES}")
    header, kind, group, host, service, port = _LAYOUT.unpack(data)
    if header != HEADER:
        raise ProtocolError(f"not a CHIRP v1 beacon: header {header!r} at byte 0")
    try:
        beacon_type = BeaconType(kind)
    except ValueError:
        raise ProtocolError(f"CHIRP beacon type {kind} at byte 6 is not 1, 2 or 3") from None
    try:
        svc = Service(service)
    except ValueError:
        raise ProtocolError(f"CHIRP service {service} at byte 39 is not 1 to 4") from None
    return Beacon(beacon_type, group, host, svc, port)
