"""PacketConnection: cs.packetstream-compatible requests and responses over any asyncio stream.

Either end of a connection may send requests and answer the other's. Packets produced during one
turn of the event loop leave in one write as soon as the loop is idle: no grace sleep. Only
in-flight state is kept, so memory stays flat on a long connection.

The package, by job: `connection` (PacketConnection: requests both ways, dispatching what
arrives, running handlers), `stream` (the stream under it: transport, batched output, paused
input, the end), `tcp` (`connect`, `start_server`) and `send_packets` (the `daqd send-packets`
command, a client built on them). Import from `daqd.packetstream`.
"""

from daqd.packetstream.connection import (
    HandlerResult,
    PacketConnection,
    RequestFailed,
    RequestHandler,
    response_from_result,
)
from daqd.packetstream.send_packets import send_packets_command
from daqd.packetstream.stream import PacketStream
from daqd.packetstream.tcp import connect, start_server

__all__ = [
    "HandlerResult",
    "PacketConnection",
    "PacketStream",
    "RequestFailed",
    "RequestHandler",
    "connect",
    "response_from_result",
    "send_packets_command",
    "start_server",
]
