"""`daqd`: serve, check, dump, demo, sim — usage and config errors print one line, never a traceback."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

import click

from daqd.errors import DaqdError

# `daqd sim NAME` loads NAME's module only when it is asked for; each exposes a click `command`.
SIM_COMMANDS = {
    "slowsignal": "daqd.sim.slowsignal",
    "cdtp": "daqd.sim.cdtp",
    "dcss": "daqd.sim.dcss",
    "trigger": "daqd.sim.trigger",
    "timestamp": "daqd.sim.timestamp",
    "log": "daqd.sim.log",
    "monitor": "daqd.sim.monitor",
}


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"daqd: {message}", err=True)
    sys.exit(code)


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on uvloop."""
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except KeyboardInterrupt:  # Ctrl-C before the daemon's own handlers were in place
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="daqd")
def main() -> None:
    """daqd: receive from instruments and peers, publish to monitors, files and nodes."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False), required=False)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Any case; the same names as [daemon] log_level (default: the config's, INFO).",
)
@click.option("--controller", help="Run as a worker of the parent daemon at this ICCP endpoint.")
@click.option(
    "--iccp",
    type=click.Choice(["daqd", "saturnin"]),
    default="daqd",
    show_default=True,
    help="With --controller: daqd = a worker of a daqd parent (msgpack bodies); saturnin = the "
    "daemon of CONFIG as a component of a Saturnin controller (Saturnin's protobuf bytes).",
)
def serve(config: str | None, log_level: str | None, controller: str | None, iccp: str) -> None:
    """Run the daemon described by CONFIG until SIGTERM, SIGINT or `daqctl shutdown`."""
    from daqd.config import load_config
    from daqd.daemon import serve as serve_daemon
    from daqd.logs import setup_logging

    if controller and iccp == "saturnin":  # the daemon of CONFIG under a Saturnin controller
        from daqd.worker import run_saturnin_component

        if config is None:
            fail("serve --iccp saturnin needs CONFIG (the daemon the component runs)")
        try:
            cfg = load_config(config)
        except DaqdError as exc:
            fail(str(exc))
        setup_logging(log_level or cfg.daemon.log_level)
        sys.exit(run_loop(run_saturnin_component(controller, cfg)))
    if iccp != "daqd":
        fail("--iccp saturnin needs --controller ENDPOINT")
    if controller:  # a worker process: its parent sends the configuration (REQUEST CONF)
        from daqd.worker import run_component

        setup_logging(log_level or "INFO")
        sys.exit(run_loop(run_component(controller)))
    if config is None:
        fail("serve needs CONFIG (or --controller ENDPOINT for a worker process)")
    try:
        cfg = load_config(config)
    except DaqdError as exc:
        fail(str(exc))
    setup_logging(log_level or cfg.daemon.log_level)
    try:
        sys.exit(run_loop(serve_daemon(cfg)))
    except DaqdError as exc:
        from daqd.netinfo import explain_bind_error

        fail(explain_bind_error(exc, cfg), 1)
    except OSError as exc:
        fail(f"{config}: {exc}", 1)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG and print what it would run.

    Refuses (exit 2) whatever `daqd serve` would refuse, with the same message: besides the
    settings, the files and directories the [daemon] table names and the code the configuration
    loads. Warnings (e.g. a CURVE secret key others can read) are printed; the exit code stays 0.
    """
    from daqd.config import load_config
    from daqd.endpoints import control_endpoint

    try:
        cfg = load_config(config)
    except DaqdError as exc:
        fail(str(exc))
    d = cfg.daemon
    n = len(cfg.warnings)
    click.echo(f"{config}: OK" + (f", {n} warning{'s' if n > 1 else ''}" if n else ""))
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}")
    endpoint = f"ipc://{d.runtime_dir}/{d.name}.ctl" if d.runtime_dir else control_endpoint(d.name)
    click.echo(f"daemon {d.name}: control {endpoint}, drain {d.drain_timeout_s} s")
    for r in cfg.receivers:
        where = _where(r.model_dump())
        to = ", ".join(r.publish_to) or "(nowhere)"
        proc = " [own process]" if r.process else ""
        click.echo(f"  receiver  {r.name:<16} {r.type:<12} {where:<28} -> {to}{proc}")
    for p in cfg.publishers:
        where = _where(p.model_dump())
        click.echo(
            f"  publisher {p.name:<16} {p.type:<12} {where:<28} "
            f"queue {p.queue_size}, policy {p.policy}"
        )


def _where(fields: dict[str, Any]) -> str:
    for key in ("listen", "connect", "endpoint", "directory", "url", "senders"):
        if fields.get(key):
            return f"{key} {fields[key]}"
    return ""


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--verify",
    is_flag=True,
    help="Check the whole file against its end marker; exit 1 naming every problem.",
)
@click.option("--limit", type=int, default=0, help="Print at most this many records.")
@click.option("--payload", is_flag=True, help="Also print the first bytes of each payload (hex).")
def dump(file: str, verify: bool, limit: int, payload: bool) -> None:
    """Print the records of a run file, or verify it.

    A cut file is read up to its last whole record; then dump says where and why it ends and
    exits 1, as it does for a file without an end marker or one that is not a run file.
    """
    if verify:
        _verify_file(file)
    from daqd.runfile import CutFile, NotARunFile, RunFileReader

    reader = RunFileReader(file)
    shown = 0
    ended = False
    try:
        for item in reader:
            if isinstance(item, dict):
                ended = ended or (reader.items > 1 and "end" in item)
                click.echo(f"# {item}")
                continue
            line = f"{item.source} {item.seq} {item.time_ns} {item.tags} {item.nbytes}B"
            if payload and item.payload:
                line += " " + bytes(item.payload[0][:32]).hex()
            click.echo(line)
            shown += 1
            if limit and shown >= limit:
                return
    except NotARunFile:
        fail(f"{file}: not a daqd run file", 1)
    except CutFile:
        fail(
            f"{file}: cut inside an item at byte {reader.offset} (size {reader.size}): "
            f"read up to its last whole record ({shown} records)",
            1,
        )
    except (ValueError, EOFError) as exc:
        fail(f"{exc} (read up to byte {reader.offset}, {shown} records)", 1)
    if not ended:
        fail(
            f"{file}: no end marker: the file was not closed cleanly; it ends after its last "
            f"whole record at byte {reader.offset} ({shown} records)",
            1,
        )


def _verify_file(file: str) -> NoReturn:
    """`dump --verify`: what the file holds, what its end marker says, and every problem."""
    from daqd.runfile import verify as verify_file

    s = verify_file(file)
    header = s.header or {}
    part = header.get("part")
    what = f"{header.get('kind', '?')} file" + (f", part {part}" if part else "")
    if s.header is None:
        what = "no run file header"
    click.echo(f"{file}: {what}, {sum(s.records.values())} records, {s.size} bytes")
    if header.get("dropped_before"):
        click.echo(
            f"  header: after {header.get('previous_part') or 'the start'}"
            f" ({header.get('previous_ended') or 'nothing written'}),"
            f" dropped before this part: {header['dropped_before']}"
        )
    for src, n in sorted(s.records.items()):
        gaps = s.gaps.get(src, [])
        missing = sum(b - a - 1 for a, b in gaps if b > a)
        click.echo(
            f"  {src}: {n} records, seq {s.first_seq[src]}..{s.last_seq[src]}"
            f", {len(gaps)} gaps ({missing} missing)"
        )
        for a, b in gaps[:10]:
            click.echo(f"    gap: after {a} comes {b}")
    if s.end is not None:
        own = s.end.get("file")
        drops = own.get("drops") if isinstance(own, dict) else None
        click.echo(
            f"  end: {s.end.get('condition', 'live file')}"
            + (f"; publisher drops in the run: {drops}" if drops else "")
        )
        before = own.get("previous_parts") if isinstance(own, dict) else None
        for p in before if isinstance(before, list) else []:
            if isinstance(p, dict) and isinstance(p.get("content"), dict):
                counts = {
                    k: v.get("count") if isinstance(v, dict) else v for k, v in p["content"].items()
                }
                click.echo(f"  part before: {p.get('file')} {counts}, ended: {p.get('ended')}")
    click.echo(f"  ends: {s.ending or '?'} (whole items up to byte {s.whole_bytes})")
    for note in s.notes:
        click.echo(f"  note: {note}")
    for p in s.problems:
        click.echo(f"  problem: {p}")
    n = len(s.problems)
    click.echo(f"{file}: " + (f"{n} problem{'s' if n > 1 else ''}" if n else "OK"))
    sys.exit(1 if s.problems else 0)


@main.command()
@click.argument("runfile", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--to", "fmt", type=click.Choice(["hdf5", "sof"]), required=True, help="Output format."
)
@click.argument("out", type=click.Path())
@click.option(
    "--compression",
    type=click.Choice(["none", "gzip", "bzip2", "blosc-lz4", "blosc-zstd", "zstd"]),
    default=None,
    help="hdf5: any (default gzip); sof: none or bzip2 (default bzip2, as SSDAQ).",
)
@click.option(
    "--complevel",
    type=click.IntRange(0, 22),
    default=None,
    help="Compression level (default: hdf5 1, sof 9).",
)
@click.option("--tags-format", type=click.Choice(["json", "msgpack"]), default="json")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    metavar="SOURCE=TYPE",
    help="sof: the receiver type (trigger, timestamp, log) of a source, over the run file's.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar on stderr (default: when stderr is a terminal).",
)
def export(
    runfile: str,
    fmt: str,
    out: str,
    compression: Any,
    complevel: int | None,
    tags_format: Any,
    kinds: tuple[str, ...],
    progress: bool | None,
) -> None:
    """Convert a run file to another format.

    hdf5: the hdf5 publisher's layout in the file OUT, which must not exist. sof: SSDAQ's
    streamed object files in the directory OUT, one per trigger, timestamp or log source
    (OUT/SOURCE.sof); records of other sources are counted and reported as skipped.

    A run file without an end marker is converted up to its last whole record; export then says
    so and exits 1.
    """
    show = sys.stderr.isatty() if progress is None else progress
    if fmt == "sof":
        _export_sof(runfile, out, compression, complevel, kinds, show)
        return
    from daqd.export import export_hdf5
    from daqd.hdf5 import Options

    options = Options(
        compression=compression or "gzip",
        complevel=1 if complevel is None else complevel,
        tags_format=tags_format,
    )
    try:
        s = export_hdf5(runfile, out, options, progress=show)
    except DaqdError as exc:
        fail(str(exc), 1)
    except (OSError, RuntimeError, ValueError) as exc:  # h5py's errors
        fail(f"export to {out} failed: {exc}", 1)
    tables = ", ".join(f"{t['rows']} in {p}" for p, t in s.tables.items()) or "no tables"
    click.echo(f"wrote {out}: {s.records} records ({tables})")
    if s.note:
        fail(f"{runfile}: {s.note}", 1)


def _export_sof(
    runfile: str,
    out: str,
    compression: str | None,
    complevel: int | None,
    kinds: tuple[str, ...],
    progress: bool,
) -> None:
    from daqd.export import SOF_STREAMS, export_sof

    if compression not in (None, "none", "bzip2"):
        fail(f"--compression {compression}: a SOF file is stored bzip2-compressed or not at all")
    if complevel is not None and not 1 <= complevel <= 9:
        fail(f"--complevel {complevel}: bzip2's levels are 1 to 9")
    level = None if compression == "none" else (9 if complevel is None else complevel)
    by_source: dict[str, str] = {}
    for k in kinds:
        source, sep, kind = k.rpartition("=")
        if not sep or not source or kind not in SOF_STREAMS:
            fail(f"--kind {k}: expected SOURCE=TYPE with TYPE one of {', '.join(SOF_STREAMS)}")
        by_source[source] = kind
    try:
        s = export_sof(runfile, out, kinds=by_source, complevel=level, progress=progress)
    except DaqdError as exc:
        fail(str(exc), 1)
    for source, f in s.files.items():
        click.echo(f"wrote {f.path}: {f.objects} records of {source} ({f.receiver_type})")
    for source, (n, why) in s.skipped.items():
        click.echo(f"skipped {n} records of source {source}: {why}", err=True)
    if not s.files:
        fail(f"{runfile}: no trigger, timestamp or log records: no SOF file written", 1)
    if s.note:
        fail(f"{runfile}: {s.note}", 1)


@main.command()
@click.option(
    "--seconds",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="How long to run.",
)
@click.option(
    "--rate",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Datagrams per second to send.",
)
@click.option(
    "--directory", default="daqd-demo-data", show_default=True, help="Where run files go."
)
@click.option(
    "--max-run-mb",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="A run whose file nears this size (MB, 10^6 bytes) is ended.",
)
def demo(seconds: float, rate: int, directory: str, max_run_mb: float) -> None:
    """Run a bundled config with its control socket, a built-in UDP traffic source, a rate
    table and bounded run files."""
    from daqd.demo import bound_problem, run_demo
    from daqd.logs import setup_logging

    max_run_bytes = int(max_run_mb * 1e6)
    problem = bound_problem(rate, max_run_bytes)
    if problem:
        raise click.UsageError(problem)
    setup_logging("WARNING")
    try:
        run_loop(run_demo(seconds, rate, directory, max_run_bytes))
    except DaqdError as exc:
        fail(str(exc), 1)


class _SimGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SIM_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = SIM_COMMANDS.get(cmd_name)
        if module is None:
            return None
        try:
            command: click.Command = importlib.import_module(module).command
        except ImportError as exc:
            fail(f"simulator {cmd_name!r} is not available: {exc}")
        return command


@main.group(cls=_SimGroup)
def sim() -> None:
    """Real peers for demos and tests: a TARGET-module source, a DCSS server, a CDTP sender."""


main.add_command(importlib.import_module("daqd.packetstream").send_packets_command)

if __name__ == "__main__":
    main()
