"""Wall time of `daqctl status` against a running daemon, interpreter start included.

Baseline, measured in the same run: `python -c pass` with the same interpreter. The target is an
answer in under 0.25 s; the figure to watch is the median and its ratio to the bare interpreter.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUNS = 25
CONFIG = """
[daemon]
name = "bench"
[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["live"]
[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def series(argv: list[str], env: dict[str, str]) -> list[float]:
    timed(argv, env)  # warm the page cache
    return sorted(timed(argv, env) for _ in range(RUNS))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="daqd-b"))
    env = {**os.environ, "RUNTIME_DIRECTORY": str(work)}
    env.pop("NOTIFY_SOCKET", None)
    (work / "bench.toml").write_text(CONFIG)
    daemon = subprocess.Popen(
        [str(BIN / "daqd"), "serve", str(work / "bench.toml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = [str(BIN / "daqctl"), "--name", "bench", "status"]
        deadline = time.monotonic() + 60
        while subprocess.run(status, env=env, capture_output=True).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("daqd did not come up")
            time.sleep(0.1)
        base = series([sys.executable, "-c", "pass"], env)
        ctl = series(status, env)
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    def p90(xs: list[float]) -> float:
        return xs[int(0.9 * (len(xs) - 1))]

    b, c = statistics.median(base), statistics.median(ctl)
    print(f"runs per series: {RUNS}")
    print(f"python -c pass : median {b * 1000:6.1f} ms   p90 {p90(base) * 1000:6.1f} ms")
    print(f"daqctl status  : median {c * 1000:6.1f} ms   p90 {p90(ctl) * 1000:6.1f} ms")
    print(
        f"ratio daqctl/python: {c / b:.2f}   daqctl over bare interpreter: {(c - b) * 1000:.1f} ms"
    )
    print(f"target < 250 ms: {'met' if c < 0.25 else 'NOT met'} (median)")


if __name__ == "__main__":
    main()
