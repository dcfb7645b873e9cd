"""A small saturnin 0.10.0 MicroService for daqd's tests, started by daqd's own launcher
(daqd/worker/saturnin_launch.py --service tests.saturnin_toy:SERVICE_DESCRIPTOR).

Runs inside the peer venv, never imports daqd. It binds a PUSH, announces it in READY as endpoint
"output", and sends `count` messages [b"toy", n (8 bytes big-endian)], one every `interval_ms`.
Its options come from a Saturnin configuration file, section [toy]:
    fail = yes         its start fails (saturnin sends ERROR instead of READY)
    fail_stop = yes    its stop fails (saturnin sends ERROR, no FINISHED)
    stall_stop_s = N   its stop takes N seconds (FINISHED comes late)
    inject = JSON      lists of hex frames it sends on its own control channel right after READY
    pipe_frames = JSON lists of hex frames it sends, as they are, on a DEALER it binds and
                       announces as endpoint "pipe", once a client has sent something there
                       (a data pipe server that speaks FBDP as badly as the test wants)
What it sent is written to `report` (JSON) when it stops.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from functools import partial

import zmq
from firebird.base.config import BoolOption, IntOption, StrOption
from saturnin.base import (
    AgentDescriptor,
    ComponentConfig,
    ServiceDescriptor,
    ZMQAddress,
    create_config,
)
from saturnin.component.micro import SVC_CTRL, MicroService


class ToyConfig(ComponentConfig):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.count = IntOption("count", "messages to send", default=0)
        self.interval_ms = IntOption("interval_ms", "between two messages", default=1)
        self.report = StrOption("report", "where to write what was sent", required=True)
        self.fail = BoolOption("fail", "fail to start", default=False)
        self.fail_stop = BoolOption("fail_stop", "fail to stop", default=False)
        self.stall_stop_s = IntOption("stall_stop_s", "seconds stopping takes", default=0)
        self.inject = StrOption("inject", "JSON: frames (hex) sent after READY", default="[]")
        self.pipe_frames = StrOption("pipe_frames", "JSON: frames (hex) for a client", default="")


class Toy(MicroService):
    def initialize(self, config: ToyConfig) -> None:
        super().initialize(config)
        self.cfg = config
        self.sent = 0

    def aquire_resources(self) -> None:
        if self.cfg.fail.value:
            raise RuntimeError("toy cannot start: no detector attached")
        self.out = zmq.Context.instance().socket(zmq.PUSH)
        self.out.bind("tcp://127.0.0.1:*")
        self.endpoints["output"] = [ZMQAddress(self.out.getsockopt_string(zmq.LAST_ENDPOINT))]
        self.pipe = None
        if self.cfg.pipe_frames.value:
            self.pipe = zmq.Context.instance().socket(zmq.DEALER)
            self.pipe.bind("tcp://127.0.0.1:*")
            self.endpoints["pipe"] = [ZMQAddress(self.pipe.getsockopt_string(zmq.LAST_ENDPOINT))]

    def start_activities(self) -> None:
        self.schedule(self.inject, 0)  # runs in run(), after READY has left
        self.schedule(self.tick, self.cfg.interval_ms.value)
        if self.pipe is not None:
            self.schedule(self.serve_pipe, 1)

    def serve_pipe(self) -> None:
        if not self.pipe.poll(0):
            self.schedule(self.serve_pipe, 1)
            return
        self.pipe.recv_multipart()  # the client's OPEN, whatever it is
        for frames in json.loads(self.cfg.pipe_frames.value):
            self.pipe.send_multipart([bytes.fromhex(h) for h in frames])

    def inject(self) -> None:
        control = self.mngr.channels[SVC_CTRL]
        for frames in json.loads(self.cfg.inject.value):
            control.send_zmsg([bytes.fromhex(h) for h in frames])

    def tick(self) -> None:
        if self.sent < self.cfg.count.value:
            self.out.send_multipart([b"toy", struct.pack(">Q", self.sent)])
            self.sent += 1
            self.schedule(self.tick, self.cfg.interval_ms.value)

    def stop_activities(self) -> None:
        with open(self.cfg.report.value, "w") as f:
            json.dump({"sent": self.sent, "pid": os.getpid()}, f)
        if self.cfg.fail_stop.value:
            raise RuntimeError("toy cannot park the motor")
        time.sleep(self.cfg.stall_stop_s.value)

    def release_resources(self) -> None:
        self.out.close(linger=5000)
        if self.pipe is not None:
            self.pipe.close(linger=5000)


AGENT = AgentDescriptor(
    uid=uuid.UUID("11111111-2222-3333-4444-555555555555"),
    name="toy",
    version="1.0",
    vendor_uid=uuid.UUID("11111111-2222-3333-4444-000000000000"),
    classification="test/toy",
)
SERVICE_DESCRIPTOR = ServiceDescriptor(
    agent=AGENT,
    api=[],
    description="daqd test service",
    facilities=[],
    factory="tests.saturnin_toy:Toy",
    config=partial(create_config, ToyConfig, AGENT.uid, "toy"),
)
