"""Helpers shared by the benchmarks (imported as `_common`: a script's own folder is on sys.path).

- `cpu_s(pid)`: user + system CPU seconds of a process, from /proc (Linux).
- `serve_json_lines(ready, report)` / `JsonChild`: the two ends of a benchmark's server child
  process. The child prints one JSON line `ready` (its port, ...), then answers each line it reads
  on stdin with one JSON `report()` line, until "quit" or EOF; the parent reads and asks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by process `pid` (None: this process)."""
    stat = f"/proc/{'self' if pid is None else pid}/stat"
    with open(stat) as f:
        fields = f.read().rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
