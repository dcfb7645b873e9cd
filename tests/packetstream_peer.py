"""Drive the real cs.packetstream (run with the python of .venv-peers/packetstream, not daqd's).

    server GRACE               serve TCP on 127.0.0.1:0; prints "PORT <n>"; runs until stdin closes
    client PORT GRACE SCRIPT   SCRIPT: JSON list of [rq_type, flags, payload_hex]; submits them
                               one at a time, prints a JSON line [ok, flags, payload_hex] per
                               response, then "CLOSED" once `with conn:` has exited (handshake)
    client-erq PORT            sends ERQ, then one request; prints its response, then "CLOSED"
    client-vanish PORT         one request (rq_type 2), prints its response, then exits
                               without ERQ or EOF
    bench PORT GRACE N SIZE IN_FLIGHT   prints "RATE <requests per second>"

Handler of `server`, by rq_type: 0 echo payload, 1 (request flags, payload), 2 raises,
3 None, 4 int 7, 5 str "text", 6 echo payload (benchmarks), 7 never answers (sleeps).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

from cs.packetstream import PacketConnection


def handler(rq_type: int, flags: int, payload: bytes) -> Any:
    if rq_type in (0, 6):
        return payload
    if rq_type == 1:
        return flags, payload
    if rq_type == 2:
        raise ValueError("handler asked to fail")
    if rq_type == 3:
        return None
    if rq_type == 4:
        return 7
    if rq_type == 5:
        return "text"
    if rq_type == 7:
        time.sleep(3600)
    raise KeyError(rq_type)


def serve_one(sock: socket.socket, grace: float, n: int) -> None:
    conn = PacketConnection(
        (sock.fileno(), sock.fileno()), f"srv{n}", request_handler=handler, packet_grace=grace
    )
    with conn:
        conn.join_recv()
    sock.close()


def server(grace: float) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def accept_forever() -> None:
        n = 0
        while True:
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            n += 1
            threading.Thread(target=serve_one, args=(sock, grace, n), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True).start()
    print("PORT", listener.getsockname()[1], flush=True)
    sys.stdin.read()  # the test ends us by closing stdin


def open_conn(port: int, grace: float) -> tuple[socket.socket, PacketConnection]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = PacketConnection((sock.fileno(), sock.fileno()), "client", packet_grace=grace)
    return sock, conn


def show(result: tuple[bool, int, bytes]) -> None:
    ok, flags, payload = result
    print(json.dumps([bool(ok), flags, bytes(payload).hex()]), flush=True)


def client(port: int, grace: float, script: str) -> None:
    sock, conn = open_conn(port, grace)
    with conn:
        for rq_type, flags, payload_hex in json.loads(script):
            show(conn.submit(rq_type, flags, bytes.fromhex(payload_hex))())
    print("CLOSED", flush=True)
    sock.close()


def client_erq(port: int) -> None:
    sock, conn = open_conn(port, 0)
    with conn:
        conn.send_erq()
        show(conn.submit(0, 0, b"after erq")())
    print("CLOSED", flush=True)
    sock.close()


def client_vanish(port: int) -> None:
    _sock, conn = open_conn(port, 0)  # kept open until the process exits
    conn.open()
    show(conn.submit(2, 0, b"last words")())
    sys.stdout.flush()
    os._exit(0)  # no ERQ, no EOF: the socket just closes


def bench(port: int, grace: float, n: int, size: int, in_flight: int) -> None:
    sock, conn = open_conn(port, grace)
    payload = b"x" * size
    with conn:
        conn.submit(6, 0, payload)()  # warm up
        start = time.perf_counter()
        window: deque[Any] = deque()
        for _ in range(n):
            window.append(conn.submit(6, 0, payload))
            if len(window) >= in_flight:
                window.popleft()()
        while window:
            window.popleft()()
        elapsed = time.perf_counter() - start
    print("RATE", n / elapsed, flush=True)
    sock.close()


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "server":
        server(float(argv[1]))
    elif mode == "client":
        client(int(argv[1]), float(argv[2]), argv[3])
    elif mode == "client-erq":
        client_erq(int(argv[1]))
    elif mode == "client-vanish":
        client_vanish(int(argv[1]))
    elif mode == "bench":
        bench(int(argv[1]), float(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
