"""Receiver `saturnin` reading a Saturnin data pipe with FBDP: a `daqd serve` daemon starts
saturnin-core 0.10.0's real text reader service (in the peer venv, through daqd's launcher),
opens its pipe, and takes each DATA as a record; end to end, payloads checked against the file.
A toy service that speaks FBDP badly shows the protocol errors counted by reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daqd.runfile import read_items
from tests.conftest import Daemon, wait_until
from tests.peers import ROOT, peer_python

pytestmark = pytest.mark.interop

TEXT = "".join(f"ligne {i}: ünïcödé ✓\n" for i in range(300))  # multi-byte, 6000+ chars

CONFIG = """
[daemon]
name = "{name}"
drain_timeout_s = 5

[[receiver]]
type = "saturnin"
name = "reader"
python = "{python}"
service = "{service}"
service_config = "{service_config}"
section = "{section}"
env = {{ PYTHONPATH = "{root}" }}
fbdp = {{ pipe = "{pipe}", format = "text/plain;charset=utf-8", batch = 7 }}
start_timeout_s = 20
stop_timeout_s = 20
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{out}"
"""


@pytest.fixture(scope="module")
def peer() -> str:
    return str(peer_python("saturnin"))


def reader_config(
    peer: str, workdir: Path, text: str, max_chars: int, pipe: str = "words", **extra: str
) -> str:
    """A daqd config running saturnin's text reader on a file holding `text`."""
    (workdir / "words.txt").write_text(text, encoding="utf-8")
    options = {
        "pipe": "words",
        "pipe_address": "tcp://127.0.0.1:*",
        "pipe_mode": "bind",
        "pipe_format": "text/plain;charset=utf-8",
        "filename": str(workdir / "words.txt"),
        "max_chars": str(max_chars),
        **extra,
    }
    cfg = workdir / "reader.cfg"
    cfg.write_text("[reader]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()))
    return CONFIG.format(
        name="satp",
        python=peer,
        service="saturnin.text.reader",
        service_config=cfg,
        section="reader",
        root=ROOT,
        pipe=pipe,
        out=workdir / "out",
    )


def reader(d: Daemon) -> dict[str, Any]:
    got: dict[str, Any] = d.status()["receivers"]["reader"]
    return got


def records_on_disk(workdir: Path) -> list[Any]:
    return [
        item
        for path in sorted((workdir / "out").glob("*.daqd"))
        for item in read_items(path)
        if not isinstance(item, dict)
    ]


def test_the_text_reader_s_pipe_end_to_end(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """Every DATA is one record, in order, nothing lost: the payloads are the file. The service
    ends its work when the pipe is done (stop_on_close): FINISHED OK, no restart."""
    d = daemon(reader_config(peer, workdir, TEXT, max_chars=100), name="satp")
    r = wait_until(
        lambda: (s := reader(d))["service"]["outcome"] and not s["service"]["running"] and s,
        30,
        "the reader to finish its pipe",
    )
    chunks = -(-len(TEXT) // 100)
    assert r["pipe"] == {
        "pipe": "words",
        "format": "text/plain;charset=utf-8",
        "state": "closed",
        "code": "OK",
        "errors": [],
        "data": chunks,
    }
    assert r["service"]["outcome"] == "OK", d.log()
    assert (r["records"], r["bytes"], r["errors"]) == (chunks, len(TEXT.encode()), {})
    assert r["addresses"]["pipe"] == r["service"]["peer"]["endpoints"]["pipe"][0]
    assert d.stop() == 0
    records = records_on_disk(workdir)
    assert len(records) == chunks
    assert all(rec.tags == {"channel": "pipe"} for rec in records)
    assert b"".join(bytes(rec.payload[0]) for rec in records).decode() == TEXT
    assert [len(bytes(rec.payload[0]).decode()) for rec in records[:-1]] == [100] * (chunks - 1)


def test_landing_mid_pipe_closes_it_and_keeps_what_came(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """One character per DATA, 100,000 of them (the reader sends about 5,000 a second): landing
    CLOSEs the pipe, then STOP; every DATA that came is a record, and they are the file's start."""
    text = "".join(chr(ord("a") + i % 26) for i in range(100_000))
    d = daemon(reader_config(peer, workdir, text, max_chars=1), name="satp")
    wait_until(lambda: reader(d)["records"] >= 500, 30, "500 records")
    assert d.ctl("transition", "land").returncode == 0
    r = reader(d)
    assert r["service"]["outcome"] == "OK" and not r["service"]["running"], d.log()
    assert r["pipe"]["state"] == "closed by daqd"
    assert 500 <= r["records"] < len(text)
    assert (r["records"], r["errors"]) == (r["pipe"]["data"], {})
    assert d.stop() == 0
    records = records_on_disk(workdir)
    assert len(records) == r["records"]
    assert text.startswith(b"".join(bytes(rec.payload[0]) for rec in records).decode())


def test_a_pipe_the_service_refuses_is_counted_by_its_close_code(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    d = daemon(reader_config(peer, workdir, TEXT, max_chars=100, pipe="nosuch"), name="satp")
    r = wait_until(
        lambda: (s := reader(d))["errors"].get("fbdp_close_pipe_endpoint_unavailable") and s,
        30,
        "the service's CLOSE",
    )
    assert r["pipe"]["code"] == "PIPE_ENDPOINT_UNAVAILABLE"
    assert r["pipe"]["errors"] == ["Unknown data pipe 'nosuch'"]
    assert r["records"] == 0
    assert d.ctl("transition", "land").returncode == 0
    svc = reader(d)["service"]  # its FINISHED(ERROR) says why: a traceback, one line each
    assert svc["outcome"] == "ERROR" and not svc["running"]
    assert svc["details"][0] == "Traceback (most recent call last):"
    assert svc["details"][-1] == "saturnin.base.types.StopError: Unknown data pipe 'nosuch'"
    assert all("\n" not in line for line in svc["details"])


def test_bad_fbdp_from_a_service_is_counted_by_reason_and_the_pipe_goes_on(
    peer: str, daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """A toy service answers OPEN with garbage between valid messages: each fault is counted
    under its reason, the valid DATA are records, and CLOSE OK ends the pipe."""
    head = "46424450"  # b"FBDP"
    frames = [
        ["46425350" + "11000002"],  # b"FBSP": not FBDP
        [head + "11000002"],  # READY, batch 2
        [head + "21000000", b"a".hex()],
        [head + "21000000", b"b".hex()],
        [head + "21000000", b"c".hex()],  # a third DATA in a batch of 2: out of band
        [head + "210000"],  # a 7-byte control frame
        [head + "19010000"],  # NOOP asking for an ACK
        [head + "2900ffff"],  # CLOSE with an error code FBDP does not have
        [head + "29000000"],  # CLOSE OK
    ]
    (workdir / "toy.cfg").write_text(
        f"[toy]\nreport = {workdir / 'report.json'}\npipe_frames = {json.dumps(frames)}\n"
    )
    text = CONFIG.format(
        name="satg",
        python=peer,
        service="tests.saturnin_toy:SERVICE_DESCRIPTOR",
        service_config=workdir / "toy.cfg",
        section="toy",
        root=ROOT,
        pipe="words",
        out=workdir / "out",
    )
    d = daemon(text, name="satg")
    r = wait_until(
        lambda: (s := reader(d))["pipe"]["state"] == "closed" and s, 30, "the pipe to close"
    )
    assert r["errors"] == {
        "fbdp_bad_fourcc": 1,
        "fbdp_out_of_band_data": 1,
        "fbdp_bad_header": 1,
        "fbdp_bad_close": 1,
    }
    assert (r["records"], r["pipe"]["code"], r["pipe"]["data"]) == (3, "OK", 3)
    assert r["service"]["running"]  # the toy does not stop when its pipe closes
    assert d.ctl("transition", "land").returncode == 0
    assert reader(d)["service"]["outcome"] == "OK"
    assert d.stop() == 0
    assert [bytes(rec.payload[0]) for rec in records_on_disk(workdir)] == [b"a", b"b", b"c"]
