"""Send datapoints to carbon: pickle protocol (default) or plaintext, with bounded reconnects.

A datapoint is carbon's own pickle shape ``(path, (timestamp, value))`` everywhere in
cloudops, so a batch goes on the wire without conversion.

Pickle frame: 4-byte big-endian length, then ``pickle.dumps([(path, (ts, value)), ...])``,
at most ``BATCH_SIZE`` datapoints per frame (carbon's MAX_DATAPOINTS_PER_MESSAGE).
Plaintext: one ``path value timestamp\\n`` line per datapoint.

A successful ``send`` means the kernel took the bytes: carbon has no acknowledgement, so a
carbon that dies right after a send loses what sat in its socket buffer.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence

from cloudops.errors import CloudopsError

BATCH_SIZE = 500
PICKLE_PROTOCOL = 2  # readable by every carbon, Python 2 ones included
PROTOCOLS = ("pickle", "plaintext")

Datapoint = tuple[str, tuple[float, float]]


class CarbonUnreachable(CloudopsError):
    """Carbon could not be reached (or stopped reading) within the retry budget.

    ``sent`` counts the datapoints of this ``send`` call that went out before the
    failure: the caller keeps ``datapoints[sent:]`` (for example in the spool).
    """

    def __init__(self, message: str, sent: int = 0):
        super().__init__(message)
        self.sent = sent


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); anything else is a CloudopsError."""
    text = (address or "").strip()
    if not text:
        raise CloudopsError("carbon address is empty; expected host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise CloudopsError(f"carbon address {address!r}: expected [ipv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise CloudopsError(f"carbon address {address!r} has no port; expected host:port")
        if ":" in host:
            raise CloudopsError(f"carbon address {address!r}: write an IPv6 host as [addr]:port")
    if not host or any(c.isspace() for c in host):
        raise CloudopsError(f"carbon address {address!r} has an empty or invalid host")
    if not port.isdigit():
        raise CloudopsError(f"carbon address {address!r}: port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise CloudopsError(f"carbon address {address!r}: port {number} is out of range 1..65535")
    return host, number


def encode_pickle(batch: Sequence[Datapoint]) -> bytes:
    payload = pickle.dumps(list(batch), protocol=PICKLE_PROTOCOL)
    return struct.pack("!L", len(payload)) + payload


def encode_plaintext(batch: Sequence[Datapoint]) -> bytes:
    return "".join(f"{path} {value!r} {int(ts)}\n" for path, (ts, value) in batch).encode()


class CarbonClient:
    """One TCP connection to carbon, opened on first use and reopened after a failure.

    Each connect or send failure closes the socket and retries the batch after an
    exponential backoff (``backoff`` * 2**n, capped at ``backoff_max``); the ``attempts``-th
    failure within one ``send`` call raises ``CarbonUnreachable``. One call therefore
    takes at most about attempts * (connect_timeout + send_timeout) plus the sleeps,
    beyond the time carbon needs to read what it is sent.
    """

    def __init__(
        self,
        address: str,
        protocol: str = "pickle",
        connect_timeout: float = 2.0,
        send_timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.2,
        backoff_max: float = 2.0,
        batch_size: int = BATCH_SIZE,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if protocol not in PROTOCOLS:
            raise CloudopsError(f"carbon protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        for name, value in (("connect_timeout", connect_timeout), ("send_timeout", send_timeout)):
            if not value > 0:
                raise CloudopsError(f"carbon {name} must be > 0, got {value}")
        if attempts < 1:
            raise CloudopsError(f"carbon attempts must be >= 1, got {attempts}")
        if not 1 <= batch_size <= BATCH_SIZE:
            raise CloudopsError(f"carbon batch_size must be in 1..{BATCH_SIZE}, got {batch_size}")
        self.address = address
        self.host, self.port = parse_address(address)
        self.protocol = protocol
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.batch_size = batch_size
        self._sleep = sleep
        self._encode = encode_pickle if protocol == "pickle" else encode_plaintext
        self._sock: socket.socket | None = None
        self.reconnects = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def send(self, datapoints: Sequence[Datapoint]) -> int:
        """Send every datapoint in batches; return how many were sent, or raise CarbonUnreachable.

        The retry budget (``attempts``) is for the whole call, not per batch: a carbon that
        accepts connections but stops reading cannot make one call reconnect forever.
        """
        sent = 0
        failures = 0
        for start in range(0, len(datapoints), self.batch_size):
            batch = datapoints[start:start + self.batch_size]
            frame = self._encode(batch)
            while True:
                try:
                    self._connected().sendall(frame)
                    break
                except OSError as exc:  # refused, reset, timed out (socket.timeout is an OSError)
                    self.close()
                    failures += 1
                    if failures >= self.attempts:
                        raise CarbonUnreachable(
                            f"carbon at {self.address} unreachable after {failures} attempts: {_describe(exc)}",
                            sent=sent,
                        ) from None
                    self._sleep(min(self.backoff_max, self.backoff * 2 ** (failures - 1)))
                    self.reconnects += 1
            sent += len(batch)
        return sent

    def _connected(self) -> socket.socket:
        if self._sock is not None and _peer_closed(self._sock):
            self.close()  # carbon restarted since the last send: a write now would vanish
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.settimeout(self.send_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock


def _peer_closed(sock: socket.socket) -> bool:
    """Carbon never writes on a receiver connection, so readable means EOF or reset."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _describe(exc: OSError) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return exc.strerror or exc.__class__.__name__
