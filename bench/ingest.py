"""Ingest benchmark: UDP datagrams through daqd's `udp` receiver -> `zmq` publisher -> a SUB
counter, against a bare uvloop datagram counter measured in the same run.

For each datagram size, a sender process offers rising paced rates for one second each; a rate is
lossless when every datagram arrived in one of two trials (the same rule for every side). The
sides take the ladder in turns, rate by rate, so that changes in the machine's other load fall on
all alike. The ladder goes on rising (x1.12 a step above 250k/s) until the side loses, so that the
baseline's own limit is measured, not the top of a ladder; if the sender cannot keep the pace
first, the output says that the sender is the limit. The sender hands the kernel up to 32
datagrams per sendmmsg(2) call (Linux), so that it outruns the bare counter.

We print the highest lossless rate of each side and their ratio, and the CPU per datagram of each
side over the rates all sides passed, with its ratio: the rate ratio moves with the machine (how
the sender, daqd and the SUB counter share its cores, and what else runs), the CPU ratio less.
For daqd we check that every datagram lost at the first lossy rate is explained by a counter
(kernel drops, queue drops, high-water-mark drops).

With `--other-tree DIR`, a second `daqd serve` importing daqd from another checkout (DIR, e.g. a
`git worktree` of an older commit) takes the ladder as a third side, in turns with the other two:
a before/after comparison measured rate by rate, seconds apart.

    .venv/bin/python bench/ingest.py [--quick] [--json FILE] [--other-tree DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATES = [10_000, 20_000, 40_000, 60_000, 80_000, 90_000, 100_000, 115_000, 130_000, 145_000]
RATES += [160_000, 180_000, 200_000, 225_000, 250_000]
GROWTH = 1.12  # above the listed rates, each step offers this much more than the last
CEILING = 5_000_000  # no step above this (a guard: no sender reaches it)
STEP_S = 1.0
TRIES = 2  # a rate counts as lossless if one of this many trials loses nothing (both sides alike)
PACE_KEPT = 0.95  # a trial whose sender reached less than this share of the offered rate is
# sender-limited: what it offered is the rate it reached, and the ladder cannot go higher
BATCH = 32  # the sender hands the kernel up to this many datagrams per sendmmsg(2) call
RCVBUF = 8 << 20


def ladder(quick: bool) -> Iterator[int]:
    """The offered rates: RATES, then rising by GROWTH (rounded to 5k/s) up to CEILING."""
    if quick:
        yield from RATES[:4]
        return
    yield from RATES
    rate = RATES[-1]
    while rate < CEILING:
        rate = round(rate * GROWTH / 5000) * 5000
        yield rate


def threads_cpu_s(pid: int, prefix: str = "") -> float:
    """CPU seconds run so far by the threads of process `pid` whose name starts with `prefix`
    (all by default), to the nanosecond from /proc/PID/task/*/schedstat (Linux): /proc/PID/stat
    counts in 10 ms ticks, too coarse for a step at a low rate. A thread that ended is missing."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if prefix:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if not f.read().startswith(prefix):
                        continue
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended
            continue
    return total / 1e9


# ----- the sender -----------------------------------------------------------------------------
class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def batch_sender(sock: socket.socket, payload: bytes) -> Callable[[int], int]:
    """A function sending n <= BATCH copies of `payload` on the connected `sock` in one
    sendmmsg(2) call and returning how many left: a Python sendto() per datagram costs the sender
    ~3 us each, and it then saturates near the bare counter's limit instead of above it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
    buf = ctypes.create_string_buffer(payload, len(payload))
    iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(payload))
    vec = (_Mmsghdr * BATCH)()
    for msg in vec:
        msg.msg_hdr.msg_iov = ctypes.pointer(iov)
        msg.msg_hdr.msg_iovlen = 1
    fd = sock.fileno()

    def send(n: int) -> int:
        sent: int = libc.sendmmsg(fd, vec, n, 0)
        if sent >= 0:
            return sent
        err = ctypes.get_errno()
        if err in (errno.EINTR, errno.EAGAIN, errno.ENOBUFS):
            return 0
        raise OSError(err, os.strerror(err))

    send.keep = (buf, iov, vec)  # type: ignore[attr-defined]  # alive as long as send is
    return send


def sender(addr: tuple[str, int], rate: int, count: int, size: int, done: Any, secs: Any) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(addr)
    send = batch_sender(sock, b"x" * size)
    sent = 0
    start = time.perf_counter()
    while sent < count:
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        if sent >= due:
            # ahead of the pace: sleep, not spin, so the sender leaves the CPU to what it
            # measures (the kernel's timer slack turns this into short bursts, tens of µs long)
            time.sleep(max(0.0, sent / rate - (time.perf_counter() - start)))
            continue
        while sent < due:
            sent += send(min(BATCH, due - sent))
    secs.value = time.perf_counter() - start
    done.value = sent


def step(addr: tuple[str, int], rate: int, size: int) -> tuple[int, float]:
    """Offer `rate` datagrams/s for STEP_S; return (datagrams sent, the rate the sender reached)."""
    done, secs = mp.Value("q", 0, lock=False), mp.Value("d", 0.0, lock=False)
    count = int(rate * STEP_S)
    p = mp.Process(target=sender, args=(addr, rate, count, size, done, secs))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"the sender exited with {p.exitcode}")
    # the last datagram is due at (count - 1) / rate: a sender on pace takes that long
    return int(done.value), min(rate, (done.value - 1) / max(secs.value, 1e-9))


def settle(read: Callable[[], int], expected: int, timeout_s: float = 5.0) -> int:
    """Wait until `read()` reaches expected or stops changing for 0.5 s."""
    last, since = read(), time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now >= expected:
            return now
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 0.5:
            return now
    return read()


# ----- the ladder, the same for both sides, taken in turns ----------------------------------
@dataclass
class Side:
    """One receiving side and its ladder: `received()` counts what arrived, `cpu()` is the CPU
    seconds of the side's process, `parts` more CPU seconds to report by name (a thread, a peer)."""

    addr: tuple[str, int]
    received: Callable[[], int]
    cpu: Callable[[], float]
    parts: dict[str, Callable[[], float]] = field(default_factory=dict)
    climbing: bool = True
    best: float = 0  # the highest lossless rate
    ended: str = "ladder"  # "loss": lost at `offered`; "sender": the sender reached only `at`
    offered: int = 0  # the rate of the last step
    at: float = 0  # the rate the sender reached at the last step
    sent_total: int = 0
    # per lossless rate, of its lossless trial: datagrams, CPU seconds, CPU seconds of each part
    steps: dict[int, tuple[int, float, dict[str, float]]] = field(default_factory=dict)
    # the same over the trials of the step that lost datagrams: the side was saturated there, so
    # each wakeup took many datagrams, and its CPU per datagram depends little on the rate
    saturated: tuple[int, float, dict[str, float]] | None = None

    def offer(self, rate: int, size: int) -> None:
        """One step of the ladder: TRIES trials at `rate`, the first lossless one counts; the
        climb ends if every trial lost datagrams or the sender could not keep the pace."""
        lossy: list[tuple[int, float, dict[str, float]]] = []
        for _ in range(TRIES):
            before, cpu0 = self.received(), self.cpu()
            parts0 = {name: read() for name, read in self.parts.items()}
            sent, reached = step(self.addr, rate, size)
            self.sent_total += sent
            got = settle(self.received, before + sent) - before
            lossless = got >= sent
            trial = (got, self.cpu() - cpu0, {k: r() - parts0[k] for k, r in self.parts.items()})
            if not lossless:
                lossy.append(trial)
            if lossless or reached < PACE_KEPT * rate:
                break
        self.offered, self.at = rate, reached
        if not lossless:
            self.ended, self.climbing = "loss", False
            self.saturated = (
                sum(t[0] for t in lossy),
                sum(t[1] for t in lossy),
                {k: sum(t[2][k] for t in lossy) for k in self.parts},
            )
        elif reached < PACE_KEPT * rate:
            self.ended, self.best, self.climbing = "sender", reached, False
        else:
            self.best = rate
            self.steps[rate] = trial

    def limit(self) -> str:
        if self.ended == "loss" and self.at >= PACE_KEPT * self.offered:
            return f"{self.best / 1000:.0f}k/s (lost at {self.offered / 1000:.0f}k/s)"
        if self.ended == "loss":
            return (
                f"{self.best / 1000:.0f}k/s (lost at {self.offered / 1000:.0f}k/s offered, of "
                f"which the sender reached {self.at / 1000:.0f}k/s)"
            )
        if self.ended == "sender":
            return f">= {self.best / 1000:.0f}k/s (THE SENDER IS THE LIMIT: it reached only that)"
        return f">= {self.best / 1000:.0f}k/s (the top of the ladder)"

    def cpu_us(self, rates: list[int]) -> dict[str, float]:
        """CPU µs per datagram over the lossless trials at `rates`: "all" and each part."""
        n = max(sum(self.steps[r][0] for r in rates), 1)
        us = {"all": sum(self.steps[r][1] for r in rates) / n * 1e6}
        for name in self.parts:
            us[name] = sum(self.steps[r][2][name] for r in rates) / n * 1e6
        return us

    def saturated_us(self) -> dict[str, float] | None:
        """CPU µs per datagram received over the trials of the lossy step (None: no such step)."""
        if self.saturated is None or not self.saturated[0]:
            return None
        n, cpu, parts = self.saturated
        return {"all": cpu / n * 1e6, **{k: v / n * 1e6 for k, v in parts.items()}}

    def figures(self) -> dict[str, Any]:
        return {
            "limit": self.best,
            "ended": self.ended,
            "offered": self.offered,
            "reached": self.at,
            "steps": {
                str(rate): {"datagrams": n, "cpu_s": cpu, **{f"{k}_cpu_s": v for k, v in p.items()}}
                for rate, (n, cpu, p) in self.steps.items()
            },
            "saturated_cpu_us": self.saturated_us(),
        }


def climb(sides: list[Side], size: int, quick: bool) -> None:
    """Take the ladder with every side in turns, rate by rate, so that changes in the machine's
    other load fall on all sides alike; a side drops out when its climb ends."""
    for rate in ladder(quick):
        climbing = [side for side in sides if side.climbing]
        if not climbing:
            return
        for side in climbing:
            side.offer(rate, size)


# ----- the baseline ---------------------------------------------------------------------------
def bare_counter(port_out: Any, count: Any, ready: Any) -> None:
    """The baseline: a uvloop DatagramProtocol that only counts."""
    import uvloop

    class Counter(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            count.value += 1

    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind(("127.0.0.1", 0))
        port_out.value = sock.getsockname()[1]
        await asyncio.get_running_loop().create_datagram_endpoint(Counter, sock=sock)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


@contextlib.contextmanager
def bare_side() -> Iterator[Side]:
    port, count, ready = mp.Value("i", 0), mp.Value("q", 0, lock=False), mp.Event()
    proc = mp.Process(target=bare_counter, args=(port, count, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the bare counter did not start")
        assert proc.pid is not None
        pid = proc.pid
        yield Side(("127.0.0.1", port.value), lambda: count.value, lambda: threads_cpu_s(pid))
    finally:
        proc.kill()


# ----- daqd -----------------------------------------------------------------------------------
def sub_counter(endpoint: str, count: Any, ready: Any) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)  # unlimited: a SUB-side drop would be invisible to daqd
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    ready.set()
    while True:
        sub.recv_multipart()
        count.value += 1


CONFIG = """
[daemon]
name = "bench-ingest"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "udp"
listen = "127.0.0.1:0"
rcvbuf_bytes = {rcvbuf}
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
policy = "drop"
queue_size = 100000
sndhwm = 100000
"""


def daqd_env(tree: str | None) -> dict[str, str]:
    """The environment of a `daqd serve` child: ours, or importing daqd from the tree `tree`
    (PYTHONPATH comes before the venv's own, editable, install)."""
    if tree is None:
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": importable(tree)}


def importable(tree: str) -> str:
    """A folder from which `tree`'s own daqd imports whole. A tree whose receivers/ and
    publishers/ install as daqd.receivers / daqd.publishers (package-dir) has no such folder:
    on PYTHONPATH alone, daqd would come from `tree` but daqd.receivers from the venv's editable
    install (this tree). So a folder is made beside it whose daqd/ links every entry of
    `tree`/daqd plus receivers/ and publishers/."""
    root = Path(tree)
    if (root / "daqd" / "receivers").exists() or not (root / "receivers").is_dir():
        return tree  # its own layout imports as it is (top-level receivers, or nested)
    shim = Path(tempfile.mkdtemp(prefix="daqd-tree-")) / "daqd"
    shim.mkdir()
    for entry in (root / "daqd").iterdir():
        (shim / entry.name).symlink_to(entry)
    for name in ("receivers", "publishers"):
        (shim / name).symlink_to(root / name)
    return str(shim.parent)


def daqd_source(env: dict[str, str]) -> str:
    """Where `daqd serve` with `env` imports daqd, receivers and publishers from (one folder, or
    the three paths if they differ): a python with `env` whose sys.path starts, as the script's
    does, with no source tree (-P: not the current folder)."""
    code = (
        "import importlib, daqd\n"
        "def where(name):\n"
        "    try:\n"
        "        return importlib.import_module('daqd.' + name).__path__[0]\n"
        "    except ImportError:\n"
        "        return importlib.import_module(name).__path__[0]\n"
        "print(daqd.__file__, where('receivers'), where('publishers'))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    # the same tree: daqd/__init__.py and the two folders beside daqd/, links followed
    init, *folders = (Path(os.path.realpath(f)) for f in out.stdout.split())
    roots = {str(init.parent.parent), *(str(f.parent) for f in folders)}
    return roots.pop() if len(roots) == 1 else out.stdout.strip()


@contextlib.contextmanager
def daqd_side(tree: str | None = None) -> Iterator[tuple[Side, Callable[[], dict[str, int]]]]:
    """`daqd serve` (from the source tree `tree` if given) with a SUB counter on its publisher,
    as a Side (parts: the ZeroMQ I/O thread, the SUB counter), and a function returning the
    accounting of what it lost."""
    from daqd.control_client import ControlClient

    work = Path(tempfile.mkdtemp(prefix="bi"))
    cfg = work / "bench.toml"
    cfg.write_text(CONFIG.format(rcvbuf=RCVBUF))
    env = {**daqd_env(tree), "RUNTIME_DIRECTORY": str(work)}
    daqd = Path(sys.executable).parent / "daqd"
    proc = subprocess.Popen([str(daqd), "serve", str(cfg), "--log-level", "WARNING"], env=env)
    client = None
    sub = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = ControlClient(f"ipc://{work}/bench-ingest.ctl", timeout_s=1)
                st = client.request("STAT")
                break
            except Exception:
                if client is not None:
                    client.close()
                    client = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        host, port = st["receivers"]["udp"]["addresses"]["listen"].rsplit(":", 1)
        count, ready = mp.Value("q", 0, lock=False), mp.Event()
        sub = mp.Process(
            target=sub_counter,
            args=(st["publishers"]["live"]["addresses"]["endpoint"], count, ready),
            daemon=True,
        )
        sub.start()
        if not ready.wait(30):
            raise RuntimeError("the SUB counter did not start")
        assert sub.pid is not None
        sub_pid = sub.pid
        addr = (host, int(port))
        # the PUB only sends to subscribers it knows: prime until the SUB sees a message
        primer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while count.value == 0:
            primer.sendto(b"p", addr)
            time.sleep(0.05)
        primed = settle(lambda: count.value, 10**9, 2.0)

        def drops() -> tuple[int, int]:
            assert client is not None
            st = client.request("STAT")
            return (
                sum(st["receivers"]["udp"]["drops"].values()),
                sum(st["publishers"]["live"]["drops"].values()),
            )

        # count from here on: what the primer sent before the SUB was known to the PUB is gone
        base_kernel, base_pub = drops()
        side = Side(
            addr,
            lambda: count.value,
            lambda: threads_cpu_s(proc.pid),
            {
                "zmq_io": lambda: threads_cpu_s(proc.pid, "ZMQbg/"),
                "sub": lambda: threads_cpu_s(sub_pid),
            },
        )

        def accounting() -> dict[str, int]:
            time.sleep(1.2)  # let the once-a-second kernel drop sampling catch up
            kernel, pub = drops()
            received = count.value - primed
            return {
                "sent": side.sent_total,
                "sub_received": received,
                "receiver_drops": kernel - base_kernel,
                "publisher_drops": pub - base_pub,
                "unexplained": side.sent_total
                - received
                - (kernel - base_kernel)
                - (pub - base_pub),
            }

        yield side, accounting
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        proc.wait(30)
        if sub is not None:
            sub.kill()


# ----- main -----------------------------------------------------------------------------------
def saturated_ratio(bare: Side, side: Side) -> float | None:
    """Bare / daqd CPU per datagram at each one's lossy step (None if either has none)."""
    ours, theirs = side.saturated_us(), bare.saturated_us()
    return theirs["all"] / ours["all"] if ours and theirs else None


def report(label: str, side: Side, bare: Side, rates: list[int], acct: dict[str, int]) -> None:
    bare_us, us = bare.cpu_us(rates), side.cpu_us(rates)
    print(f"           {label} udp->zmq->SUB {side.limit()}")
    print(
        f"             rate ratio {side.best / bare.best if bare.best else float('nan'):.2f}"
        f" | CPU ratio {bare_us['all'] / us['all'] if us['all'] else float('nan'):.2f}"
        f" (bare {bare_us['all']:.2f} us / daqd {us['all']:.2f} us: "
        f"{us['all'] - us['zmq_io']:.2f} event loop + {us['zmq_io']:.2f} ZeroMQ I/O thread; "
        f"the SUB counter {us['sub']:.2f} more)"
    )
    sat, bare_sat = side.saturated_us(), bare.saturated_us()
    if sat is not None and bare_sat is not None:
        print(
            f"             saturated (each side's lossy step, per datagram received): CPU ratio "
            f"{saturated_ratio(bare, side):.2f} (bare {bare_sat['all']:.2f} us / daqd "
            f"{sat['all']:.2f} us, {sat['zmq_io']:.2f} of it the ZeroMQ I/O thread)"
        )
    if acct:
        print(f"             first lossy step, daqd accounting: {acct}")
    else:
        print("             daqd lost nothing at any offered rate")


def measure(size: int, quick: bool, other: str | None) -> dict[str, Any]:
    """The ladders at `size` (bare, daqd, and daqd from the tree `other` if given), printed;
    returns the figures."""
    with contextlib.ExitStack() as stack:
        bare = stack.enter_context(bare_side())
        daqds = [stack.enter_context(daqd_side())]
        if other is not None:
            daqds.append(stack.enter_context(daqd_side(other)))
        sides = [bare, *(side for side, _ in daqds)]
        climb(sides, size, quick)
        accts = [accounting() if side.ended == "loss" else {} for side, accounting in daqds]
    rates = sorted(set.intersection(*(set(side.steps) for side in sides)))
    span = f"{rates[0] // 1000}k-{rates[-1] // 1000}k/s" if rates else "none"
    print(f"  {size:>5} B: bare uvloop counter {bare.limit()}")
    print(
        f"           (ratios: daqd / bare for rates, bare / daqd for CPU per datagram over the "
        f"{len(rates)} rates all sides passed, {span})"
    )
    labels = ["daqd", "other daqd"]
    for label, (side, _), acct in zip(labels, daqds, accts, strict=False):
        report(label, side, bare, rates, acct)
    if bare.ended == "sender":
        print(
            "           NOTE: the sender, not the baseline, ended the baseline's ladder: "
            "the rate ratios are upper bounds; the CPU ratios stand"
        )
    figures: dict[str, Any] = {"rates": rates, "bare": bare.figures()}
    for key, (side, _), acct in zip(("daqd", "other"), daqds, accts, strict=False):
        figures[key] = {
            **side.figures(),
            "rate_ratio": side.best / bare.best if bare.best else None,
            "cpu_us": side.cpu_us(rates),
            "cpu_ratio": bare.cpu_us(rates)["all"] / max(side.cpu_us(rates)["all"], 1e-9),
            "saturated_cpu_ratio": saturated_ratio(bare, side),
            "accounting": acct,
        }
    figures["bare"]["cpu_us"] = bare.cpu_us(rates)
    if other is not None:
        ours, theirs = figures["daqd"]["cpu_us"]["all"], figures["other"]["cpu_us"]["all"]
        rate = daqds[0][0].best / max(daqds[1][0].best, 1)
        print(
            f"           daqd vs other daqd: CPU per datagram {ours:.2f} / {theirs:.2f} us = "
            f"{ours / theirs:.3f} ({(ours / theirs - 1) * 100:+.1f}%), "
            f"highest lossless rate {rate:.2f}"
        )
        sat = [side.saturated_us() for side, _ in daqds]
        if sat[0] is not None and sat[1] is not None:
            x = sat[0]["all"] / sat[1]["all"]
            print(
                f"           daqd vs other daqd, saturated: CPU per datagram {sat[0]['all']:.2f} / "
                f"{sat[1]['all']:.2f} us = {x:.3f} ({(x - 1) * 100:+.1f}%)"
            )
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="four low rates only (a smoke run)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    ap.add_argument(
        "--other-tree",
        metavar="DIR",
        help="also run `daqd serve` importing daqd from the source tree DIR (PYTHONPATH=DIR), "
        "as a third side in turns with the others: a before/after comparison, rate by rate",
    )
    args = ap.parse_args()
    other = str(Path(args.other_tree).resolve()) if args.other_tree else None
    started = time.monotonic()
    sources = {"daqd": daqd_source(daqd_env(None))}
    if other is not None:
        sources["other daqd"] = daqd_source(daqd_env(other))
    print(
        f"ingest: highest lossless datagram rate, {STEP_S:g} s per step, {TRIES} trials, "
        f"8 MiB SO_RCVBUF, all sides in turns at each rate; "
        + "; ".join(f"{k} from {v}" for k, v in sources.items())
    )
    figures: dict[str, Any] = {
        "sources": sources,
        "load_start": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "sizes": {str(size): measure(size, args.quick, other) for size in (64, 1400)},
    }
    figures["wall_s"] = time.monotonic() - started
    figures["load_end"] = os.getloadavg()[0]
    print(
        f"wall time {figures['wall_s']:.0f} s; load average {figures['load_start']:.1f} at the "
        f"start, {figures['load_end']:.1f} at the end, on {os.cpu_count()} cpus (the rates move "
        "with other load; the CPU ratios much less)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
