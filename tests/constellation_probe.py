"""A scripted CHIRP/CSCP/CHP client run inside a test's network namespace (with daqd's python).

tests/test_constellation.py sends one JSON command a line on stdin; each gets one JSON line back.
It speaks through daqd's own codecs: the interop with the real Constellation is the other test's
job; this one looks at what a controller cannot easily show (beacon timing, DEPART, the registry,
every heartbeat and extrasystole).
"""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
import time
from typing import Any

import msgpack
import zmq

from daqd.errors import ProtocolError
from daqd.protocols import chirp, chp, cscp


class FakeSatellite:
    """Heartbeats of a made-up satellite, from a thread that owns its XPUB socket."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], name: str, interval_ms: int) -> None:
        self.name = name
        self.interval_ms = interval_ms
        self.state = 0x30
        self.flags = 6
        self.sending = True
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while True:
            if self.sending:
                stamp = msgpack.Timestamp.from_unix_nano(time.time_ns())
                hb = chp.Heartbeat(self.name, stamp, self.state, self.flags, self.interval_ms)
                self.sock.send_multipart(chp.encode(hb))
            time.sleep(self.interval_ms * 0.8 / 1000)


class Probe:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.udp: socket.socket | None = None
        self.sub: zmq.Socket[bytes] | None = None
        self.fakes: dict[str, FakeSatellite] = {}

    def fake(
        self, name: str, group: str, interval_ms: int, flags: int, state: int
    ) -> dict[str, Any]:
        """A satellite that only beats, announced by CHIRP."""
        fake = FakeSatellite(self.ctx, name, interval_ms)
        fake.flags, fake.state = flags, state
        self.fakes[name] = fake
        self.send("OFFER", "HEARTBEAT", fake.port, name, group)
        return {"port": fake.port}

    def fake_set(self, name: str, state: int | None = None, sending: bool = True) -> dict[str, Any]:
        fake = self.fakes[name]
        if state is not None:
            fake.state = state
        fake.sending = sending
        return {}

    def chirp_open(self, addresses: tuple[str, ...] = ("127.0.0.1",)) -> dict[str, Any]:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind(("0.0.0.0", chirp.PORT))
        for address in addresses:
            group = socket.inet_aton(chirp.MULTICAST_ADDRESS) + socket.inet_aton(address)
            udp.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
        udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        self.udp = udp
        return {}

    def send(
        self, type: str, service: str, port: int, host: str, group: str, via: str = "127.0.0.1"
    ) -> dict[str, Any]:
        beacon = chirp.Beacon(
            chirp.BeaconType[type],
            chirp.name_uuid(group),
            chirp.name_uuid(host),
            chirp.Service[service],
            port,
        )
        return self.send_raw(chirp.encode(beacon).hex(), via)

    def send_raw(self, hex: str, via: str = "127.0.0.1") -> dict[str, Any]:
        assert self.udp is not None
        self.udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(via))
        self.udp.sendto(bytes.fromhex(hex), (chirp.MULTICAST_ADDRESS, chirp.PORT))
        return {"sent_at": time.monotonic()}

    def expect_beacon(self, sender: str, type: str, services: list[str], timeout: float) -> Any:
        """Wait for beacons of `type` from `sender` for each of `services`."""
        assert self.udp is not None
        began = time.monotonic()
        wanted = set(services)
        got: dict[str, Any] = {}
        while wanted - set(got):
            left = began + timeout - time.monotonic()
            if left <= 0:
                return {"timeout": True, "got": got}
            self.udp.settimeout(left)
            try:
                data, (address, _) = self.udp.recvfrom(512)
            except TimeoutError:
                continue
            try:
                b = chirp.decode(data)
            except ProtocolError:
                continue
            if b.host == chirp.name_uuid(sender) and b.type.name == type:
                got[b.service.name] = {
                    "port": b.port,
                    "address": address,
                    "seconds": time.monotonic() - began,
                }
        return {"got": got}

    def cscp(self, port: int, command: str, payload: Any = None) -> dict[str, Any]:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            sock.send_multipart(
                cscp.encode(cscp.Message("probe", cscp.Type.REQUEST, command, payload))
            )
            reply = cscp.decode(sock.recv_multipart())
        finally:
            sock.close()
        return {"type": reply.type.name, "text": reply.text, "payload": reply.payload}

    def cscp_abandon(self, port: int, command: str) -> dict[str, Any]:
        """Send a request and go away without reading the reply (a controller that died)."""
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 1000)  # the request itself leaves
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart(cscp.encode(cscp.Message("gone", cscp.Type.REQUEST, command)))
        sock.close()
        return {}

    def chp_drop(self) -> dict[str, Any]:
        """The heartbeat subscriber goes away."""
        assert self.sub is not None
        self.sub.close()
        self.sub = None
        return {}

    def fuzz_cscp(self, port: int, count: int, seed: int) -> dict[str, Any]:
        """`count` random requests (random frames, and valid ones with one byte changed), each on
        one REQ socket in turn; the reply types seen, and how many got no reply in 10 s."""
        rng = random.Random(seed)
        good = cscp.encode(cscp.Message("fuzz", cscp.Type.REQUEST, "start", "run_1"))
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        kinds: dict[str, int] = {}
        lost = 0
        for _ in range(count):
            if rng.random() < 0.5:
                frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 5))]
            else:
                frames = [bytearray(f) for f in good]
                which = frames[rng.randrange(len(frames))]
                which[rng.randrange(len(which))] = rng.randrange(256)
                frames = [bytes(f) for f in frames]
            sock.send_multipart(frames)
            try:
                reply = cscp.decode(sock.recv_multipart())
            except zmq.Again:
                lost += 1
                sock.close()
                sock = self.ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, 10000)
                sock.connect(f"tcp://127.0.0.1:{port}")
                continue
            kinds[reply.type.name] = kinds.get(reply.type.name, 0) + 1
        sock.close()
        return {"kinds": kinds, "lost": lost}

    def fuzz_chirp(self, count: int, seed: int) -> dict[str, Any]:
        """Random datagrams to the CHIRP port: beacon-sized with the header, and of any size."""
        assert self.udp is not None
        rng = random.Random(seed)
        for k in range(count):
            if k % 2:
                data = chirp.HEADER + rng.randbytes(36)
            else:
                data = rng.randbytes(rng.randrange(0, 100))
            self.udp.sendto(data, (chirp.MULTICAST_ADDRESS, chirp.PORT))
        return {}

    def chp_subscribe(self, port: int) -> dict[str, Any]:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        self.sub = sub
        return {}

    def chp_collect(self, until_state: int, timeout: float) -> dict[str, Any]:
        """Every heartbeat until one says `until_state` (with the times between them)."""
        assert self.sub is not None
        began = time.monotonic()
        beats: list[list[Any]] = []
        while True:
            left = began + timeout - time.monotonic()
            if left <= 0:
                return {"timeout": True, "beats": beats}
            if not self.sub.poll(int(left * 1000)):
                continue
            hb = chp.decode(self.sub.recv_multipart())
            beats.append(
                [hb.sender, hb.state, hb.flags, hb.interval_ms, hb.status, time.monotonic()]
            )
            if hb.state == until_state:
                return {"beats": beats}


def main() -> None:
    probe = Probe()
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        result = getattr(probe, op)(**command)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
