"""The CHEC-S focal plane for the camera picture, and slow-signal readouts decoded to mV.

Facts (docs/protocols/slowsignal.md, ssdaq-streams.md): 32 TARGET modules x 64 pixels; a readout
record's payload is 32x64 counts (`<u2`, mV = counts x 0.0763), mV (`<f4`, NaN = missing) or SSDAQ's
frame (`format = "ssdaq"`); `modules_present` is the bitmask of modules in it. Within a module the
64 slow-signal channels sit on an 8x8 grid by SSDAQ's `ssl2colrow` mapping (grid position j shows
channel ssl2colrow[j]; j = row * 8 + column). The modules tile the focal plane as CHEC-S's 6x6
grid without its four corners. Which module sits where is not in those facts: by default they are
numbered row by row (module 0 at the top left), and `[daemon] http_camera_modules` gives a camera's
real placement.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from daqd.protocols.slowsignal import MV_PER_COUNT, N_MODULES, N_PIXELS, decode_ssdaq_frame

# SSDAQ's ssl2colrow: grid position j (row-major 8x8) -> slow-signal channel
SSL2COLROW = (
    8, 1, 5, 6, 41, 43, 51, 47, 11, 14, 13, 7, 44, 36, 42, 46,
    12, 2, 4, 15, 38, 37, 33, 45, 10, 16, 9, 19, 40, 39, 34, 48,
    26, 28, 20, 31, 56, 54, 35, 63, 17, 3, 18, 25, 62, 53, 32, 61,
    27, 30, 21, 22, 58, 52, 59, 55, 24, 0, 29, 23, 49, 57, 50, 60,
)  # fmt: skip
GRID = 6  # modules per side of the focal plane, corners empty
MODULE_SIDE = 8  # pixels per side of a module


def module_positions() -> list[tuple[int, int]]:
    """(row, column) of each module 0..31 on the 6x6 grid, corners left out."""
    corners = {(0, 0), (0, GRID - 1), (GRID - 1, 0), (GRID - 1, GRID - 1)}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in corners]


def channel_positions() -> list[tuple[int, int]]:
    """(row, column) within its module of each slow-signal channel 0..63."""
    where = [(0, 0)] * N_PIXELS
    for j, channel in enumerate(SSL2COLROW):
        where[channel] = divmod(j, MODULE_SIDE)
    return where


def geometry(modules: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """What the page draws with: module positions (`[daemon] http_camera_modules`, or the
    default grid) and channel positions."""
    return {
        "grid": GRID,
        "module_side": MODULE_SIDE,
        "modules": [list(p) for p in (modules or module_positions())],
        "channels": [list(p) for p in channel_positions()],
    }


def readout_mv(tags: dict[str, Any], payload: bytes) -> tuple[np.ndarray, int] | None:
    """(32x64 float mV with NaN for missing modules, module mask), or None if not a readout."""
    mask = tags.get("modules_present")
    if not isinstance(mask, int):
        return None
    if tags.get("format") == "ssdaq":
        try:
            frame = decode_ssdaq_frame(payload)
        except Exception:
            return None
        mv = np.array(frame.mv, dtype=np.float64).reshape(N_MODULES, N_PIXELS)
    else:
        dtype = tags.get("dtype")
        if dtype not in ("<u2", "<f4") or len(payload) != N_MODULES * N_PIXELS * (
            2 if dtype == "<u2" else 4
        ):
            return None
        values = np.frombuffer(payload, dtype=dtype).reshape(N_MODULES, N_PIXELS)
        mv = values * MV_PER_COUNT if dtype == "<u2" else values.astype(np.float64)
    present = np.array([(mask >> m) & 1 for m in range(N_MODULES)], dtype=bool)
    mv = mv.copy()
    mv[~present] = np.nan
    return mv, mask


def readout_json(tags: dict[str, Any], payload: bytes) -> dict[str, Any] | None:
    """A readout for the page: mV rounded to 0.01, null for a missing module."""
    decoded = readout_mv(tags, payload)
    if decoded is None:
        return None
    mv, mask = decoded
    present = ~np.isnan(mv)
    values: list[list[float | None]] = []
    for m in range(N_MODULES):
        if present[m].any():
            values.append([None if math.isnan(v) else round(v, 2) for v in mv[m].tolist()])
        else:
            values.append([])
    shown = mv[present]
    return {
        "readout": tags.get("readout"),
        "tack": tags.get("tack"),
        "complete": bool(tags.get("complete", False)),
        "modules_present": mask,
        "min_mv": round(float(shown.min()), 2) if shown.size else None,
        "max_mv": round(float(shown.max()), 2) if shown.size else None,
        "mv": values,
    }
