"""Drives the real saturnin 0.10.0 ICCP classes for daqd's Saturnin interop tests.

Runs inside the peer venv (.venv-peers/saturnin), never imports daqd. Usage:
    python saturnin_peer.py control < JSON settings, then commands on stdin, one per line
    python saturnin_peer.py encode  (prints frames saturnin's own encoder makes, as hex)
    python saturnin_peer.py decode  (hex frames in, one JSON list per line: what saturnin parses)
    python saturnin_peer.py bare-race TOY.cfg N  (saturnin's warm_up on an ipc controller, N times)
    python saturnin_peer.py fbdp-encode / fbdp-decode  (the same for FBDP, the data pipe)
    python saturnin_peer.py service ADDRESS JSON  (a broken service, for daqd's error paths)

`control` is Saturnin's controller side, as its ThreadController does it: a PairChannel with an
ICCPController bound on {"address": "ipc://..."}; it starts {"command": [...]} (the string
"{controller}" in it becomes the address) with stdout/stderr to {"log": path}, waits up to
{"ready_timeout_ms"} for the first message and prints it as JSON. Then each stdin line is a command,
answered with one JSON line:
    conf <json>   REQUEST CONF with a firebird.base ConfigProto of these options (strings, ints,
                  bools, floats; {"$uuid": hex} for a UUID), in saturnin's own 2-frame form
                  (request_config_msg) or, with {"form": "spec", "options": {...}}, the specified
                  3-frame form [type, b"CONF", ConfigProto]; prints the reply
    raw <json>    send these hex frames as they are; prints the reply
    stop          STOP, wait up to {"stop_timeout_ms"} for FINISHED/ERROR; prints it and the
                  command's exit code, then exits
    recv          wait for a message the command sends by itself (FINISHED after SIGTERM); prints
                  it and the command's exit code, then exits
    exit          wait for the command to exit by itself; prints its exit code, then exits
A reply is {"type": "OK"|"ERROR"|"FINISHED"|..., ...} or {"invalid": true, "reason": ...} when
saturnin's parser or the controller's session rules refused it, or {"timeout": true}.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import uuid
from typing import Any

import zmq
from firebird.base import protobuf
from firebird.base.config import PROTO_CONFIG
from saturnin.base import INVALID, ChannelManager, Direction, PairChannel, ZMQAddress
from saturnin.protocol.iccp import ICCPController, ICCPMessage, MsgType


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def describe(msg: Any, stop_errors: list[str]) -> dict[str, Any]:
    if msg is INVALID:
        return {"invalid": True, "reason": stop_errors[-1] if stop_errors else ""}
    d: dict[str, Any] = {"type": msg.msg_type.name}
    if msg.msg_type is MsgType.READY:
        peer = msg.peer
        d["peer"] = {
            "uid": peer.uid.hex,
            "pid": peer.pid,
            "host": peer.host,
            "supplement": peer.supplement,
        }
        d["endpoints"] = {k: [str(a) for a in v] for k, v in msg.endpoints.items()}
    elif msg.msg_type is MsgType.ERROR:
        d["error"] = msg.error
    elif msg.msg_type is MsgType.FINISHED:
        d["outcome"] = msg.outcome.value
        d["details"] = list(msg.details)
    return d


def config_proto(options: dict[str, Any]) -> Any:
    """A ConfigProto as firebird-base's Config.save_proto fills it (Value kinds per type)."""
    proto = protobuf.create_message(PROTO_CONFIG)
    for name, value in options.items():
        v = proto.options[name]
        if isinstance(value, dict) and "$uuid" in value:
            v.as_bytes = uuid.UUID(value["$uuid"]).bytes
        elif isinstance(value, bool):
            v.as_bool = value
        elif isinstance(value, int):
            v.as_sint64 = value
        elif isinstance(value, float):
            v.as_double = value
        else:
            v.as_string = str(value)
    return proto


def control(settings: dict[str, Any]) -> int:
    stop_errors: list[str] = []
    mngr = ChannelManager(zmq.Context.instance())
    iccp = ICCPController()

    def on_stop_controller(exc: Exception) -> None:  # the signature saturnin's event checks
        stop_errors.append(repr(exc))

    iccp.on_stop_controller = on_stop_controller
    chn: PairChannel = mngr.create_channel(
        PairChannel,
        "daqd.iccp",
        iccp,
        wait_for=Direction.IN,
        sock_opts={"rcvhwm": 5, "sndhwm": 5},
    )
    mngr.warm_up()
    address = ZMQAddress(settings["address"])
    chn.bind(address)
    argv = [a.replace("{controller}", str(address)) for a in settings["command"]]
    with open(settings["log"], "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:

        def reply(timeout_ms: int) -> dict[str, Any]:
            if chn.wait(timeout_ms) != Direction.IN:
                return {"timeout": True, "running": proc.poll() is None}
            return describe(chn.receive(), stop_errors)

        out({"pid": proc.pid, **reply(settings.get("ready_timeout_ms", 20000))})
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "conf":
                spec = json.loads(arg)
                if spec.get("form") == "spec":
                    proto = config_proto(spec["options"])
                    chn.send_zmsg([struct.pack("!H", 2), b"CONF", proto.SerializeToString()])
                else:
                    msg: ICCPMessage = iccp.request_config_msg()
                    msg.config = config_proto(spec["options"])
                    chn.send(msg, chn.session)
                out(reply(settings.get("reply_timeout_ms", 10000)))
            elif cmd == "raw":
                chn.send_zmsg([bytes.fromhex(h) for h in json.loads(arg)])
                out(reply(settings.get("reply_timeout_ms", 10000)))
            elif cmd == "stop":
                chn.send(iccp.stop_msg(), chn.session)
                answer = reply(settings.get("stop_timeout_ms", 30000))
                try:
                    answer["exit_code"] = proc.wait(settings.get("exit_timeout_s", 30))
                except subprocess.TimeoutExpired:
                    answer["exit_code"] = None
                out(answer)
                return 0
            elif cmd == "recv":
                answer = reply(settings.get("stop_timeout_ms", 30000))
                try:
                    answer["exit_code"] = proc.wait(settings.get("exit_timeout_s", 30))
                except subprocess.TimeoutExpired:
                    answer["exit_code"] = None
                out(answer)
                return 0
            elif cmd == "exit":
                try:
                    out({"exit_code": proc.wait(settings.get("exit_timeout_s", 30))})
                except subprocess.TimeoutExpired:
                    out({"exit_code": None})
                return 0
            else:
                out({"unknown_command": cmd})
        return 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mngr.shutdown(forced=True)


def encode() -> int:
    """Frames saturnin's own encoder makes, one JSON object per line: {"name", "frames": [hex]}."""
    from firebird.base.config import Config, FloatOption, IntOption, StrOption, UUIDOption
    from saturnin.base import Outcome, PeerDescriptor
    from saturnin.protocol.iccp import ICCPComponent

    class Conf(Config):
        def __init__(self) -> None:
            super().__init__("svc")
            self.agent = UUIDOption("agent", "agent")
            self.logging_id = StrOption("logging_id", "logging id")
            self.n = IntOption("n", "a signed number", signed=True)
            self.big = IntOption("big", "an unsigned number")
            self.x = FloatOption("x", "a float")

    comp, ctl = ICCPComponent(), ICCPController()
    peer = PeerDescriptor(
        uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"), 6875, "vm", {"name": "toy", "n": 3}
    )
    endpoints = {"input": [ZMQAddress("inproc://toy-input"), ZMQAddress("tcp://127.0.0.1:36141")]}
    conf = Conf()
    conf.agent.value = uuid.UUID(int=5)
    conf.logging_id.value = "toylog"
    conf.n.value = -5
    conf.big.value = 2**64 - 1
    conf.x.value = 1.5
    # Each protocol object reuses one message (saturnin's _ICCP): encode each one at once.
    made = {
        "ready": lambda: comp.ready_msg(peer, endpoints),
        "request": lambda: ctl.request_config_msg(conf),
        "request_empty": lambda: ctl.request_config_msg(),
        "error": lambda: comp.error_msg(ValueError("bad thing")),
        "finished_ok": lambda: comp.finished_msg(Outcome.OK, ["line one", "line two"]),
        "finished_repr": lambda: ICCPComponent(with_traceback=False).finished_msg(
            Outcome.ERROR, ValueError("boom")
        ),
        "stop": lambda: ctl.stop_msg(),
        "ok": lambda: comp.ok_msg(),
    }
    for name, make in made.items():
        out({"name": name, "frames": [bytes(f).hex() for f in make().as_zmsg()]})
    return 0


def service(address: str, settings: dict[str, Any]) -> int:
    """What a Saturnin service is not, for daqd's error paths (saturnin services themselves run
    through daqd's launcher, tests/saturnin_toy.py): with {"bad_ready": true} a READY saturnin
    could not parse, then it waits; with {"silent": true} nothing at all."""
    ctx = zmq.Context.instance()
    pair = ctx.socket(zmq.PAIR)
    pair.connect(address)
    if settings.get("bad_ready"):
        pair.send_multipart([struct.pack("!H", 1), b"\x0a\x03abc", b""])
    pair.poll(60000)  # until daqd sends STOP
    return 0


def decode() -> int:
    for line in sys.stdin:
        frames = [bytes.fromhex(h) for h in json.loads(line)]
        msg = ICCPMessage()
        try:
            msg.from_zmsg(frames)
        except Exception as exc:
            out({"invalid": True, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        d = describe(msg, [])
        if msg.msg_type is MsgType.REQUEST:
            d["request"] = msg.request.name
            d["config"] = {k: str(v).strip() for k, v in msg.config.options.items()}
        out(d)
    return 0


def fbdp_encode() -> int:
    """FBDP frames saturnin's own FBDPMessage makes, one JSON object per line: {"name", "frames"}."""
    from firebird.base.protobuf import create_message, dict2struct
    from saturnin.protocol.fbdp import (
        PROTO_ERROR,
        PROTO_OPEN,
        ErrorCode,
        FBDPMessage,
        MsgFlag,
        MsgType,
    )

    def make(kind: Any, type_data: int = 0, flags: Any = MsgFlag.NONE, frame: Any = None) -> Any:
        msg = FBDPMessage()
        msg.msg_type, msg.type_data, msg.flags, msg.data_frame = kind, type_data, flags, frame
        return msg

    opened = create_message(PROTO_OPEN)
    opened.data_pipe, opened.pipe_socket, opened.data_format = "words", 2, "text/plain"
    opened.parameters.CopyFrom(dict2struct({"charset": "utf-8", "n": 3}))
    err = create_message(PROTO_ERROR)
    err.code, err.description = 5, "bad data"
    err.context.CopyFrom(dict2struct({"line": 7}))
    close = make(MsgType.CLOSE, ErrorCode.INVALID_DATA, frame=[err])
    close.note_exception(RuntimeError("second"))
    made = {
        "open": make(MsgType.OPEN, frame=opened),
        "ready": make(MsgType.READY, 50),
        "ready_zero": make(MsgType.READY, 0),
        "noop_ack_req": make(MsgType.NOOP, flags=MsgFlag.ACK_REQ),
        "data": make(MsgType.DATA, 7, frame=b"hello"),
        "data_ack_req": make(MsgType.DATA, 65535, MsgFlag.ACK_REQ, b""),
        "data_ack_reply": make(MsgType.DATA, 9, MsgFlag.ACK_REPLY),
        "close_ok": make(MsgType.CLOSE, ErrorCode.OK, frame=[]),
        "close_error": close,
    }
    for name, msg in made.items():
        out({"name": name, "frames": [bytes(f).hex() for f in msg.as_zmsg()]})
    return 0


def fbdp_decode() -> int:
    """Hex frames in, one JSON object per line: what saturnin's FBDPMessage.from_zmsg makes."""
    from firebird.base.protobuf import struct2dict
    from saturnin.protocol.fbdp import FBDPMessage, MsgType

    for line in sys.stdin:
        msg = FBDPMessage()
        try:
            msg.from_zmsg([bytes.fromhex(h) for h in json.loads(line)])
        except Exception as exc:
            out({"invalid": True, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        d: dict[str, Any] = {"type": msg.msg_type.name, "flags": int(msg.flags)}
        d["type_data"] = int(msg.type_data)
        if msg.msg_type is MsgType.OPEN:
            f = msg.data_frame
            d["open"] = [f.data_pipe, f.pipe_socket, f.data_format, struct2dict(f.parameters)]
        elif msg.msg_type is MsgType.DATA:
            d["data"] = None if msg.data_frame is None else bytes(msg.data_frame).hex()
        elif msg.msg_type is MsgType.CLOSE:
            d["errors"] = [[e.code, e.description] for e in msg.data_frame]
        out(d)
    return 0


def bare_race(config_path: str, attempts: int) -> int:
    """The bug daqd's launcher works around: the toy service's warm_up, as saturnin runs it but
    straight on an ipc controller (a fresh PAIR bound here each time), `attempts` times. Prints
    {"attempts", "failed", "errors"}: warm_up's can_send() right after connect() is a race that
    the ipc connection mostly loses."""
    import tempfile
    from configparser import ConfigParser

    from saturnin_toy import SERVICE_DESCRIPTOR, Toy

    ctx = zmq.Context.instance()
    failed, errors = 0, set()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(attempts):
            controller = ctx.socket(zmq.PAIR)
            controller.bind(f"ipc://{tmp}/c{n}")
            config = SERVICE_DESCRIPTOR.config()
            parser = ConfigParser()
            parser.read(config_path)
            config.load_config(parser, "toy")
            svc = Toy(ctx, SERVICE_DESCRIPTOR)
            svc.initialize(config)
            try:
                svc.warm_up(ZMQAddress(f"ipc://{tmp}/c{n}"))
            except Exception as exc:
                failed += 1
                errors.add(f"{type(exc).__name__}: {exc}")
            else:
                svc.stop_activities()
                svc.release_resources()
            svc.mngr.shutdown(forced=True)
            controller.close(linger=0)
    out({"attempts": attempts, "failed": failed, "errors": sorted(errors)})
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "control":
        sys.exit(control(json.loads(sys.stdin.readline())))
    if mode == "service":
        sys.exit(service(sys.argv[2], json.loads(sys.argv[3])))
    if mode == "encode":
        sys.exit(encode())
    if mode == "decode":
        sys.exit(decode())
    if mode == "bare-race":
        sys.exit(bare_race(sys.argv[2], int(sys.argv[3])))
    if mode == "fbdp-encode":
        sys.exit(fbdp_encode())
    if mode == "fbdp-decode":
        sys.exit(fbdp_decode())
    sys.exit(f"unknown mode {mode!r}")
