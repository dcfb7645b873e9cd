"""ControlClient: the blocking ICCP client `daqctl`, the tests and the benchmarks drive a daemon
with, one request at a time, each with a timeout.

Kept light on purpose: `daqctl` imports this module, so nothing here may pull in pydantic, numpy,
asyncio or the host.
"""

from __future__ import annotations

import os
from typing import Any

import zmq

from daqd.endpoints import ipc_path, probe_ipc
from daqd.errors import ControlError, ProtocolError
from daqd.protocols import iccp

DEFAULT_TIMEOUT_S = 5.0


class ControlClient:
    """A blocking ICCP controller: one DEALER, one request at a time, each with a timeout."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        server_public_key_file: str | os.PathLike[str] | None = None,
        client_key_file: str | os.PathLike[str] | None = None,
        max_reply_bytes: int = 256 << 20,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        path = ipc_path(endpoint)
        if path is not None:
            probe_ipc(path)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://"):
            self._set_curve(server_public_key_file, client_key_file)
        self.codec = iccp.IccpCodec(max_reply_bytes)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ControlError(f"cannot connect to {endpoint}: {exc}") from None

    def _set_curve(
        self,
        server_public_key_file: str | os.PathLike[str] | None,
        client_key_file: str | os.PathLike[str] | None,
    ) -> None:
        if not (server_public_key_file and client_key_file):
            self.close()
            raise ControlError(
                f"{self.endpoint} needs CURVE: give the daemon's public certificate and your "
                "client certificate (with secret key)"
            )
        import zmq.auth

        try:
            server_public, _ = zmq.auth.load_certificate(server_public_key_file)
            public, secret = zmq.auth.load_certificate(client_key_file)
        except (OSError, ValueError) as exc:
            self.close()
            raise ControlError(f"cannot read CURVE certificate: {exc}") from None
        if not secret:
            self.close()
            raise ControlError(f"CURVE certificate {client_key_file} holds no secret key")
        self._sock.curve_serverkey = server_public
        self._sock.curve_publickey = public
        self._sock.curve_secretkey = secret

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def _exchange(self, message: iccp.Message, timeout_s: float | None) -> iccp.Message:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._sock.send_multipart(self.codec.encode(message))
        if not self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise ControlError(f"no reply from {self.endpoint} within {timeout:g} s")
        try:
            return self.codec.decode(self._sock.recv_multipart())
        except ProtocolError as exc:
            raise ControlError(f"bad reply from {self.endpoint}: {exc}") from None

    def request(
        self, code: str, args: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """Send REQUEST `code`; return the OK result, raise ControlError with the ERROR text."""
        reply = self._exchange(iccp.Request(code, args or {}), timeout_s)
        if isinstance(reply, iccp.Ok):
            return reply.result
        if isinstance(reply, iccp.Error):
            raise ControlError(reply.message)
        raise ControlError(f"unexpected {type(reply).__name__.upper()} reply to {code.strip()}")

    def stop(self, *, timeout_s: float | None = None) -> iccp.Finished:
        """Send STOP and wait for FINISHED."""
        reply = self._exchange(iccp.Stop(), timeout_s)
        if isinstance(reply, iccp.Finished):
            return reply
        if isinstance(reply, iccp.Error):
            raise ControlError(reply.message)
        raise ControlError(f"unexpected {type(reply).__name__.upper()} reply to STOP")
