"""Reading Constellation frames: a ZeroMQ frame that holds a fixed run of concatenated msgpack values.

CSCP, CHP and CMDP (and CDTP) put several msgpack values one after the other in one frame instead of
one array. `unpack_values` reads them with the frame's own length as the bound on everything msgpack
allocates, and turns every way a frame can be wrong into a ProtocolError that names the frame.
"""

from __future__ import annotations

from typing import Any

import msgpack

from daqd.errors import ProtocolError

_UNPACK_ERRORS = (
    msgpack.UnpackException,
    msgpack.ExtraData,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
)


def unpack_values(frame: bytes, what: str, max_bytes: int, *, rest: bool = False) -> list[Any]:
    """Every msgpack value in `frame`, in order. `what` names the frame in errors.

    Strings, arrays and maps are bounded by the frame's length (msgpack's max_buffer_size), so a
    length prefix that lies is refused before anything is allocated. Timestamps (ext -1) come back
    as msgpack.Timestamp; other ext types are refused. Map keys must be str or int.
    """
    if len(frame) > max_bytes:
        raise ProtocolError(f"{what}: {len(frame)} bytes, more than the limit of {max_bytes}")
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        timestamp=0,
        max_buffer_size=max(len(frame), 1),
        ext_hook=_refuse_ext,
    )
    unpacker.feed(frame)
    values: list[Any] = []
    end = 0
    try:
        while True:
            value = unpacker.unpack()
            _check_keys(value, what, 0)
            values.append(value)
            end = unpacker.tell()
    except msgpack.OutOfData:
        pass
    except ProtocolError:
        raise
    except _UNPACK_ERRORS as exc:
        raise ProtocolError(
            f"{what}: not msgpack at value {len(values) + 1} ({type(exc).__name__}: {exc})"
        ) from None
    if end != len(frame):  # a value cut short at the end of the frame
        raise ProtocolError(f"{what}: a msgpack value is cut off at byte {end}")
    return values


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not used by Constellation")


_MAX_DEPTH = 64


def _check_keys(value: Any, what: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ProtocolError(f"{what}: nested more than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise ProtocolError(f"{what}: map key {k!r} is not a string or an integer")
            _check_keys(v, what, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_keys(v, what, depth + 1)


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` if it is of `kind` (bool is never an int here), else a ProtocolError."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is int):
        return value
    names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise ProtocolError(f"{what}: expected {names}, got {type(value).__name__}")


def pack(*values: Any) -> bytes:
    """Concatenated msgpack values (str as str, bytes as bin, Timestamp as ext -1)."""
    return b"".join(msgpack.packb(v, use_bin_type=True) for v in values)
