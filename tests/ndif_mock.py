"""A small stand-in for the NDIF service on 127.0.0.1, for failure-path tests.

It speaks just enough HTTP/1.1 and websocket (RFC 6455, server-to-client text frames)
for nnsight's blocking backend: ``GET /subscribe`` upgrades to a websocket and sends the
session id, ``POST /request`` answers with a status. ``mode`` picks the failure:

- ``refuse``: the POST gets HTTP 401 with a JSON ``detail``;
- ``unhosted``: the POST is accepted, then the websocket reports an ERROR status;
- ``silent``: the POST is accepted, then nothing more is ever sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class MockNDIF:
    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._subscribers: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._subscribers:
            conn.close()
        self._sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket):
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if method == "GET" and path == "/subscribe":
            self._upgrade(conn, headers)
            return
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            body += conn.recv(65536)
        self.requests += 1
        if self.mode == "refuse":
            self._reply(conn, 401, {"detail": "Invalid API key"})
        else:
            self._reply(conn, 200, {"id": "job-1", "status": "RECEIVED", "description": "received"})
            if self.mode == "unhosted":
                for sub in self._subscribers:
                    frame = {"id": "job-1", "status": "ERROR", "description": "Model mock-org/tiny is not deployed"}
                    sub.sendall(_text_frame(json.dumps(frame)))
        conn.close()

    def _upgrade(self, conn, headers):
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        conn.sendall(_text_frame(json.dumps({"session_id": "session-1"})))
        self._subscribers.append(conn)

    @staticmethod
    def _reply(conn, status: int, payload: dict):
        body = json.dumps(payload).encode()
        reason = {200: "OK", 401: "Unauthorized"}[status]
        conn.sendall(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + body
        )


def _text_frame(text: str) -> bytes:
    payload = text.encode()
    header = bytearray([0x81])
    if len(payload) < 126:
        header.append(len(payload))
    else:
        header.append(126)
        header += len(payload).to_bytes(2, "big")
    return bytes(header) + payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
