"""A log sender: chec.LogData over TCP, in SSDAQ's unframed way or daqd's length framing.

Record i is fully determined by i (see `log_record`): severity cycles DEBUG, INFO, WARNING,
ERROR, FATAL; sender `sim.camera`; message `record i`. With `--framing ssdaq` each record is
written on its own with no prefix, as SSDAQ's ChecSocketLogHandler does (a logging SocketHandler:
one send per record, Nagle left on); with `--framing length` each has a 4-byte big-endian length.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import click

from daqd.hostport import parse_hostport
from daqd.protocols.logstream import frame
from daqd.protocols.ssdaq_pb import LogData, encode_log_data

LEVELS = (10, 20, 30, 40, 50)


def log_record(i: int, first_ns: int = 1_700_000_000 * 10**9) -> LogData:
    return LogData(
        system_type=0,
        severity=LEVELS[i % len(LEVELS)],
        sender="sim.camera",
        message=f"record {i}",
        time=first_ns + i * 1_000_000,
        pid=os.getpid(),
        source_file=__file__,
        line=i,
    )


def send(address: str, count: int, rate: float, framing: str, quiet: bool = True) -> int:
    """Send records 0..count-1 at `rate` per second; returns how many were written."""
    host, port = parse_hostport(address)
    first_ns = time.time_ns()
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as sock:
        for i in range(count):
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            body = encode_log_data(log_record(i, first_ns))
            sock.sendall(frame(body) if framing == "length" else body)
            if not quiet and (i + 1) % max(1, int(rate)) == 0:
                sys.stderr.write(f"sent {i + 1} LogData records\n")
    if not quiet:
        sys.stderr.write(f"sent {count} LogData records ({framing} framing) to {address}\n")
    return count


@click.command("log")
@click.option(
    "--connect", default="127.0.0.1:10001", show_default=True, help="the log receiver, host:port"
)
@click.option(
    "--framing",
    type=click.Choice(["length", "ssdaq"]),
    default="length",
    show_default=True,
    help="daqd's length prefix, or SSDAQ's bare LogData",
)
@click.option("--rate", type=float, default=10.0, show_default=True, help="records per second")
@click.option("--count", type=click.IntRange(1), default=10, show_default=True)
@click.option("--quiet", is_flag=True, help="no progress lines")
def command(connect: str, framing: str, rate: float, count: int, quiet: bool) -> None:
    """Send LogData records to a `log` receiver (or to SSDAQ's LogReceiver)."""
    if rate <= 0:
        raise click.BadParameter("must be positive", param_hint="--rate")
    try:
        send(connect, count, rate, framing, quiet)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--connect") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot send to {connect}: {exc}") from exc
    except KeyboardInterrupt:
        sys.stderr.write("\n")
