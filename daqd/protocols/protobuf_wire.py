"""Minimal sans-IO protobuf (proto3) wire encoding for the few messages daqd exchanges with
Saturnin (ICCP): varints, length-delimited fields, fixed32/64, and the well-known
`google.protobuf.Struct`/`Value`/`ListValue`/`Any`.

Written from the wire format's rules (field key = field_number << 3 | wire_type; wire types 0
varint, 1 fixed64, 2 length-delimited, 5 fixed32), not from generated code. Decoding never trusts
a length: every length is checked against the bytes left, nesting is bounded, and anything wrong
raises `WireError` (a ValueError) saying what and where.

(Named protobuf_wire to be usable by any daqd protocol that needs bare protobuf; it holds no
message of its own beyond the google.protobuf well-known types. ssdaq_pb decodes SSDAQ's messages
with `scan`, which walks a message in place, memoryviews included.)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
MAX_DEPTH = 64  # Struct/ListValue/ConfigProto nesting accepted when decoding
_U64 = (1 << 64) - 1
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")


class WireError(ValueError):
    """Bytes that are not valid protobuf for the expected message. `reason` names the fault in
    one word, for a receiver's counters: truncated, bad_varint, bad_field, bad_wire_type, or
    malformed (anything else)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


Buffer = bytes | bytearray | memoryview


# ----- scalars --------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Encode a non-negative int (< 2**64) as a varint; negative int64 as its two's complement."""
    if value < 0:
        value &= _U64
    if value > _U64:
        raise WireError(f"varint {value} does not fit in 64 bits")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: Buffer, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode the varint at `pos`, within data[:end]; return (value, next position). More than
    10 bytes, or a value beyond 64 bits, is refused (no encoder writes either)."""
    stop = len(data) if end is None else end
    result = shift = 0
    while True:
        if pos >= stop:
            raise WireError("truncated varint", "truncated")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes", "bad_varint")
    if result > _U64:
        raise WireError("varint beyond 64 bits", "bad_varint")
    return result, pos


def zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63) if value < 0 else value << 1


def unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def field_varint(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def field_bytes(field: int, value: bytes) -> bytes:
    return key(field, LEN) + varint(len(value)) + value


def field_str(field: int, value: str) -> bytes:
    return field_bytes(field, value.encode("utf-8"))


def field_double(field: int, value: float) -> bytes:
    return key(field, FIXED64) + struct.pack("<d", value)


# ----- reading fields -------------------------------------------------------------------------


def scan(data: Buffer, start: int = 0, end: int | None = None) -> list[tuple[int, int, int, int]]:
    """The fields of the message in data[start:end], without copying: (number, wire type, value,
    value end). VARINT/FIXED32/FIXED64 values are raw unsigned ints (value end 0); for LEN, value
    is the payload's start and value end its end. Every length is checked against `end`; groups
    (wire types 3, 4) and field number 0 are refused."""
    stop = len(data) if end is None else end
    out = []
    pos = start
    while pos < stop:
        k, pos = read_varint(data, pos, stop)
        number, wire_type = k >> 3, k & 7
        if number == 0 or number > (1 << 29) - 1:
            raise WireError(f"field number {number} is out of range", "bad_field")
        if wire_type == VARINT:
            value, pos = read_varint(data, pos, stop)
            out.append((number, wire_type, value, 0))
        elif wire_type == FIXED64:
            if pos + 8 > stop:
                raise WireError(f"field {number}: truncated fixed64", "truncated")
            out.append((number, wire_type, _FIXED64.unpack_from(data, pos)[0], 0))
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > stop:
                raise WireError(f"field {number}: truncated fixed32", "truncated")
            out.append((number, wire_type, _FIXED32.unpack_from(data, pos)[0], 0))
            pos += 4
        elif wire_type == LEN:
            size, pos = read_varint(data, pos, stop)
            if size > stop - pos:
                raise WireError(
                    f"field {number}: length {size} is past the end ({stop - pos} left)",
                    "truncated",
                )
            out.append((number, wire_type, pos, pos + size))
            pos += size
        else:
            raise WireError(
                f"field {number}: wire type {wire_type} is not supported", "bad_wire_type"
            )
    return out


def fields(data: Buffer) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) for each field, as `scan`, but with a LEN field's
    value as its bytes."""
    buf = bytes(data)
    for number, wire_type, value, value_end in scan(buf):
        yield number, wire_type, buf[value:value_end] if wire_type == LEN else value


def expect(number: int, wire_type: int, want: int, what: str) -> None:
    if wire_type != want:
        names = {VARINT: "varint", FIXED64: "fixed64", LEN: "length-delimited", FIXED32: "fixed32"}
        raise WireError(
            f"{what} (field {number}) must be {names[want]}, got wire type {wire_type}",
            "bad_wire_type",
        )


def text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{what}: not UTF-8 ({exc})") from None


def as_double(raw: int) -> float:
    return float(struct.unpack("<d", raw.to_bytes(8, "little"))[0])


def as_float(raw: int) -> float:
    return float(struct.unpack("<f", raw.to_bytes(4, "little"))[0])


def map_entry(raw: bytes, what: str) -> tuple[str, bytes | None]:
    """A map<string, message> entry: (key, value bytes or None when absent)."""
    name, value = "", None
    for number, wire_type, v in fields(raw):
        if number == 1:
            expect(number, wire_type, LEN, f"{what} key")
            name = text(v, f"{what} key")
        elif number == 2:
            expect(number, wire_type, LEN, f"{what} value")
            value = v
    return name, value


def entry(name: str, value: bytes) -> bytes:
    return field_str(1, name) + field_bytes(2, value)


# ----- google.protobuf.Struct / Value / ListValue / Any ---------------------------------------

STRUCT_TYPE_URL = "type.googleapis.com/google.protobuf.Struct"


def encode_value(value: Any, depth: int = 0) -> bytes:
    """A google.protobuf.Value: None, bool, number (as double), str, list, or str-keyed map."""
    if depth > MAX_DEPTH:
        raise WireError(f"Struct nested deeper than {MAX_DEPTH}")
    if value is None:
        return field_varint(1, 0)
    if isinstance(value, bool):
        return field_varint(4, int(value))
    if isinstance(value, int | float):
        return field_double(2, float(value))
    if isinstance(value, str):
        return field_str(3, value)
    if isinstance(value, Mapping):
        return field_bytes(5, encode_struct(value, depth + 1))
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = b"".join(field_bytes(1, encode_value(v, depth + 1)) for v in value)
        return field_bytes(6, items)
    raise WireError(f"a {type(value).__name__} cannot be a google.protobuf.Value")


def encode_struct(mapping: Mapping[str, Any], depth: int = 0) -> bytes:
    out = bytearray()
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise WireError(f"Struct keys are strings, not {type(name).__name__}")
        out += field_bytes(1, entry(name, encode_value(value, depth)))
    return bytes(out)


def decode_value(raw: bytes, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"Struct nested deeper than {MAX_DEPTH}")
    value: Any = None  # a Value with no kind set reads as null
    for number, wire_type, v in fields(raw):
        if number == 1:
            expect(number, wire_type, VARINT, "Value.null_value")
            value = None
        elif number == 2:
            expect(number, wire_type, FIXED64, "Value.number_value")
            value = as_double(v)
        elif number == 3:
            expect(number, wire_type, LEN, "Value.string_value")
            value = text(v, "Value.string_value")
        elif number == 4:
            expect(number, wire_type, VARINT, "Value.bool_value")
            value = bool(v)
        elif number == 5:
            expect(number, wire_type, LEN, "Value.struct_value")
            value = decode_struct(v, depth + 1)
        elif number == 6:
            expect(number, wire_type, LEN, "Value.list_value")
            value = decode_list(v, depth + 1)
    return value


def decode_list(raw: bytes, depth: int = 0) -> list[Any]:
    items = []
    for number, wire_type, v in fields(raw):
        if number == 1:
            expect(number, wire_type, LEN, "ListValue.values")
            items.append(decode_value(v, depth))
    return items


def decode_struct(raw: bytes | bytearray | memoryview, depth: int = 0) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise WireError(f"Struct nested deeper than {MAX_DEPTH}")
    out: dict[str, Any] = {}
    for number, wire_type, v in fields(raw):
        if number == 1:
            expect(number, wire_type, LEN, "Struct.fields")
            name, value = map_entry(v, "Struct.fields")
            out[name] = None if value is None else decode_value(value, depth)
    return out


def encode_any(type_url: str, value: bytes) -> bytes:
    return field_str(1, type_url) + field_bytes(2, value)


def decode_any(raw: bytes) -> tuple[str, bytes]:
    type_url, value = "", b""
    for number, wire_type, v in fields(raw):
        if number == 1:
            expect(number, wire_type, LEN, "Any.type_url")
            type_url = text(v, "Any.type_url")
        elif number == 2:
            expect(number, wire_type, LEN, "Any.value")
            value = v
    return type_url, value
