"""A monitoring sender: chec.MonitorData over a ZeroMQ PUSH, as SSDAQ's ReceiverMonSender.

Every `--interval` seconds it sends one MonitorData for the receiver `--name`: time now (UTC sec,
nsec), this process's pid, `recv_data` true when `--rate-hz` is above 0, and `data_rate` =
`--rate-hz`. SSDAQ's receivers PUSH-connect to its MonitorReceiver (tcp://127.0.0.101:10002); a
daqd `monitor` receiver binds the same.
"""

from __future__ import annotations

import os
import sys
import time

import click
import zmq

from daqd.protocols.ssdaq_pb import MonitorData, ReceiverRate, encode_monitor_data


def message(name: str, rate_hz: float) -> bytes:
    sec, nsec = divmod(time.time_ns(), 10**9)
    rate = ReceiverRate(name=name, pid=os.getpid(), recv_data=rate_hz > 0, data_rate=rate_hz)
    return encode_monitor_data(MonitorData(sec=sec, nsec=nsec, receiver=rate))


@click.command("monitor")
@click.option(
    "--connect",
    default="tcp://127.0.0.1:10002",
    show_default=True,
    help="the monitor receiver's PULL endpoint",
)
@click.option("--name", default="ReadoutAssembler", show_default=True, help="receiver name")
@click.option("--rate-hz", type=float, default=160.0, show_default=True, help="data_rate sent")
@click.option("--interval", type=float, default=1.0, show_default=True, help="seconds apart")
@click.option("--count", type=click.IntRange(1), default=None, help="stop after N messages")
@click.option("--quiet", is_flag=True, help="no progress lines")
def command(
    connect: str, name: str, rate_hz: float, interval: float, count: int | None, quiet: bool
) -> None:
    """Send MonitorData like one of SSDAQ's receivers."""
    if interval <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)  # what is queued at the end still goes, for 5 s
    try:
        sock.connect(connect)
    except zmq.ZMQError as exc:
        ctx.destroy(linger=0)
        raise click.BadParameter(f"{connect}: {exc}", param_hint="--connect") from exc
    sent = 0
    try:
        while count is None or sent < count:
            if sent:
                time.sleep(interval)
            sock.send(message(name, rate_hz))
            sent += 1
            if not quiet:
                sys.stderr.write(f"sent {sent} MonitorData ({name}, {rate_hz:g}/s)\n")
    except KeyboardInterrupt:
        sys.stderr.write("\n")
    finally:
        sock.close()
        ctx.term()
