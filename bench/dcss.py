"""Operation round trips/s through a DHS: daqd's dcss receiver vs a minimal asyncio DHS.

A round trip is one `stoh_start_operation` from DCSS, answered with one `htos_operation_update`
and one `htos_operation_completed`. DCSS is daqd's simulator in this process (uvloop); each DHS
runs in its own process: ours is `daqd serve` with a handler module, measured twice, with the
operation written as an `async def` ("daqd") and as a plain `def` ("daqd def"); the baseline is the
smallest correct asyncio DHS (readexactly per frame, one write per message). All are measured in
the same run, with 1 and 8 operations in flight, in alternating rounds (all see the same machine
load); printed: best and median rates, the DHS's CPU time per round trip, and the ratios.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daqd.dhs import Operation, operation

HERE = Path(__file__).resolve()
WARMUP_S = 0.5
MEASURE_S = 1.5
ROUNDS = 6
IN_FLIGHT = (1, 8)
# kind -> (which DHS, which operation): daqd with an async def handler and with a plain def one
KINDS = {
    "baseline": ("baseline", "bench"),
    "daqd": ("daqd", "bench"),
    "daqd def": ("daqd", "bench_plain"),
}


@operation("bench")
async def bench_operation(op: Operation) -> None:
    op.update("progress")
    op.complete("normal", "done")


@operation("bench_plain")
def bench_plain_operation(op: Operation) -> None:  # the same, as a plain def (no task)
    op.update("progress")
    op.complete("normal", "done")


# ---------------------------------------------------------------- the baseline DHS (child process)


async def baseline_dhs(connect: str) -> None:
    host, _, port = connect.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readexactly(200)
    writer.write(b"htos_client_is_hardware dhs".ljust(200, b"\0"))
    while True:
        header = await reader.readexactly(26)
        text_len, bin_len = (int(x) for x in header.replace(b"\0", b" ").split())
        body = await reader.readexactly(text_len + bin_len)
        parts = body[:text_len].split(b"\0", 1)[0].decode().split(" ", 3)
        if parts[0] == "stoh_start_operation":
            name, handle = parts[1], parts[2]
            for text in (
                f"htos_operation_update {name} {handle} progress",
                f"htos_operation_completed {name} {handle} normal done",
            ):
                data = text.encode()
                writer.write(b"%12d %12d " % (len(data) + 1, 0) + data + b"\0")


# ---------------------------------------------------------------- the driver (this process)


def start_dhs(kind: str, address: str, workdir: Path) -> subprocess.Popen[bytes]:
    workdir.mkdir()  # each DHS its own runtime directory (control socket)
    if kind == "baseline":
        cmd = [sys.executable, str(HERE), "--baseline", address]
    else:
        config = workdir / "bench-dhs.toml"
        config.write_text(
            f'[daemon]\nname = "benchdhs"\n\n[[receiver]]\ntype = "dcss"\nname = "dhs"\n'
            f'connect = "{address}"\ndhs_name = "dhs"\nhandlers = ["{HERE}"]\n'
        )
        cmd = [str(Path(sys.executable).parent / "daqd"), "serve", str(config)]
    env = {**os.environ, "RUNTIME_DIRECTORY": str(workdir)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(sim: object, operation: str, in_flight: int, pid: int) -> tuple[float, float]:
    """(round trips/s, DHS CPU microseconds per round trip) over MEASURE_S."""
    # imported here, not at the top: daqd loads this file as the DHS's handler module, by path,
    # where bench/ is not on sys.path
    from _common import cpu_s

    from daqd.sim.dcss import DcssSimulator, SimOperation

    assert isinstance(sim, DcssSimulator)
    link = await sim.wait_online("dhs", timeout=30)
    count = 0
    running = True
    outstanding = 0
    all_done = asyncio.Event()

    def on_done(op: SimOperation) -> None:
        nonlocal count, outstanding
        if op.status != "normal":
            raise RuntimeError(f"operation failed: {op.status}")
        count += 1
        if running:
            link.start_operation(operation, "", on_done)
        else:
            outstanding -= 1
            if outstanding == 0:
                all_done.set()

    for _ in range(in_flight):
        link.start_operation(operation, "", on_done)
    await asyncio.sleep(WARMUP_S)
    c0, t0, cpu0 = count, time.perf_counter(), cpu_s(pid)
    await asyncio.sleep(MEASURE_S)
    c1, t1, cpu1 = count, time.perf_counter(), cpu_s(pid)
    outstanding = in_flight
    running = False
    await asyncio.wait_for(all_done.wait(), 30)
    n = c1 - c0
    return n / (t1 - t0), (cpu1 - cpu0) / max(n, 1) * 1e6


async def run_bench() -> dict[tuple[str, int], list[tuple[float, float]]]:
    from daqd.sim.dcss import DcssSimulator, SimDevice

    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sims: dict[str, DcssSimulator] = {}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for kind, (dhs, _) in KINDS.items():
                sims[kind] = DcssSimulator(
                    {"dhs": 2},
                    [SimDevice("operation", "bench"), SimDevice("operation", "bench_plain")],
                    record_messages=False,
                )
                await sims[kind].start()
                procs[kind] = start_dhs(dhs, sims[kind].address, Path(tmp) / kind.replace(" ", "-"))
            # every DHS stays connected; measurements alternate so all see the same machine load
            for _ in range(ROUNDS):
                for n in IN_FLIGHT:
                    for kind, (_, op_name) in KINDS.items():
                        rate = await measure(sims[kind], op_name, n, procs[kind].pid)
                        results.setdefault((kind, n), []).append(rate)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(30)
            for sim in sims.values():
                await sim.close()
    return results


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline":
        import uvloop

        uvloop.run(baseline_dhs(sys.argv[2]))
        return
    import uvloop

    results = uvloop.run(run_bench())
    print("DCSS operation round trips/s (1 start in, 1 update + 1 completion out);")
    print(
        f"DCSS simulator on uvloop in this process; {ROUNDS} alternating rounds of {MEASURE_S} s;"
    )
    print(f"Python {platform.python_version()} (eager tasks native from 3.12)")
    print(f"{'in flight':>9}  {'DHS':>8}  {'best/s':>8}  {'median/s':>8}  {'CPU us/op':>9}")
    for n in IN_FLIGHT:
        for kind in KINDS:
            runs = results[(kind, n)]
            rates = [r for r, _ in runs]
            cpu = statistics.median(c for _, c in runs)
            best, med = max(rates), statistics.median(rates)
            print(f"{n:>9}  {kind:>8}  {best:>8.0f}  {med:>8.0f}  {cpu:>9.1f}")
        base = results[("baseline", n)]
        for kind in ("daqd", "daqd def"):
            ours = results[(kind, n)]
            best_ratio = max(r for r, _ in ours) / max(r for r, _ in base)
            med = statistics.median(r for r, _ in ours) / statistics.median(r for r, _ in base)
            print(
                f"{n:>9}  {kind + ' /':>8}  {best_ratio:>7.2f}x  {med:>7.2f}x  (ratio to baseline)"
            )


if __name__ == "__main__":
    main()
