"""The link between a worker process and its parent: the worker's publisher name, the ICCP codec
both ends use, and the markers (end of a run, end of work) sent on the data socket."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from daqd.protocols import iccp

if TYPE_CHECKING:
    pass

LINK = "parent"  # the worker's one publisher: the PUSH to its parent
_codec = iccp.IccpCodec()


def _mark(kind: str, **fields: Any) -> list[bytes]:
    return [b"", msgpack.packb({"mark": kind, **fields}, use_bin_type=True)]


def _is_mark(frames: list[bytes], kind: str) -> bool:
    if frames[0] or len(frames) < 2:
        return False
    try:
        return bool(msgpack.unpackb(frames[1], raw=False).get("mark") == kind)
    except Exception:
        return False
