"""Loop-centring DHS operation: getLoopTip grabs a camera frame, asks an inference service for the
loop tip, and completes with `normal <x> <y>` (or `error <reason>`).

Settings come from the dcss receiver's `[receiver.handler_settings]` table (`op.settings`):

    camera               receiver to grab from (http_poll or http_image); required
    inference_url        where the image is POSTed; required
    grab_timeout_s       default 5
    inference_timeout_s  default 10

A missing or bad setting fails the operation: `error {setting inference_url missing from
[receiver.handler_settings]}`.

The inference service gets `{"image": <base64>, "content_type", "source", "seq"}` and answers
`{"found": true, "x": <float>, "y": <float>}` or `{"found": false, "reason": "..."}`.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from daqd.dhs import Operation, operation
from daqd.http import HttpError, grab, image_bytes, post_json

MAX_REASON_CHARS = 150  # keeps the completion well inside one DCSS message


class SettingError(Exception):
    """A handler setting is missing or not what it should be."""


def _text(op: Operation, key: str) -> str:
    value = op.settings.get(key)
    if value is None:
        raise SettingError(f"setting {key} missing from [receiver.handler_settings]")
    if not isinstance(value, str) or not value:
        raise SettingError(f"setting {key} = {value!r} is not a non-empty string")
    return value


def _seconds(op: Operation, key: str, default: float) -> float:
    value = op.settings.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SettingError(f"setting {key} = {value!r} is not a positive number of seconds")
    return float(value)


def _fail(op: Operation, reason: str) -> None:
    op.complete("error", reason[:MAX_REASON_CHARS])


def tip_from(answer: Any) -> tuple[float, float] | str:
    """(x, y) from an inference answer, or the reason it found no tip. ValueError if malformed."""
    if not isinstance(answer, dict) or not isinstance(answer.get("found"), bool):
        raise ValueError(f"answer is not an object with a boolean 'found': {str(answer)[:60]}")
    if not answer["found"]:
        return str(answer.get("reason") or "no loop found")
    x, y = answer.get("x"), answer.get("y")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y)):
        raise ValueError("answer has found=true but no numeric x and y")
    return float(x), float(y)  # type: ignore[arg-type]


@operation("getLoopTip")
async def get_loop_tip(op: Operation) -> None:
    try:
        camera = _text(op, "camera")
        url = _text(op, "inference_url")
        grab_s = _seconds(op, "grab_timeout_s", 5.0)
        infer_s = _seconds(op, "inference_timeout_s", 10.0)
    except SettingError as exc:
        _fail(op, str(exc))
        return
    try:
        op.update("grabbing", camera)
        record = await grab(camera, timeout_s=grab_s)
        image = image_bytes(record)
        op.update("inferring", record.seq, len(image))
        answer = await post_json(
            url,
            {
                "image": base64.b64encode(image).decode("ascii"),
                "content_type": record.tags.get("content_type", ""),
                "source": record.source,
                "seq": record.seq,
            },
            timeout_s=infer_s,
        )
        tip = tip_from(answer)
    except (HttpError, ValueError) as exc:
        _fail(op, str(exc))
        return
    if isinstance(tip, str):
        _fail(op, f"no tip: {tip}")
        return
    op.complete("normal", *tip)
