"""CHIRP discovery for one host: its beacons (OFFER, REQUEST, DEPART) and the registry of its group.

Beacons go to the CHIRP multicast group once per interface address (IP_MULTICAST_IF), and are
heard on 0.0.0.0:7123 with the group joined on each of those addresses; the loop reads them
without a thread (add_reader). A REQUEST for a service this host offers is answered by an OFFER
after a random 0-200 ms, as Constellation does, so that many hosts do not answer at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daqd.errors import DaqdError, ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import chirp

if TYPE_CHECKING:
    from daqd.config import ConstellationSettings

log = logging.getLogger("daqd.satellite.chirp")

SATELLITE_TYPE = "Daqd"

REQUEST_ANSWER_DELAY_S = 0.2  # an OFFER answers a REQUEST after a random 0-200 ms


@dataclass(frozen=True)
class Offer:
    """A service another host of the group offers (the registry's entry)."""

    host: bytes
    service: chirp.Service
    address: str
    port: int


def interface_addresses(names: list[str] | None) -> list[str]:
    """IPv4 addresses to announce on: each entry an address or an interface name; None: every
    interface with an IPv4 address. 127.0.0.1 is always among them (as Constellation does)."""
    out: list[str] = []
    if names is None:
        names = [name for _, name in socket.if_nameindex()]
        wanted = False
    else:
        wanted = True
    for entry in names:
        try:
            out.append(str(ipaddress.IPv4Address(entry)))
            continue
        except ValueError:
            pass
        address = _interface_ipv4(entry)
        if address is None:
            if wanted:
                raise DaqdError(f"[constellation] interface {entry!r}: no such interface with IPv4")
            continue
        out.append(address)
    if "127.0.0.1" not in out:
        out.append("127.0.0.1")
    return list(dict.fromkeys(out))


def _interface_ipv4(name: str) -> str | None:
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


Listener = Callable[[Offer | None, Offer | None], None]


def canonical_name(settings: ConstellationSettings, daemon_name: str) -> str:
    """The satellite's canonical name, `Daqd.<name>` (default: the daemon's name)."""
    return f"{SATELLITE_TYPE}.{settings.name or daemon_name}"


class Discovery:
    """The CHIRP side of the host `name` in `group`: what it offers, and what the others offer.

    The host owns it (made and opened before receivers start, closed after the satellite left):
    the satellite offers its services through it, and parts that need the group's offers (the
    satellite's heartbeat watch, a `cdtp` receiver with `discover`) subscribe() to its registry.
    """

    @classmethod
    def for_settings(cls, settings: ConstellationSettings, daemon_name: str) -> Discovery:
        addresses = interface_addresses(settings.interface)
        return cls(canonical_name(settings, daemon_name), settings.group, addresses, {})

    def __init__(
        self, name: str, group: str, addresses: list[str], counters: dict[str, int]
    ) -> None:
        self.uuid = chirp.name_uuid(name)
        self.group_uuid = chirp.name_uuid(group)
        self.addresses = addresses
        self.counters = counters  # the satellite's errors by reason (chirp_* here)
        # (host UUID, service) -> port: the satellite's own services, and a DATA service for each
        # CDTP publisher under the UUID of its own sender name
        self.offers: dict[tuple[bytes, chirp.Service], int] = {}
        self.registry: dict[tuple[bytes, chirp.Service], Offer] = {}
        self._udp: socket.socket | None = None
        self._limited = LimitedLogger(log)
        self._listeners: list[Listener] = []  # see subscribe()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(offer, old offer or None)` when an offer of the group appears or
        changes port, and `listener(None, old offer)` when it departs; at once with (offer, None)
        for each offer already known. Returns the function that ends the subscription. A
        listener's exception is counted (chirp_listener) and logged; discovery goes on."""
        self._listeners.append(listener)
        for offer in list(self.registry.values()):
            self._call(listener, offer, None)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def open(self) -> None:
        self._udp = self._chirp_socket()
        asyncio.get_running_loop().add_reader(self._udp.fileno(), self._on_datagram)

    def offer(self, service: chirp.Service, port: int, host: bytes | None = None) -> None:
        """OFFER `service` on `port`, as this host or as `host` (a UUID of another name)."""
        key = (host or self.uuid, service)
        self.offers[key] = port
        self._beacon(chirp.BeaconType.OFFER, key[1], port, key[0])

    def withdraw(self, service: chirp.Service, host: bytes | None = None) -> None:
        """DEPART one offered service."""
        key = (host or self.uuid, service)
        port = self.offers.pop(key, None)
        if port is not None:
            self._beacon(chirp.BeaconType.DEPART, service, port, key[0])

    def request(self, service: chirp.Service) -> None:
        self._beacon(chirp.BeaconType.REQUEST, service, 0)

    def depart(self) -> None:
        """DEPART every offered service."""
        for (host, service), port in self.offers.items():
            self._beacon(chirp.BeaconType.DEPART, service, port, host)
        self.offers = {}

    def close(self) -> None:
        if self._udp is not None:
            asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None

    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def _chirp_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", chirp.PORT))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, chirp.MULTICAST_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        group = socket.inet_aton(chirp.MULTICAST_ADDRESS)
        for address in self.addresses:
            try:
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_ADD_MEMBERSHIP,
                    group + socket.inet_aton(address),
                )
            except OSError as exc:
                log.warning(
                    "CHIRP: cannot join %s on %s: %s", chirp.MULTICAST_ADDRESS, address, exc
                )
        sock.setblocking(False)
        return sock

    def _beacon(
        self, kind: chirp.BeaconType, service: chirp.Service, port: int, host: bytes | None = None
    ) -> None:
        if self._udp is None:
            return
        beacon = chirp.Beacon(kind, self.group_uuid, host or self.uuid, service, port)
        data = chirp.encode(beacon)
        for address in self.addresses:
            try:
                self._udp.setsockopt(
                    socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address)
                )
                self._udp.sendto(data, (chirp.MULTICAST_ADDRESS, chirp.PORT))
            except OSError as exc:
                self._count("chirp_send")
                self._limited.warning(
                    "chirp_send", "CHIRP: beacon not sent on %s: %s", address, exc
                )

    def _on_datagram(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # a flood cannot hold the loop
            try:
                data, (address, _port) = self._udp.recvfrom(512)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._count("chirp_receive")
                self._limited.warning("chirp_receive", "CHIRP: receive failed: %s", exc)
                return
            try:
                beacon = chirp.decode(data)
            except ProtocolError as exc:
                self._count("chirp_malformed")
                self._limited.warning("chirp_malformed", "CHIRP from %s: %s", address, exc)
                continue
            if beacon.group != self.group_uuid or (beacon.host, beacon.service) in self.offers:
                continue  # another group, or our own beacon heard back
            if beacon.host == self.uuid:
                continue
            self._on_beacon(beacon, address)

    def _on_beacon(self, beacon: chirp.Beacon, address: str) -> None:
        key = (beacon.host, beacon.service)
        if beacon.type == chirp.BeaconType.REQUEST:
            if any(service == beacon.service for _, service in self.offers):
                delay = random.uniform(0.0, REQUEST_ANSWER_DELAY_S)
                asyncio.get_running_loop().call_later(delay, self._answer_request, beacon.service)
        elif beacon.type == chirp.BeaconType.OFFER:
            old = self.registry.get(key)
            new = Offer(beacon.host, beacon.service, address, beacon.port)
            self.registry[key] = new
            if old != new:
                log.info(
                    "CHIRP: %s offered by %s at %s:%d",
                    beacon.service.name,
                    beacon.host.hex(),
                    address,
                    beacon.port,
                )
                self._tell(new, old)
        else:
            gone = self.registry.pop(key, None)
            if gone is not None:
                log.info("CHIRP: %s of %s departed", beacon.service.name, beacon.host.hex())
                self._tell(None, gone)

    def _tell(self, new: Offer | None, old: Offer | None) -> None:
        for listener in list(self._listeners):
            self._call(listener, new, old)

    def _call(self, listener: Listener, new: Offer | None, old: Offer | None) -> None:
        try:
            listener(new, old)
        except Exception as exc:  # a listener's bug must not stop discovery
            self._count("chirp_listener")
            log.exception("CHIRP: a listener failed: %r", exc)

    def _answer_request(self, service: chirp.Service) -> None:
        for (host, offered), port in list(self.offers.items()):
            if offered == service:
                self._beacon(chirp.BeaconType.OFFER, service, port, host)

    def discovered(self, service: chirp.Service) -> list[Offer]:
        """What the other hosts of the group offer of `service` now."""
        return [o for (_, s), o in self.registry.items() if s == service]
