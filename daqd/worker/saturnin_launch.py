"""Start one Saturnin micro-service under an ICCP controller at an ipc:// or tcp:// address.

Run with the Python that has saturnin installed (it never imports daqd, so that venv needs no
daqd; the `saturnin` receiver passes this file's path):

    python saturnin_launch.py --controller ipc:///run/daqd/x.sat --service SERVICE
                              [--config FILE.cfg] [--section NAME]

SERVICE is `module:ATTRIBUTE` naming a ServiceDescriptor, or the name or uid of a service that
an installed package registers under the `saturnin.service` entry points (saturnin-core's
`saturnin.text.reader`, for one). FILE.cfg is Saturnin's own configuration file (INI, with
${env:NAME} interpolation); the service's options are read from section NAME (default: the name
of the descriptor's configuration, as Saturnin's own runners use it).

Why this file exists: saturnin 0.10.0's `MicroService.warm_up()` connects its control PAIR and at
once checks `can_send()` with a 0 ms timeout. Over ipc or tcp the connection is not up yet, the
check fails, and the service raises "Broken component control channel" before it sends anything;
only an inproc peer bound beforehand passes (Saturnin's own runners always use inproc). So the
service's control channel is pointed at an inproc PAIR bound here, and a thread relays every
message, frame for frame and unchanged, between it and the controller's address. When the
service can not even be built (unknown service, bad configuration), this launcher sends the ICCP
ERROR itself, so the controller gets a reason rather than silence. If the controller's process
dies (this process's parent changes), the service is sent STOP, so it ends its work as usual
instead of running on unwatched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import struct
import sys
import threading
import traceback
import uuid
from importlib.metadata import entry_points
from typing import Any

# Run as a script, this file's folder (daqd/worker/) leads sys.path, and its saturnin.py would
# shadow the saturnin package: it is taken off before anything is imported from there.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import zmq

ERROR = struct.pack("!H", 4)  # ICCP ERROR, followed by one UTF-8 text frame
STOP = struct.pack("!H", 5)
DRAIN_MS = 5000  # after the service ended: how long its last messages may take to leave


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def find_descriptor(spec: str) -> Any:
    """The ServiceDescriptor `spec` names: module:ATTRIBUTE, or a registered name or uid."""
    if ":" in spec:
        return _load(spec)
    known = []
    for entry in entry_points(group="saturnin.service"):
        try:
            descriptor = entry.load()
        except Exception as exc:  # another package's broken service must not hide this one
            known.append(f"{entry.value} (cannot load: {type(exc).__name__})")
            continue
        agent = descriptor.agent
        if spec in (agent.name, str(agent.uid), agent.uid.hex, entry.name):
            return descriptor
        known.append(agent.name)
    names = ", ".join(sorted(known)) or "none is installed"
    raise LookupError(f"no Saturnin service {spec!r} is installed (installed: {names})")


def build(spec: str, config_file: str | None, section: str | None) -> Any:
    """The service, made and initialized as Saturnin's own controllers do it."""
    from configparser import ConfigParser

    from firebird.base.config import EnvExtendedInterpolation

    descriptor = find_descriptor(spec)
    config = descriptor.config()
    if config_file is not None:
        parser = ConfigParser(interpolation=EnvExtendedInterpolation())
        if not parser.read(config_file):
            raise FileNotFoundError(f"cannot read the service configuration {config_file!r}")
        config.load_config(parser, section)
    config.validate()
    factory = descriptor.factory
    if isinstance(factory, str):
        factory = _load(factory)
    service = factory(zmq.Context.instance(), descriptor, peer_uid=uuid.uuid1())
    service.initialize(config)
    return service


class Relay:
    """Frames both ways between an inproc PAIR (the service's controller) and the real one."""

    def __init__(self, controller: str) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.inner = ctx.socket(zmq.PAIR)
        self.address = f"inproc://daqd-saturnin-{os.getpid()}-{uuid.uuid4().hex}"
        self.inner.bind(self.address)
        self.outer = ctx.socket(zmq.PAIR)
        self.outer.setsockopt(zmq.SNDTIMEO, DRAIN_MS)
        self.outer.connect(controller)
        self.done = threading.Event()
        self.orphaned = False  # the controller's process is gone: nobody to send to
        self.thread = threading.Thread(target=self._run, name="iccp-relay", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inner, zmq.POLLIN)
        poller.register(self.outer, zmq.POLLIN)
        parent = os.getppid()  # the controller, which started this process
        while True:
            events = dict(poller.poll(100))
            if self.inner in events:
                self._up(self.inner.recv_multipart(copy=False))
            if self.outer in events:
                self._down(self.outer.recv_multipart(copy=False))
            if not self.orphaned and os.getppid() != parent:
                self.orphaned = True  # the controller died: the service stops, not lingers
                self._down([STOP])
            if self.done.is_set() and not events:
                with contextlib.suppress(zmq.Again):  # what the service sent last (FINISHED)
                    while True:
                        self._up(self.inner.recv_multipart(zmq.NOBLOCK))
                return

    def _up(self, frames: list[Any]) -> None:
        if self.orphaned:
            return
        with contextlib.suppress(zmq.Again):  # a controller gone for DRAIN_MS reads nothing
            self.outer.send_multipart(frames, copy=False)

    def _down(self, frames: list[Any]) -> None:
        with contextlib.suppress(zmq.Again):  # a service already gone reads nothing
            self.inner.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def error(self, text: str) -> None:
        """An ICCP ERROR to the controller, from here (the relay is not running)."""
        self._up([ERROR, text.encode("utf-8", "replace")])

    def finish(self) -> None:
        """Once the service has ended: pass on what it left, then let it leave the host."""
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        self.inner.close(linger=0)
        self.outer.close(linger=0 if self.orphaned else DRAIN_MS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="saturnin_launch.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--controller", required=True, help="the ICCP controller's address")
    parser.add_argument("--service", required=True, help="module:ATTRIBUTE, or a service name")
    parser.add_argument("--config", help="the service's Saturnin configuration file")
    parser.add_argument("--section", help="its section (default: the configuration's name)")
    args = parser.parse_args(argv)
    relay = Relay(args.controller)
    try:
        service = build(args.service, args.config, args.section)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        print(f"saturnin_launch: cannot make service {args.service!r}: {reason}", file=sys.stderr)
        traceback.print_exc()
        relay.error(f"cannot make service {args.service!r}\n{reason}")
        relay.finish()
        return 1
    relay.start()
    code = 0
    try:
        service.warm_up(relay.address)  # READY, or ERROR and a raise
        service.run()  # until STOP: FINISHED, or ERROR when its loop fails
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        relay.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
