"""`daqctl`: drive a running daqd over its control socket (status, runs, commands, taps).

Imports little on purpose (no pydantic, no numpy, no host): `daqctl status` must answer fast.
Every failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from daqd.control_client import DEFAULT_TIMEOUT_S, ControlClient
from daqd.endpoints import ipc_path, probe_ipc, runtime_dir
from daqd.errors import ControlError
from daqd.render import duration as _duration
from daqd.render import reasons as _reasons
from daqd.render import size as _size
from daqd.render import table as _table

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

SYSTEM_RUNTIME_DIR = Path("/run/daqd")  # where daqd@.service puts its sockets


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"daqctl: {message}", err=True)
    sys.exit(code)


# `daqctl status` exit codes, after LSB init scripts' status action (as systemctl status uses):
EXIT_OK = 0  # running; state neither SAFE nor ERROR; every receiver running
EXIT_NOT_RUNNING = 3  # no control socket, a stale one, or no daemon of that name
EXIT_UNKNOWN = 1  # the daemon could not be asked (permission, no reply in time, bad reply)
EXIT_STATE = 150  # running, in state SAFE or ERROR
EXIT_RECEIVER = 151  # running, but a receiver failed or is restarting
_NOT_RUNNING = ("no daemon", "no daqd running")


def status_exit_code(st: dict[str, Any]) -> int:
    """What `daqctl status` exits with for this snapshot (EXIT_* above)."""
    if str(st.get("state")) in ("SAFE", "ERROR"):
        return EXIT_STATE
    receivers = st.get("receivers") or {}
    if any(
        isinstance(r, dict) and r.get("state") in ("failed", "restarting")
        for r in receivers.values()
    ):
        return EXIT_RECEIVER
    return EXIT_OK


def _search_dirs() -> list[Path]:
    dirs = [runtime_dir()]
    if SYSTEM_RUNTIME_DIR not in dirs:
        dirs.append(SYSTEM_RUNTIME_DIR)
    return dirs


def resolve_endpoint(name: str | None, socket: str | None, down: int = 1) -> str:
    """--socket wins; else the daemon --name; else the only daemon running here.
    No daemon found: exit `down` (1; `daqctl status`: 3, not running)."""
    if socket:
        if "://" in socket:
            return socket
        return f"ipc://{Path(socket).resolve()}"
    dirs = _search_dirs()
    where = " or ".join(str(d) for d in dirs)
    if name:
        for d in dirs:
            if (d / f"{name}.ctl").exists():
                return f"ipc://{d / name}.ctl"
        fail(f"no daemon {name!r} running: no {name}.ctl in {where}", down)
    found = sorted({p for d in dirs if d.is_dir() for p in d.glob("*.ctl")})
    if not found:
        fail(f"no daqd running: no control socket in {where}", down)
    if len(found) > 1:
        names = ", ".join(p.stem for p in found)
        fail(f"several daemons running ({names}): choose one with --name")
    return f"ipc://{found[0]}"


class Ctx:
    """What the group options chose; commands ask it for a client."""

    def __init__(self, name: str | None, socket: str | None, timeout: float, keys: dict[str, Any]):
        self.name, self.socket, self.timeout, self.keys = name, socket, timeout, keys
        self.lsb = False  # `status`: exit 3 when not running (1 for any other failure)

    def fail(self, exc: ControlError) -> NoReturn:
        text = str(exc)
        if not self.lsb:
            fail(text)
        fail(text, EXIT_NOT_RUNNING if text.startswith(_NOT_RUNNING) else EXIT_UNKNOWN)

    def client(self) -> ControlClient:
        endpoint = resolve_endpoint(self.name, self.socket, EXIT_NOT_RUNNING if self.lsb else 1)
        try:
            return ControlClient(endpoint, timeout_s=self.timeout, **self.keys)
        except ControlError as exc:
            self.fail(exc)

    def request(
        self, code: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        with self.client() as client:
            try:
                return client.request(code, args, timeout_s=timeout)
            except ControlError as exc:
                self.fail(exc)


pass_ctx = click.make_pass_decorator(Ctx)


def _complete_daemons(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Daemon names: the control sockets in the runtime directories daqctl searches."""
    from click.shell_completion import CompletionItem

    names = sorted({p.stem for d in _search_dirs() if d.is_dir() for p in d.glob("*.ctl")})
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def _complete_parts(kinds: tuple[str, ...]) -> Callable[..., list[CompletionItem]]:
    """Receiver (and publisher) names, asked of the daemon the command line names (1 s at most)."""

    def complete(
        ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        from click.shell_completion import CompletionItem

        root = ctx.find_root().params
        try:
            endpoint = resolve_endpoint(root.get("name"), root.get("socket"))
            with ControlClient(endpoint, timeout_s=1.0) as client:
                st = client.request("STAT")
        except (ControlError, SystemExit):
            return []
        names = [n for k in kinds for n in (st.get(k) or {})] if isinstance(st, dict) else []
        return [CompletionItem(n) for n in names if n.startswith(incomplete)]

    return complete


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="daqd", prog_name="daqctl")
@click.option(
    "--name",
    "-n",
    envvar="DAQD_NAME",
    help="Daemon name ([daemon] name).",
    shell_complete=_complete_daemons,
)
@click.option("--socket", "-s", help="Control socket path or endpoint (ipc://, tcp://).")
@click.option(
    "--timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True, help="Reply timeout, s."
)
@click.option("--server-key", type=click.Path(dir_okay=False), help="TCP: daemon's public cert.")
@click.option("--client-key", type=click.Path(dir_okay=False), help="TCP: your secret cert.")
@click.pass_context
def main(
    ctx: click.Context,
    name: str | None,
    socket: str | None,
    timeout: float,
    server_key: str | None,
    client_key: str | None,
) -> None:
    """Control a running daqd: status, runs, receiver commands, live taps."""
    keys = {"server_public_key_file": server_key, "client_key_file": client_key}
    ctx.obj = Ctx(name, socket, timeout, keys)


# ----- status -------------------------------------------------------------------------------


def _where(addresses: Any) -> str:
    if not isinstance(addresses, dict):
        return ""
    return " ".join(f"{k}={v}" for k, v in addresses.items())


def render_status(st: dict[str, Any]) -> str:
    """The status snapshot as a short header and one table row per receiver and publisher."""
    now_ns = time.time_ns()
    since = st.get("state_since_ns")
    state = str(st.get("state", "?"))
    if isinstance(since, int):
        state += f" for {_duration((now_ns - since) / 1e9)}"
    lines = [
        f"daqd {st.get('name', '?')} (pid {st.get('pid', '?')}): {state}, "
        f"up {_duration(float(st.get('uptime_s') or 0))}"
    ]
    run = st.get("run")
    if isinstance(run, dict):
        started = run.get("time_start")
        age = f" for {_duration((now_ns - started) / 1e9)}" if isinstance(started, int) else ""
        lines.append(f"run {run.get('run_id')}: running{age}")
    last = st.get("last_run")
    if isinstance(last, dict):
        records = last.get("records") or {}
        total = sum(records.values()) if isinstance(records, dict) else 0
        lines.append(f"last run {last.get('run_id')}: {last.get('condition')}, {total} records")
    if st.get("allowed"):
        lines.append("allowed: " + ", ".join(st["allowed"]))
    control = st.get("control")
    if isinstance(control, dict):
        problems = [
            f"{control[key]} {label}"
            for key, label in (
                ("refused", "refused"),
                ("bad_messages", "malformed"),
                ("oversize", "oversize"),
                ("unknown_codes", "unknown code"),
                ("internal_errors", "internal errors"),
                ("busy", "busy"),
                ("connections_cut", "connections cut (oversize)"),
                ("curve_rejected", "CURVE clients rejected"),
                ("handshakes_failed", "handshakes failed"),
            )
            if control.get(key)
        ]
        if problems:
            total = control.get("requests", 0)
            lines.append(f"control socket: {total} requests; " + ", ".join(problems))
    head = ["", "TYPE", "STATE", "RECORDS", "RATE/s", "BYTES", "DROPS", "ERRORS", "ADDRESSES"]
    for kind in ("receivers", "publishers"):
        parts = st.get(kind) or {}
        if not parts:
            continue
        rows = [[kind.upper()[:-1], *head[1:]]]
        for name, c in parts.items():
            if kind == "publishers":
                state = f"queue {c.get('queue', 0)}/{c.get('queue_size', '?')}"
            else:
                state = str(c.get("state", ""))
            rows.append(
                [
                    str(name),
                    str(c.get("type", "")),
                    state,
                    f"{c.get('records', 0):,}",
                    f"{c.get('rate_hz', 0):,.1f}",
                    _size(c.get("bytes", 0)),
                    _reasons(c.get("drops")),
                    _reasons(c.get("errors")),
                    _where(c.get("addresses")),
                ]
            )
        lines.append("")
        lines.extend(_table(rows, right=(3, 4, 5)))
        for name, c in parts.items():
            if c.get("last_error"):
                lines.append(f"  {name}: last error: {c['last_error']}")
    return "\n".join(lines)


def _json(value: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, bytes | bytearray | memoryview):
            return bytes(o).hex()
        return repr(o)

    return json.dumps(value, indent=2, default=default)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON.")
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """State, run, uptime, and counters and rates per receiver and publisher.

    Exits as LSB init scripts' status does: 0 all well; 3 not running; 1 cannot be asked (as
    every other daqctl failure); 150 in state SAFE or ERROR; 151 a receiver failed or is
    restarting.
    """
    c.lsb = True
    st = c.request("STAT")
    click.echo(_json(st) if as_json else render_status(st))
    sys.exit(status_exit_code(st if isinstance(st, dict) else {}))


@main.command()
@click.option("--count", type=int, default=0, help="Stop after this many refreshes (0: never).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between.")
@pass_ctx
def watch(c: Ctx, count: int, interval: float) -> None:
    """Status, refreshed every second, until Ctrl-C."""
    shown = 0
    try:
        with c.client() as client:
            while True:
                try:
                    st = client.request("STAT")
                except ControlError as exc:
                    fail(str(exc))
                stamp = time.strftime("%H:%M:%S")
                click.echo("\x1b[H\x1b[2J" if sys.stdout.isatty() else "", nl=False)
                click.echo(f"{stamp}  every {interval:g} s, Ctrl-C to quit\n{render_status(st)}")
                shown += 1
                if count and shown >= count:
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


# ----- runs and configuration -----------------------------------------------------------------


@main.command()
@click.argument("run_id", required=False)
@pass_ctx
def start(c: Ctx, run_id: str | None) -> None:
    """Begin a run (RUN_ID defaults to a timestamp)."""
    args = {"run_id": run_id} if run_id else {}
    result = c.request("CTRL", {"transition": "start", "args": args}, timeout=max(c.timeout, 30))
    run = (c.request("STAT").get("run") or {}).get("run_id", run_id)
    click.echo(f"run {run} started; state {_state(result)}")


@main.command()
@pass_ctx
def stop(c: Ctx) -> None:
    """End the run: publishers get end_run with its condition."""
    result = c.request("CTRL", {"transition": "stop"}, timeout=max(c.timeout, 60))
    last = result.get("run") if isinstance(result, dict) else None
    if not isinstance(last, dict):
        last = c.request("STAT").get("last_run") or {}
    click.echo(render_run_end(last, f"; state {_state(result)}"))


def render_run_end(run: dict[str, Any], suffix: str = "") -> str:
    """`run ID ended: CONDITION, N records`; for a run that is not GOOD, the counts behind it."""
    records = run.get("records") or {}
    total = sum(records.values()) if isinstance(records, dict) else 0
    line = f"run {run.get('run_id')} ended: {run.get('condition')}, {total} records{suffix}"
    if run.get("condition") == "GOOD":
        return line
    accounting = run.get("accounting") or {}
    for name, p in sorted((accounting.get("publishers") or {}).items()):
        drops = p.get("drops") or {}
        dropped = ", ".join(f"{n} {k}" for k, n in sorted(drops.items()))
        line += (
            f"\n  publisher {name}: offered {p.get('offered')}, delivered {p.get('delivered')}"
            + (f", dropped {dropped}" if dropped else "")
        )
    for reason in run.get("reasons") or []:
        line += f"\n  why: {reason}"
    return line


@main.command()
@click.argument("transition")
@pass_ctx
def transition(c: Ctx, transition: str) -> None:
    """Any other state transition: launch, land, interrupt, recover, reset, initialize."""
    result = c.request("CTRL", {"transition": transition}, timeout=max(c.timeout, 60))
    click.echo(f"state {_state(result)}")


def _state(result: Any) -> str:
    return str(result.get("state") if isinstance(result, dict) else result)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@pass_ctx
def reconfigure(c: Ctx, config: str) -> None:
    """Apply CONFIG to the running daemon; it is validated first, on error nothing changes."""
    try:
        text = Path(config).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {config}: {exc}")
    result = c.request(
        "CONF", {"config": text, "path": os.path.abspath(config)}, timeout=max(c.timeout, 60)
    )
    changed = result.get("changed") if isinstance(result, dict) else None
    click.echo("changed: " + ", ".join(changed) if changed else "nothing changed")


@main.command()
@click.option("--timeout", "wait", type=float, default=120.0, show_default=True, help="Seconds.")
@pass_ctx
def shutdown(c: Ctx, wait: float) -> None:
    """Stop the daemon: end the run, drain every queue, exit."""
    with c.client() as client:
        try:
            finished = client.stop(timeout_s=wait)
        except ControlError as exc:
            fail(str(exc))
    details = "; ".join(finished.details)
    click.echo(f"finished: {finished.outcome.value}" + (f" ({details})" if details else ""))
    if finished.outcome.value != "OK":
        sys.exit(1)


# ----- receiver commands ----------------------------------------------------------------------


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_command_args(words: tuple[str, ...]) -> tuple[list[Any], dict[str, Any]]:
    """`1 2.5 name=x flag=true "[1,2]"` → ([1, 2.5, [1, 2]], {"name": "x", "flag": True})."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if eq and key.isidentifier():
            kwargs[key] = _value(value)
        else:
            args.append(_value(word))
    return args, kwargs


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("receiver", shell_complete=_complete_parts(("receivers",)))
@click.argument("name")
@click.argument("words", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def cmd(c: Ctx, receiver: str, name: str, words: tuple[str, ...], as_json: bool) -> None:
    """Call RECEIVER's cmd_NAME with ARGS (JSON values where they parse; key=value: keywords)."""
    args, kwargs = parse_command_args(words)
    result = c.request(
        "CMD ",
        {"target": receiver, "name": name, "args": args, "kwargs": kwargs},
        timeout=max(c.timeout, 30),
    )
    if as_json or not isinstance(result, str):
        click.echo(_json(result))
    else:
        click.echo(result)


# ----- live tap -------------------------------------------------------------------------------


def _records(
    endpoint: str, name: str, alive: Callable[[], bool]
) -> Iterator[tuple[dict[str, Any], list[bytes]]]:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)
    topic = name.encode()
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    try:
        while True:
            if not sock.poll(1000):
                if not alive():
                    fail("the daemon has gone away")
                continue
            frames = sock.recv_multipart()
            if len(frames) < 2 or frames[0] != topic:  # subscriptions match prefixes
                continue
            try:
                header = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
            except Exception:
                header = {"source": name, "bad_header": frames[1][:32].hex()}
            yield header, frames[2:]
    finally:
        sock.close(linger=0)
        ctx.term()


def _describe(header: dict[str, Any], payload: list[bytes]) -> str:
    t = header.get("time_ns")
    when = ""
    if isinstance(t, int):
        when = time.strftime("%H:%M:%S", time.localtime(t / 1e9)) + f".{t % 10**9 // 1000:06d}"
    nbytes = sum(len(b) for b in payload)
    head = payload[0][:16].hex(" ") if payload and payload[0] else ""
    tags = header.get("tags") or {}
    tag_text = " " + json.dumps(tags, default=repr, separators=(",", ":")) if tags else ""
    return (
        f"{when} {header.get('source')} #{header.get('seq')} {nbytes} B in {len(payload)} "
        f"block(s){tag_text}" + (f"  {head}" if head else "")
    )


@main.command()
@click.argument("name", shell_complete=_complete_parts(("receivers", "publishers")))
@click.option("--count", type=int, default=0, help="Stop after N records (0: until Ctrl-C).")
@click.option("--raw", is_flag=True, help="Write the payload bytes to stdout, nothing else.")
@pass_ctx
def tap(c: Ctx, name: str, count: int, raw: bool) -> None:
    """Print records live as receiver or publisher NAME sees them."""
    taps = c.request("TAPS")
    endpoint = taps.get("tap") if isinstance(taps, dict) else None
    if not endpoint:
        fail("this daemon has no live tap")
    names = taps.get("names") or []
    if names and name not in names:
        fail(f"nothing named {name!r} to tap; known: {', '.join(names)}")
    path = ipc_path(endpoint)
    if path is not None:
        if not path.exists():
            fail(f"tap socket {path} does not exist")
        # ZeroMQ would retry a connection it may not make, silently and for ever: ask first.
        try:
            probe_ipc(path)
        except ControlError as exc:
            fail(f"cannot tap {name}: {exc}")
    write: Callable[[bytes], Any] = sys.stdout.buffer.write
    seen = 0
    try:
        control = ipc_path(resolve_endpoint(c.name, c.socket))

        def alive() -> bool:
            if control is None:
                return True
            try:
                probe_ipc(control)  # also notices a daemon that died without cleaning up
            except ControlError:
                return False
            return True

        for header, payload in _records(endpoint, name, alive):
            if raw:
                for block in payload:
                    write(block)
                sys.stdout.buffer.flush()
            else:
                click.echo(_describe(header, payload))
            seen += 1
            if count and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
