"""A delay on a lab link in user space, for kernels without netem: a TCP relay that holds every chunk it
forwards for a fixed time, in each direction.

``lab.up --link-delay`` needs the kernel's netem qdisc; this machine's kernel has none. A benchmark that
must see a datacenter's round trip (a libvirt RPC per call, as collectd's calls are) can instead reach a
host through a ``DelayRelay``: a listening socket on loopback whose every connection is relayed to the
host, each chunk delivered ``delay`` seconds after it arrived (so a request and its answer gain ``2 x
delay``). Order and bytes are kept; throughput is not limited (no window), which is right for the small
messages it is meant for. ``time.sleep`` wakes a little late (tens of microseconds, more on a loaded
machine): a benchmark measures the round trip it got rather than trusting the figure it asked for.
"""

from __future__ import annotations

import queue
import socket
import threading
import time

CHUNK = 65536


class DelayRelay:
    """``with DelayRelay(("10.0.0.2", 22), 0.000125) as relay``: connect to ``relay.address`` instead."""

    def __init__(self, upstream: tuple[str, int], delay: float, listen: tuple[str, int] = ("127.0.0.1", 0)):
        if delay < 0:
            raise ValueError(f"delay must be 0 or more seconds, got {delay}")
        self.upstream, self.delay = upstream, delay
        self._server = socket.create_server(listen)
        self.address = self._server.getsockname()[:2]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="delay-relay-accept", daemon=True).start()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting and cut every relayed connection."""
        self._closed.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            far.settimeout(None)
            for sock in (client, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, far]
            self._pipe(client, far)
            self._pipe(far, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """One direction: a reader stamps each chunk with its delivery time, a writer delivers it then."""
        held: queue.Queue = queue.Queue()

        def read():
            while True:
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    data = b""
                held.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write():
            while True:
                due, data = held.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)  # the far end sees the EOF, after the same delay
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, name="delay-relay-read", daemon=True).start()
        threading.Thread(target=write, name="delay-relay-write", daemon=True).start()
