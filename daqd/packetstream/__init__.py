"""PacketConnection: cs.packetstream-compatible requests and responses over any asyncio stream.

Either end of a connection may send requests and answer the other's. Packets produced during one
turn of the event loop leave in one write as soon as the loop is idle: no grace sleep. Only
in-flight state is kept, so memory stays flat on a long connection.

The package, by job: `connection` (PacketConnection, `connect`, `start_server`: the library) and
`send_packets` (the `daqd send-packets` command, a client built on it). Import from
`daqd.packetstream`.
"""

from daqd.packetstream.connection import (
    HandlerResult,
    PacketConnection,
    RequestFailed,
    RequestHandler,
    connect,
    response_from_result,
    start_server,
)
from daqd.packetstream.send_packets import send_packets_command

__all__ = [
    "HandlerResult",
    "PacketConnection",
    "RequestFailed",
    "RequestHandler",
    "connect",
    "response_from_result",
    "send_packets_command",
    "start_server",
]
