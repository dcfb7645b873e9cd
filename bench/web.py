"""Web view benchmark: UDP ingest with the live page open and `/metrics` scraped every second,
against the same ingest without the web view, measured in the same run.

Two `daqd serve` daemons with the same `udp` receiver -> `zmq` publisher; one also has
`[daemon] http`, an open event stream (what the page holds: `/events`, the status once a second)
and a `/metrics` scrape every second. Trial by trial, in turns (so that the machine's other load
falls on both alike), a sender offers each daemon datagrams as fast as it can for a few seconds:
the CPU the daemon spent per record then is the inverse of its ingest capacity on a core of its
own (the kernel drops what it cannot take, counted as `kernel`); records/s taken is shown too, but
the machine's other load moves it more. The ratio with/without is the share of ingest capacity
the web view leaves (1.0 = it costs nothing; the issue asks >= 0.97). Each trial also shows the daemon's CPU per datagram (its
threads' run time over the trial, from /proc schedstat) at a paced rate, where the web view's fixed
cost per second is spread over fewer datagrams: a harsher figure, printed for information.

    .venv/bin/python bench/web.py [--seconds 3] [--trials 6] [--rate 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from ingest import batch_sender, threads_cpu_s

BIN = Path(sys.executable).parent

CONFIG = """
[daemon]
name = "{name}"
{http}
[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "ipc://{dir}/{name}.pub"
"""


def send(port: int, rate: int, seconds: float, size: int) -> int:
    """Offer `rate` datagrams/s (0: as fast as sendmmsg goes) for `seconds`; return how many
    were sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(("127.0.0.1", port))
    fn = batch_sender(sock, b"x" * size)
    sent = 0
    start = time.perf_counter()
    if rate == 0:
        while time.perf_counter() - start < seconds:
            sent += fn(32)
        sock.close()
        return sent
    count = int(rate * seconds)
    while sent < count:
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        if sent >= due:
            time.sleep(max(0.0, sent / rate - (time.perf_counter() - start)))
            continue
        while sent < due:
            sent += fn(min(32, due - sent))
    sock.close()
    return sent


def _sender(port: int, rate: int, seconds: float, size: int, out: Any) -> None:
    out.value = send(port, rate, seconds, size)


class Side:
    def __init__(self, workdir: Path, name: str, web: bool) -> None:
        self.name = name
        self.web = web
        http = 'http = "127.0.0.1:0"' if web else ""
        path = workdir / f"{name}.toml"
        path.write_text(CONFIG.format(name=name, http=http, dir=workdir))
        self.env = {**os.environ, "RUNTIME_DIRECTORY": str(workdir / "run")}
        self.log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(BIN / "daqd"), "serve", str(path)], env=self.env, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                st = self.status()
                if st["state"] == "ORBIT" and (not web or st.get("http")):
                    break
            except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"daqd {name} did not start; see {workdir}/{name}.log")
            time.sleep(0.2)
        self.port = int(st["receivers"]["raw"]["addresses"]["listen"].rsplit(":", 1)[1])
        self.url = st.get("http")
        self.stop_watching = threading.Event()
        self.scrapes = 0
        self.events = 0
        self.threads: list[threading.Thread] = []
        if web:
            self.threads = [
                threading.Thread(target=self._page, daemon=True),
                threading.Thread(target=self._scrape, daemon=True),
            ]
            for t in self.threads:
                t.start()

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [str(BIN / "daqctl"), "--name", self.name, "status", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def _page(self) -> None:
        """What an open page holds: the event stream (and it reads the snapshot once)."""
        urllib.request.urlopen(self.url + "api/status", timeout=10).read()
        with urllib.request.urlopen(self.url + "events", timeout=60) as resp:
            while not self.stop_watching.is_set():
                line = resp.readline()
                if not line:
                    return
                if line.startswith(b"event: "):
                    self.events += 1

    def _scrape(self) -> None:
        while not self.stop_watching.wait(1.0):
            urllib.request.urlopen(self.url + "metrics", timeout=10).read()
            self.scrapes += 1

    def drain(self) -> None:
        """Wait until the daemon has taken what its socket still holds (its count stops)."""
        last, _ = self.received()
        while True:
            time.sleep(0.3)
            now, _ = self.received()
            if now == last:
                return
            last = now

    def received(self) -> tuple[int, int]:
        st = self.status()["receivers"]["raw"]
        return st["records"], st["drops"].get("kernel", 0)

    def close(self) -> None:
        self.stop_watching.set()
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def saturated(side: Side, seconds: float, size: int) -> tuple[float, float]:
    """A sender offers more than the daemon can take: the records/s it took, and the CPU it
    spent per record (its capacity on a core of its own: robust to the machine's other load,
    which takes wall time from it, not CPU per record)."""
    before, _ = side.received()
    cpu0 = threads_cpu_s(side.proc.pid)
    out = mp.Value("q", 0, lock=False)
    p = mp.Process(target=_sender, args=(side.port, 0, seconds, size, out))
    t0 = time.perf_counter()
    p.start()
    p.join()
    got, _ = side.received()  # what it took while offered; what is still queued is left out
    cpu = threads_cpu_s(side.proc.pid) - cpu0
    return (got - before) / (time.perf_counter() - t0), cpu / max(1, got - before) * 1e6


def trial(side: Side, rate: int, seconds: float, size: int) -> dict[str, float]:
    before, _ = side.received()
    cpu0 = threads_cpu_s(side.proc.pid)
    out = mp.Value("q", 0, lock=False)
    p = mp.Process(target=_sender, args=(side.port, rate, seconds, size, out))
    p.start()
    p.join()
    sent = int(out.value)
    deadline = time.monotonic() + 5
    while True:  # let the daemon take what the kernel still holds
        got, _ = side.received()
        if got - before >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    cpu = threads_cpu_s(side.proc.pid) - cpu0
    return {"sent": sent, "received": got - before, "cpu_us_per_datagram": cpu / sent * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--same",
        action="store_true",
        help="calibration: neither side has the web view (the ratio then shows the noise)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="daqd-bw") as tmp:
        workdir = Path(tmp)
        (workdir / "run").mkdir(mode=0o700)
        sides = [Side(workdir, "bwoff", web=False), Side(workdir, "bwon", web=not args.same)]
        results: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
        try:
            time.sleep(2.0)  # the page's stream and the scrapes are going
            for t in range(args.trials):
                for side in sides if t % 2 == 0 else sides[::-1]:
                    row = trial(side, args.rate, args.seconds, args.size)
                    row["taken"], row["saturated_us"] = saturated(side, args.seconds, args.size)
                    side.drain()
                    results[side.name].append(row)
            on = sides[1]
            print(f"web side: {on.scrapes} scrapes, {on.events} events over the run")
        finally:
            for s in sides:
                s.close()
    summary: dict[str, Any] = {"rate": args.rate, "seconds": args.seconds, "trials": args.trials}
    for name, label in (("bwoff", "without the web view"), ("bwon", "page open + /metrics 1/s")):
        rows = results[name]
        cpu = statistics.median(r["cpu_us_per_datagram"] for r in rows)
        sat = statistics.median(r["saturated_us"] for r in rows)
        taken = statistics.median(r["taken"] for r in rows)
        lost = sum(r["sent"] - r["received"] for r in rows)
        sent = sum(r["sent"] for r in rows)
        summary[name] = {
            "saturated_us_per_record": sat,
            "taken_per_s": taken,
            "cpu_us_per_datagram": cpu,
            "sent": sent,
            "lost": lost,
        }
        print(
            f"{label:28s} saturated: {sat:5.2f} us CPU/record = {1e6 / sat:8.0f} records/s a "
            f"core (took {taken:8.0f}/s); at {args.rate}/s: {cpu:5.2f} us/datagram, "
            f"lost {lost} of {sent}"
        )
    off, on = results["bwoff"], results["bwon"]
    pairs = [a["saturated_us"] / b["saturated_us"] for a, b in zip(off, on, strict=True)]
    ratio = summary["bwoff"]["saturated_us_per_record"] / summary["bwon"]["saturated_us_per_record"]
    took = summary["bwon"]["taken_per_s"] / summary["bwoff"]["taken_per_s"]
    cpu_ratio = summary["bwoff"]["cpu_us_per_datagram"] / summary["bwon"]["cpu_us_per_datagram"]
    summary.update(ratio=ratio, pair_ratios=pairs, taken_ratio=took, cpu_ratio=cpu_ratio)
    print(
        f"ingest capacity with the page open / without: {ratio:.3f}x (CPU per record when "
        f"saturated, medians of {len(pairs)} trials; pairs {min(pairs):.3f}..{max(pairs):.3f}); "
        f"records/s taken: {took:.3f}x; at {args.rate}/s, CPU per datagram: {cpu_ratio:.3f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
