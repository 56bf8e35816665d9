"""The user-space link delay (cloudops.lab.delay): bytes and order kept both ways, EOF passed on, never early."""

import socket
import threading
import time

import pytest

from cloudops.lab.delay import DelayRelay


@pytest.fixture
def echo():
    """A loopback echo server: every byte it gets comes back, then EOF after the client's EOF."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()
    server.close()


def test_every_byte_comes_back_in_order_and_eof_is_passed_on(echo):
    payload = bytes(range(256)) * 4000  # ~1 MB, many chunks
    with DelayRelay(echo, 0.001) as relay, socket.create_connection(relay.address) as conn:
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while data := conn.recv(65536):
            got += data
        sender.join()
    assert bytes(got) == payload


def test_a_round_trip_is_never_shorter_than_twice_the_delay(echo):
    delay = 0.05
    with DelayRelay(echo, delay) as relay, socket.create_connection(relay.address) as conn:
        for _ in range(3):
            started = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            assert time.monotonic() - started >= 2 * delay  # a lower bound: a busy machine only adds to it


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError, match="0 or more"):
        DelayRelay(("127.0.0.1", 9), -1)
