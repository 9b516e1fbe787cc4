"""A scripted KV peer for transport tests: it speaks the handshake, then runs a test's script.

Runs on its own thread with a blocking socket on 127.0.0.31 (loopback only) and closes every
socket and joins its thread on exit, also when the test fails.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

import pytest

from disaggserve_worker.kv import native
from disaggserve_worker.kv.framing import PROTOCOL_VERSION, FrameType, recv_control, send_json

Script = Callable[[socket.socket], None]


class FakeKVPeer:
    def __init__(self, script: Script, handshake: bool = True, host: str = "127.0.0.31"):
        self.script = script
        self.handshake = handshake
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeKVPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        for conn in self.connections:
            conn.close()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(conn)
        conn.settimeout(10)
        with contextlib.suppress(Exception):
            if self.handshake:
                send_json(conn, FrameType.HELLO, {"version": PROTOCOL_VERSION, "nonce": "00" * 32, "auth": False})
                recv_control(conn)
                send_json(conn, FrameType.READY, {})
            self.script(conn)
        conn.close()


@pytest.fixture(params=["native", "python"])
def kv_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a KV test both ways: reads in C (`kv/kv_io.c`, `kv.native`) and Python's own path,
    which must answer every reply and fault alike (a module uses it with
    `pytestmark = pytest.mark.usefixtures("kv_io")`)."""
    if request.param == "python":
        monkeypatch.setattr(native, "library", lambda: None)
    else:
        assert native.library() is not None, "kv_io.c did not build (a C compiler is needed for these tests)"
    return str(request.param)
