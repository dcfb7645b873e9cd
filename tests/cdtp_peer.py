"""Drives the real constellationdaq (1.0.2) CDTP classes for daqd's interop tests and benchmark.

Runs inside the peer venv (.venv-peers/constellation), never imports daqd. Usage:
    python cdtp_peer.py send     < JSON settings   (a DataTransmitter bound on 127.0.0.1)
    python cdtp_peer.py receive  < JSON settings   (a DataReceiver connected to a port)
    python cdtp_peer.py bench    < JSON settings   (transmitter -> receiver in this process)
It prints one JSON object per line on stdout: first {"endpoint": ...} or {"ready": true}, and at
the end a summary of everything it sent or received, which the tests compare with their side.
Block j of record k is `k (8 bytes) j (4 bytes) fill...`, the same in tests/test_cdtp_interop.py.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import struct
import sys
import threading
import time
import zlib
from typing import Any

import zmq
from constellation.core.cdtp import DataReceiver, DataTransmitter, RecvTimeoutError
from constellation.core.chirp import CHIRPServiceIdentifier, get_uuid
from constellation.core.chirpmanager import DiscoveredService
from constellation.core.logging import ConstellationLogger


def block(k: int, j: int, size: int) -> bytes:
    head = struct.pack(">QI", k, j)
    if size <= len(head):
        return head[:size]
    return head + bytes([(k + j) % 251]) * (size - len(head))


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def logger(name: str) -> ConstellationLogger:
    logging.setLoggerClass(ConstellationLogger)
    log = logging.getLogger(name)
    log.setLevel(logging.WARNING)  # a real satellite logs every DATA message at TRACE
    return log  # type: ignore[return-value]


def send(cfg: dict[str, Any]) -> None:
    """BOR, records 1..count (minus `skip`), EOR; or vanish after `vanish_after` records."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    out({"endpoint": f"tcp://127.0.0.1:{port}"})
    failures: list[str] = []
    tx = DataTransmitter(cfg["name"], sock, logger("peer.tx"), failures.append)
    tx.bor_timeout = tx.data_timeout = tx.eor_timeout = int(cfg.get("timeout", 20))
    tx.payload_threshold = int(cfg.get("payload_threshold", 128))
    sizes = cfg.get("sizes", [1024])
    skip = set(cfg.get("skip", []))
    vanish_after = cfg.get("vanish_after")
    if cfg.get("wait"):
        sys.stdin.readline()  # the test says when the run starts
    start = dt.datetime.now(dt.UTC)
    tx.send_bor(cfg.get("bor_tags", {}), cfg.get("config", {"sizes": sizes}))
    tx.start_sending()
    sent = []
    for k in range(1, int(cfg["count"]) + 1):
        record = tx.new_data_record({"k": k, "name": f"r{k}"} if cfg.get("tags", True) else None)
        if k in skip:
            continue  # the sequence number is used up: a gap the receiver must notice
        for j, size in enumerate(sizes):
            record.add_block(block(k, j, size))
        while not tx.can_send_record():
            time.sleep(0.001)
        tx.send_data_record(record)
        sent.append(k)
        if vanish_after is not None and len(sent) >= vanish_after:
            tx.stop_sending()  # what was queued leaves, then the process goes without an EOR
            sock.close(linger=5000)
            context.term()
            out({"vanished": True, "sent": sent})
            os._exit(0)
    tx.stop_sending()
    tx.check_exception()
    condition_code = int(cfg.get("condition_code", 0))
    metadata = {
        "run_id": cfg.get("run_id", "peer"),
        "time_start": start,
        "time_end": dt.datetime.now(dt.UTC),
        "condition_code": condition_code,
        "condition": cfg.get("condition", "GOOD"),
        "data_records": tx.sequence_number,
    }
    tx.send_eor(cfg.get("eor_tags", {}), metadata)
    sock.close(linger=5000)
    context.term()
    out({"sent": sent, "last_seq": tx.sequence_number, "failures": failures})


def receive(cfg: dict[str, Any]) -> None:
    """Pull from our transmitter until its EOR arrives, or until told "stop" on stdin."""
    context = zmq.Context()
    result: dict[str, Any] = {"records": []}
    done = threading.Event()
    with_data = cfg.get("with_data", False)

    def on_bor(sender: str, user_tags: dict[str, Any], config: dict[str, Any]) -> None:
        result["bor"] = {"sender": sender, "user_tags": user_tags, "config": config}

    def on_data(sender: str, record: Any) -> None:
        blocks = [[len(b), zlib.crc32(b)] for b in record.blocks]
        entry = [sender, record.sequence_number, record.tags, blocks]
        if with_data:
            entry.append([b.hex() for b in record.blocks])
        result["records"].append(entry)

    def on_eor(sender: str, user_tags: dict[str, Any], metadata: dict[str, Any]) -> None:
        result["eor"] = {"sender": sender, "user_tags": user_tags, "metadata": metadata}
        done.set()

    rx = DataReceiver(context, logger("peer.rx"), on_bor, on_data, on_eor, None)
    rx.eor_timeout = int(cfg.get("eor_timeout", 2))
    rx.start_receiving()
    rx.add_sender(
        DiscoveredService(
            get_uuid(cfg.get("sender", "daqd.tx")),
            CHIRPServiceIdentifier.DATA,
            "127.0.0.1",
            int(cfg["port"]),
        )
    )
    out({"ready": True})

    def wait_stop() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                done.set()
                return

    threading.Thread(target=wait_stop, daemon=True).start()
    while not done.wait(0.05):
        try:
            rx.check_exception()
        except Exception as exc:  # its pull thread died: report what it said
            result["error"] = f"{type(exc).__name__}: {exc}"
            break
    try:
        rx.stop_receiving()
        rx.check_exception()
    except RecvTimeoutError as exc:
        result["timeout"] = str(exc)
    except Exception as exc:
        result.setdefault("error", f"{type(exc).__name__}: {exc}")
    out(result)
    context.term()


def bench(cfg: dict[str, Any]) -> None:
    """Constellation -> Constellation on loopback: records/s from BOR to the last record."""
    context = zmq.Context()
    got = {"n": 0, "bytes": 0}
    last = threading.Event()
    count = int(cfg["count"])

    def on_data(sender: str, record: Any) -> None:
        got["n"] += 1
        got["bytes"] += len(record.blocks[0])
        if got["n"] == count:
            last.set()

    rx = DataReceiver(context, logger("peer.rx"), lambda *a: None, on_data, lambda *a: None, None)
    rx.start_receiving()
    sock = context.socket(zmq.PUSH)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    rx.add_sender(
        DiscoveredService(get_uuid("Bench.tx"), CHIRPServiceIdentifier.DATA, "127.0.0.1", port)
    )
    tx = DataTransmitter("Bench.tx", sock, logger("peer.tx"), lambda why: None)
    tx.bor_timeout = tx.data_timeout = tx.eor_timeout = 30
    payload = bytes(int(cfg["size"]))
    tx.send_bor({}, {})
    tx.start_sending()
    t0 = time.perf_counter()
    for _ in range(count):
        record = tx.new_data_record()
        record.add_block(payload)
        while not tx.can_send_record():
            time.sleep(0.001)
        tx.send_data_record(record)
    last.wait(120)
    elapsed = time.perf_counter() - t0
    tx.stop_sending()
    tx.send_eor({}, {"condition_code": 0, "condition": "GOOD", "data_records": count})
    rx.stop_receiving()
    sock.close(linger=0)
    context.term()
    out({"records": got["n"], "bytes": got["bytes"], "seconds": elapsed})


if __name__ == "__main__":
    mode = sys.argv[1]
    settings = json.loads(sys.stdin.readline())
    {"send": send, "receive": receive, "bench": bench}[mode](settings)
