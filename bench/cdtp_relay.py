"""Benchmark: CPU per record of daqd relaying CDTP (cdtp receiver -> cdtp publisher), against a
bare pyzmq forwarder measured in the same run.

A sender process sends one CDTP run as a Constellation transmitter does (DATA messages of 128 plain
1 KiB records, the 128 KiB payload threshold of constellationdaq's Python transmitter), paced at
`--rate` records/s; a sink process takes what the relay sends on. The relay runs in this process
and its CPU (every thread: the event loop and ZeroMQ's I/O thread) is counted from the BOR to the
last record handed on, alternating:
  * bare      - a PULL -> PUSH loop forwarding each frame as it is (the floor: ZeroMQ and TCP);
  * daqd      - a Host: `cdtp` receiver (`seq_tag = ""`: records as they came) -> `cdtp` publisher;
  * daqd+tag  - the same with the receiver's default `seq_tag` (the CDTP seq as a tag on every
                record, so the publisher encodes tags).
CPU us per record are given, and the ratio of each to the bare forwarder's (lower is cheaper).

    .venv/bin/python bench/cdtp_relay.py [--rate 55000] [--records 275000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_s, hear, say  # noqa: E402

SENDER = "Bench.tx"
BLOCK = 1024
PER_MESSAGE = 128  # 128 KiB of 1 KiB records: what constellationdaq's transmitter batches

RELAY_CONFIG = """
[daemon]
name = "bench-cdtp-relay"
[[receiver]]
type = "cdtp"
name = "in"
senders = ["{endpoint}"]
{seq_tag}
publish_to = ["out"]
[[publisher]]
type = "cdtp"
name = "out"
endpoint = "tcp://127.0.0.1:0"
"""


def spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


# ----- the sender and the sink (child processes) ----------------------------------------------
def sender(records: int, rate: float) -> None:
    """BOR, `records` plain records in messages of PER_MESSAGE at `rate`/s, EOR."""
    import zmq

    from daqd.protocols import cdtp

    encoder = cdtp.Encoder(SENDER)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30_000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"endpoint": f"tcp://127.0.0.1:{port}"}), flush=True)
    sys.stdin.readline()
    sock.send(encoder.encode(cdtp.BeginOfRun(SENDER, {}, {}))[0])
    block = bytes(range(256)) * (BLOCK // 256)
    start = time.monotonic()
    k = 1
    while k <= records:
        n = min(PER_MESSAGE, records - k + 1, cdtp.seq_width_end(k) - k + 1)
        header = encoder.header_bytes(cdtp.MessageType.DATA, n)
        frame = cdtp.plain_records(k, [block] * n, BLOCK, len(header))
        frame[: len(header)] = header
        sock.send(frame)
        k += n
        delay = start + (k - 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    metadata = {"condition_code": 0, "data_records": records}
    sock.send(encoder.encode(cdtp.EndOfRun(SENDER, {}, metadata))[0])
    sock.close()
    ctx.term()


def sink(endpoint: str) -> None:
    """Take messages until an EOR; print how many records the DATA messages held."""
    import zmq

    from daqd.protocols import cdtp

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(endpoint)
    print(json.dumps({"ready": True}), flush=True)
    records = 0
    while True:  # as a table where it can: the sink's CPU is kept small, beside the relay's
        message = cdtp.decode_frame_plain(sock.recv(copy=False).buffer)
        if isinstance(message, cdtp.PlainData):
            records += len(message.seqs)
        elif isinstance(message, cdtp.Data):
            records += len(message.records)
        elif isinstance(message, cdtp.EndOfRun):
            break
    print(json.dumps({"records": records}), flush=True)


# ----- the relays (this process) --------------------------------------------------------------
def bare_trial(records: int, rate: float) -> float:
    """CPU seconds of a PULL -> PUSH loop forwarding every frame."""
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    out = spawn("_sink", f"tcp://127.0.0.1:{port}")
    hear(out)
    tx = spawn("_sender", str(records), str(rate))
    pull = ctx.socket(zmq.PULL)
    pull.connect(hear(tx)["endpoint"])
    say(tx, "go")
    push.send(pull.recv(copy=False), copy=False)  # the BOR
    cpu = cpu_s()
    frames = (records + PER_MESSAGE - 1) // PER_MESSAGE + 1  # every DATA message, the EOR
    for _ in range(frames):
        push.send(pull.recv(copy=False), copy=False)
    cpu = cpu_s() - cpu
    got = hear(out)["records"]
    tx.wait()
    out.wait()
    pull.close()
    push.close(linger=-1)
    ctx.term()
    if got != records:
        raise RuntimeError(f"the bare forwarder passed on {got} of {records} records")
    return cpu


def daqd_trial(records: int, rate: float, seq_tag: bool) -> float:
    """CPU seconds of a Host relaying, from the BOR to the EOR handed on."""
    import uvloop
    from daqd.receivers.cdtp import CdtpReceiver, SenderState

    from daqd.config import parse_config
    from daqd.daemon import tune_for_throughput
    from daqd.host import Host

    tx = spawn("_sender", str(records), str(rate))
    endpoint = hear(tx)["endpoint"]

    async def main() -> float:
        config = RELAY_CONFIG.format(endpoint=endpoint, seq_tag="" if seq_tag else 'seq_tag = ""')
        host = Host(parse_config(config, "<bench>"))
        await host.start()
        tune_for_throughput()
        rx = host.receivers["in"]
        assert isinstance(rx, CdtpReceiver)
        out = spawn("_sink", host.publishers["out"].addresses["endpoint"])
        await asyncio.to_thread(hear, out)
        await host.begin_run("relay")
        say(tx, "go")
        while SENDER not in rx.senders:
            await asyncio.sleep(0.001)
        cpu = cpu_s()
        while rx.senders[SENDER].state is not SenderState.EOR_RECEIVED:
            await asyncio.sleep(0.01)
        run = await host.end_run()
        cpu = cpu_s() - cpu
        await host.stop()
        got = (await asyncio.to_thread(hear, out))["records"]
        out.wait()
        delivered = run.accounting["publishers"]["out"]["delivered"]
        if got != records or delivered != records or run.condition:
            raise RuntimeError(f"daqd passed on {got} of {records} records: {run.metadata()}")
        return cpu

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        cpu: float = runner.run(main())
    tx.wait()
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=55_000.0, help="records/s sent")
    parser.add_argument("--records", type=int, default=275_000, help="records per trial")
    parser.add_argument("--rounds", type=int, default=3, help="trials of each relay, alternating")
    args = parser.parse_args()
    started = time.monotonic()
    kinds = ["bare", "daqd", "daqd+tag"]
    us: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):  # alternate, so that load changes hit every relay alike
        for kind in kinds:
            # each trial in a fresh process, as a daemon would run it
            child = spawn("_trial", kind, str(args.records), str(args.rate))
            us[kind].append(hear(child)["cpu_s"] / args.records * 1e6)
            child.wait()
    print(f"{'relay':<9} {'CPU us/record (each round)':<30} {'median':>7} {'x bare':>7}")
    base = statistics.median(us["bare"])
    for kind in kinds:
        each = " ".join(f"{v:.2f}" for v in us[kind])
        paired = statistics.median(v / b for v, b in zip(us[kind], us["bare"], strict=True))
        print(f"{kind:<9} {each:<30} {statistics.median(us[kind]):>7.2f} {paired:>7.2f}")
    load = os.getloadavg()[0]
    print(
        f"{args.records} records of {BLOCK} B per trial at {args.rate:.0f}/s in messages of"
        f" {PER_MESSAGE}; bare median {base:.2f} us; 'x bare' is the median of each round's ratio;"
        f" load average {load:.1f} on {os.cpu_count()} cpus; wall time"
        f" {time.monotonic() - started:.1f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_sender":
        sender(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_sink":
        sink(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_trial":
        kind, n, rate = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        cpu = bare_trial(n, rate) if kind == "bare" else daqd_trial(n, rate, kind == "daqd+tag")
        print(json.dumps({"cpu_s": cpu}), flush=True)
    else:
        main()
