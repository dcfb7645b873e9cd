"""Drives the real constellationdaq (1.0.2) CDTP classes for daqd's interop tests and benchmark.

Runs inside the peer venv (.venv-peers/constellation), never imports daqd. Usage:
    python cdtp_peer.py send     < JSON settings   (a DataTransmitter bound on 127.0.0.1)
    python cdtp_peer.py receive  < JSON settings   (a DataReceiver connected to a port)
It prints one JSON object per line on stdout: first {"endpoint": ...} or {"ready": true}, and at
the end a summary of everything it sent or received, which the tests compare with their side.
For bench/cdtp.py: "send" with {"bench": true} sends one payload object without tags, and
"receive" with {"count_only": true} only counts and times records (first to last arrival).
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
    same = bytes(sizes[0]) if cfg.get("bench") else None  # one payload object, no tags
    skip = set(cfg.get("skip", []))
    vanish_after = cfg.get("vanish_after")
    if cfg.get("wait"):
        sys.stdin.readline()  # the test says when the run starts
    start = dt.datetime.now(dt.UTC)
    cpu = time.process_time()
    tx.send_bor(cfg.get("bor_tags", {}), cfg.get("config", {"sizes": sizes}))
    tx.start_sending()
    sent = []
    for k in range(1, int(cfg["count"]) + 1):
        record = tx.new_data_record({"k": k, "name": f"r{k}"} if same is None else None)
        if k in skip:
            continue  # the sequence number is used up: a gap the receiver must notice
        if same is not None:
            record.add_block(same)
        else:
            for j, size in enumerate(sizes):
                record.add_block(block(k, j, size))
        while not tx.can_send_record():
            time.sleep(0.001)
        tx.send_data_record(record)
        if same is None:
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
    cpu = time.process_time() - cpu
    out({"sent": sent, "last_seq": tx.sequence_number, "failures": failures, "cpu_s": cpu})


def receive(cfg: dict[str, Any]) -> None:
    """Pull from our transmitter until its EOR arrives, or until told "stop" on stdin."""
    context = zmq.Context()
    result: dict[str, Any] = {"records": []}
    done = threading.Event()
    count_only = cfg.get("count_only", False)
    times = {"first": 0.0, "last": 0.0, "n": 0, "bytes": 0, "cpu": 0.0}

    def on_bor(sender: str, user_tags: dict[str, Any], config: dict[str, Any]) -> None:
        result["bor"] = {"sender": sender, "user_tags": user_tags, "config": config}
        times["cpu"] = time.process_time()

    def on_data(sender: str, record: Any) -> None:
        if count_only:  # benchmark: count and time, as cheaply as possible
            now = time.perf_counter()
            if not times["n"]:
                times["first"] = now
            times["last"] = now
            times["n"] += 1
            times["bytes"] += len(record.blocks[0])
            return
        blocks = [[len(b), zlib.crc32(b)] for b in record.blocks]
        result["records"].append([sender, record.sequence_number, record.tags, blocks])

    def on_eor(sender: str, user_tags: dict[str, Any], metadata: dict[str, Any]) -> None:
        result["eor"] = {"sender": sender, "user_tags": user_tags, "metadata": metadata}
        times["cpu"] = time.process_time() - times["cpu"]  # all threads, BOR to EOR
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
    if count_only:
        result = {
            "records": times["n"],
            "bytes": times["bytes"],
            "seconds": times["last"] - times["first"],
            "cpu_s": times["cpu"],
            **{k: v for k, v in result.items() if k in ("error", "timeout")},
        }
    out(result)
    context.term()


if __name__ == "__main__":
    mode = sys.argv[1]
    settings = json.loads(sys.stdin.readline())
    {"send": send, "receive": receive}[mode](settings)
