"""Helpers shared by the benchmarks (imported as `_common`: a script's own folder is on sys.path).

- `cpu_s(pid)`: user + system CPU seconds of a process, from /proc (Linux).
- `say(proc, line)` / `hear(proc)`: a line to a child process, the next JSON line from it.
- `serve_json_lines(ready, report)` / `JsonChild`: the two ends of a benchmark's server child
  process. The child prints one JSON line `ready` (its port, ...), then answers each line it reads
  on stdin with one JSON `report()` line, until "quit" or EOF; the parent reads and asks.
- UDP receiver benches (slowsignal.py, trigger.py): `serve` (the bare counter and the daqd
  child), `SubCounter`, `trial`, `Ramp` and `compare_udp` (both ramps and the summary).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by process `pid` (None: this process)."""
    stat = f"/proc/{'self' if pid is None else pid}/stat"
    with open(stat) as f:
        fields = f.read().rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def say(proc: subprocess.Popen[str], line: str) -> None:
    """Parent side of a child that reads lines: send it one."""
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def hear(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Parent side of a child that prints JSON lines: the next one."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args!r} ended without output")
    result: dict[str, Any] = json.loads(line)
    return result


async def serve_json_lines(ready: dict[str, Any], report: Callable[[], dict[str, Any]]) -> None:
    """Child side: print `ready`, then one `report()` per stdin line until 'quit' or EOF."""
    print(json.dumps(ready), flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line or line.strip() == "quit":
            return
        print(json.dumps(report()), flush=True)


class JsonChild:
    """Parent side: `python SCRIPT ARGS...` as a child speaking `serve_json_lines`."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._line()

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args!r} exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def report(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the child to quit; kill it if it has not within `timeout_s`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----- UDP receiver benches: daqd's receiver against a bare uvloop counter ------------------------
# Used by slowsignal.py and trigger.py: two child processes (the bare counter and daqd with the
# receiver under test publishing to a zmq PUB), a sender process per trial, a SUB here counting
# the records daqd publishes, and rising rates until a trial loses something.


async def serve_bare_udp(rcvbuf: int) -> None:
    """Child: a bare uvloop UDP counter; reports `received`, `cpu_s`, `kernel_drops`."""
    import socket

    from daqd.sockets import kernel_udp_drops

    class Counter(asyncio.DatagramProtocol):
        n = 0

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.n += 1

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    proto = Counter()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: proto, sock=sock
    )

    def report() -> dict[str, Any]:
        return {"received": proto.n, "cpu_s": cpu_s(), "kernel_drops": kernel_udp_drops(sock)}

    await serve_json_lines({"port": sock.getsockname()[1]}, report)
    transport.close()


async def serve_daqd(config: str, report: Callable[[Any], dict[str, Any]]) -> None:
    """Child: daqd with receiver "rx" publishing to the zmq publisher "live". Reports
    `report(receiver)` (which gives `received` and `faults`, anything that makes a trial lossy)
    with `cpu_s`, `kernel_drops`, `records` and `publisher_drops`."""
    import logging

    from daqd.config import parse_config
    from daqd.host import Host

    logging.basicConfig(level=logging.WARNING)
    host = Host(parse_config(config, path="<bench>"))
    await host.start()
    rec: Any = host.receivers["rx"]
    pub = host.publishers["live"]

    def full_report() -> dict[str, Any]:
        rec.sample()
        return {
            **report(rec),
            "cpu_s": cpu_s(),
            "kernel_drops": rec.counters.drops.get("kernel", 0),
            "records": rec.counters.records,
            "publisher_drops": sum(pub.counters.drops.values()),
        }

    port = int(rec.addresses["listen"].rsplit(":", 1)[1])
    await serve_json_lines({"port": port, "endpoint": pub.addresses["endpoint"]}, full_report)
    await host.stop()


def serve(config: str, report: Callable[[Any], dict[str, Any]], rcvbuf: int) -> None:
    """Run the child named by argv[2] ("bare" or "daqd") on uvloop."""
    import uvloop

    uvloop.run(serve_bare_udp(rcvbuf) if sys.argv[2] == "bare" else serve_daqd(config, report))


class SubCounter(threading.Thread):
    """A ZMQ SUB counting the records daqd publishes."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.n = 0
        self.running = True

    def run(self) -> None:
        # it shares the two cores with daqd and the sender: after each poll, take every message
        # already queued without polling again, copied (cheaper than tracking zmq Frames below
        # ~64 KiB): ~6 us of CPU per 3-frame message instead of ~11 us with a poll and Frames
        # for each, CPU that daqd's side of the comparison paid and the bare side did not
        import zmq

        recv, again = self.sock.recv_multipart, zmq.Again
        while self.running:
            if self.sock.poll(100):
                while True:
                    try:
                        recv(zmq.NOBLOCK)
                    except again:
                        break
                    self.n += 1

    def close(self) -> None:
        self.running = False
        self.join()
        self.sock.close(0)
        self.ctx.term()


def trial(
    child: JsonChild,
    rate: int,
    sender: list[str],
    sub: SubCounter | None,
    records: Callable[[int], int],
) -> dict[str, Any]:
    """Run the sender (it prints {"sent", "elapsed_s"}), then wait until the child received all
    and (daqd) `records(sent)` records reached the SUB, or nothing moved for 1 s. Lossless: every
    datagram received, no kernel drop, and (daqd) every record published and delivered with no
    publisher drop and no new fault."""
    before = child.report()
    sub_before = sub.n if sub else 0
    out = subprocess.run(sender, capture_output=True, text=True, check=True)
    sent = json.loads(out.stdout)
    expected = records(sent["sent"])
    deadline = time.monotonic() + 10.0
    last, still_since = -1, time.monotonic()
    while True:
        after = child.report()
        got = after["received"] - before["received"]
        done = got >= sent["sent"] and (sub is None or sub.n - sub_before >= expected)
        progress = got + (sub.n if sub else 0)
        now = time.monotonic()
        if progress != last:
            last, still_since = progress, now
        if done or now > deadline or now - still_since > 1.0:
            break
        time.sleep(0.05)
    kernel = (after["kernel_drops"] or 0) - (before["kernel_drops"] or 0)
    lossless = got == sent["sent"] and kernel == 0
    result = {
        "rate": rate,
        "achieved": sent["sent"] / sent["elapsed_s"],
        "sent": sent["sent"],
        "received": got,
        "kernel_drops": kernel,
        "cpu_us": (after["cpu_s"] - before["cpu_s"]) / max(got, 1) * 1e6,
    }
    if sub is not None:
        published = after["records"] - before["records"]
        delivered = sub.n - sub_before
        result.update(published=published, delivered=delivered, expected=expected)
        lossless = lossless and published == expected == delivered
        lossless = lossless and after["publisher_drops"] == before["publisher_drops"]
        lossless = lossless and after["faults"] == before["faults"]
    result["lossless"] = lossless
    return result


class Ramp:
    """One receiver's way up the rates: the best lossless trial, and why it stopped.
    `run(rate)` is one trial; `unit` names what is counted (datagram, packet)."""

    def __init__(self, name: str, run: Callable[[int], dict[str, Any]], unit: str) -> None:
        self.name, self.run, self.unit = name, run, unit
        self.best: dict[str, Any] | None = None
        self.capped = False  # the sender could not go faster: the real limit is higher
        self.done = False
        self.short = 0
        self.lossy: int | None = None  # the lowest rate asked that lost something

    def step(self, rate: int) -> None:
        r = self.trial(rate)
        if not r["lossless"]:
            self.done = True
            return
        # the sender fell short of the rate asked twice running: it is the limit, not the receiver
        self.short = self.short + 1 if r["achieved"] < 0.9 * rate else 0
        if self.short >= 2:
            self.capped = self.done = True

    def refine(self) -> None:
        """Halve the gap between the best lossless rate and the first lossy one (the ladder's
        steps are 10-25 % apart), unless the sender was the limit or the gap is under 3 %."""
        if self.capped or self.best is None or self.lossy is None:
            return
        low, high = self.best["rate"], self.lossy
        if high - low > 0.03 * high:
            self.trial(int(round((low + high) / 2, -2)))

    def trial(self, rate: int) -> dict[str, Any]:
        r = self.run(rate)
        if not r["lossless"]:  # one retry: the box is shared, a single hiccup is not a limit
            self.show(r, " (retrying)")
            r = self.run(rate)
        self.show(r, "")
        if not r["lossless"]:
            self.lossy = rate if self.lossy is None else min(self.lossy, rate)
        elif self.best is None or r["achieved"] > self.best["achieved"]:
            self.best = r
        return r

    def show(self, r: dict[str, Any], note: str) -> None:
        extra = f", records at the SUB {r['delivered']}/{r['expected']}" if "expected" in r else ""
        print(
            f"  {self.name:4} {r['rate']:6d}/s (sent at {r['achieved']:6.0f}/s): received "
            f"{r['received']}/{r['sent']}, kernel drops {r['kernel_drops']}{extra}, "
            f"{r['cpu_us']:5.1f} us CPU/{self.unit} -> {'lossless' if r['lossless'] else 'LOSS'}"
            f"{note}",
            flush=True,
        )

    def summary(self) -> str:
        if self.best is None:
            return "none lossless"
        b = self.best
        return (
            f"{'>=' if self.capped else ''}{b['achieved']:.0f}/s lossless, "
            f"{b['cpu_us']:.1f} us CPU/{self.unit} at that rate"
        )


def compare_udp(
    script: str,
    rates: list[int],
    duration_s: float,
    run: Callable[[JsonChild, int, float, SubCounter | None], dict[str, Any]],
    unit: str,
    label: str,
    what: str,
    *child_args: str,
) -> None:
    """Start the bare and the daqd child of `script`, warm the SUB up, ramp both through `rates`
    (interleaved, so both see the same load) with `run(child, rate, duration_s, sub)`, narrow
    each side's limit down by halving twice the gap between its best lossless rate and its first
    lossy one, and print the best lossless rate of each, their ratio (goal >= 0.5) and CPU per
    `unit`."""
    t0 = time.monotonic()
    bare = JsonChild(script, "--serve", "bare", *child_args)
    daqd = JsonChild(script, "--serve", "daqd", *child_args)
    sub = SubCounter(daqd.ready["endpoint"])
    sub.start()
    try:
        # a PUB drops what it sends before a subscription arrives: warm up until the SUB hears
        for _ in range(50):
            run(daqd, 2000, 0.05, None)
            if sub.n:
                break
        time.sleep(0.5)  # let the warm-up's records land before the first counted trial
        ramps = [
            Ramp("bare", lambda rate: run(bare, rate, duration_s, None), unit),
            Ramp("daqd", lambda rate: run(daqd, rate, duration_s, sub), unit),
        ]
        for rate in rates:
            for ramp in ramps:
                if not ramp.done:
                    ramp.step(rate)
            if all(r.done for r in ramps):
                break
        for _ in range(2):  # then two halvings of the gap to the first loss, in turns again
            for ramp in ramps:
                ramp.refine()
    finally:
        sub.close()
        daqd.close()
        bare.close()
    b, d = ramps
    print(f"bare uvloop counter: {b.summary()}")
    print(f"daqd {label:14}: {d.summary()} ({what})")
    if b.best and d.best:
        ratio = d.best["achieved"] / b.best["achieved"]
        note = ""
        if b.capped and not d.capped:
            note = " (the sender limited bare: its real limit is higher, the ratio at most this)"
        elif d.capped:
            note = " (the sender limited daqd too: both limits are higher)"
        print(f"ratio daqd/bare    : {ratio:.2f}{note}  (goal >= 0.5)")
        cpu = d.best["cpu_us"] / b.best["cpu_us"] if b.best["cpu_us"] else float("nan")
        print(
            f"CPU per {unit:11}: daqd {d.best['cpu_us']:.1f} us, bare {b.best['cpu_us']:.1f} us "
            f"({cpu:.1f}x)"
        )
    print(f"({time.monotonic() - t0:.0f} s)")
