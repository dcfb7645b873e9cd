"""Loop-centring DHS operation: getLoopTip grabs a camera frame, asks an inference service for the
loop tip, and completes with `normal <x> <y>` (or `error <reason>`).

Settings come from the environment of `daqd serve`, read at each operation:

    LOOP_CAMERA          receiver to grab from (http_poll or http_image), default "camera"
    LOOP_INFERENCE_URL   where the image is POSTed, default http://127.0.0.1:8008/predict
    LOOP_GRAB_TIMEOUT_S  default 5;  LOOP_INFERENCE_TIMEOUT_S  default 10

The inference service gets `{"image": <base64>, "content_type", "source", "seq"}` and answers
`{"found": true, "x": <float>, "y": <float>}` or `{"found": false, "reason": "..."}`.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from daqd.dhs import Operation, operation
from daqd.http import HttpError, grab, image_bytes, post_json

MAX_REASON_CHARS = 150  # keeps the completion well inside one DCSS message


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _seconds(name: str, default: float) -> float:
    value = _setting(name, str(default))
    try:
        return float(value)
    except ValueError:
        raise HttpError(f"{name}={value!r} is not a number of seconds") from None


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
    camera = _setting("LOOP_CAMERA", "camera")
    url = _setting("LOOP_INFERENCE_URL", "http://127.0.0.1:8008/predict")
    try:
        grab_s = _seconds("LOOP_GRAB_TIMEOUT_S", 5.0)
        infer_s = _seconds("LOOP_INFERENCE_TIMEOUT_S", 10.0)
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
