"""The team's state store: an etcd v3 cluster, reached through its gRPC gateway with etcd3gw.

Keys live under a prefix (``/cloudops/`` by default). A version is the key's ``mod_revision``;
``create`` is a transaction comparing ``create_revision == 0``, ``replace`` and ``delete`` compare
``mod_revision``, so compare-and-swap is exact across every operator's cloudops. A lock is a key
``locks/<name>`` created in a transaction with a lease of ``ttl`` seconds that the holder's lease
thread keeps alive (``_refresh``); a holder that dies stops refreshing, and etcd deletes the key
when the lease expires. Releasing revokes the lease.

etcd3gw talks to one endpoint per client: this store keeps one client per endpoint and goes on
with the next when one does not answer. Every request has a timeout (``timeout``, 5 s), so a
cluster without quorum fails in bounded time rather than hanging. A request is sent again to
another member only when resending cannot apply it twice: reads, lease keep-alives, lock
acquisition (the lease id tells whether it was ours), and any request that never reached a member
(connection refused, TLS handshake, connect timeout). A write that reached a member which then
went silent raises ``StoreUnavailable`` saying its outcome is unknown. TLS is always verified
against ``ca`` (or the system's CAs); the client certificate and key authenticate cloudops.
"""

import math
import stat
import threading
from pathlib import Path
from urllib.parse import urlsplit

from cloudops.state.store import (
    Entry,
    Store,
    StoreError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    check_key,
    decode,
    encode,
)

DEFAULT_PREFIX = "/cloudops/"
DEFAULT_TIMEOUT = 5.0
LOOPBACK = ("localhost", "127.0.0.1", "::1")


class _Unsent(Exception):
    """The request never reached a member: safe to send to the next one."""


class _Lost(Exception):
    """The request reached a member (or may have) and no answer came back."""


class EtcdStore(Store):
    name = "etcd"

    def __init__(self, endpoints, ca=None, cert=None, key=None, prefix=DEFAULT_PREFIX, timeout=DEFAULT_TIMEOUT):
        try:
            from etcd3gw.client import Etcd3Client
        except ImportError:
            raise StoreError("state backend etcd needs the etcd3gw package: pip install 'cloudops[etcd]'") from None

        self.endpoints = _endpoints(endpoints)
        self.prefix = _prefix(prefix)
        self.timeout = float(timeout)
        ca, cert, key = (_readable(path, what) for path, what in ((ca, "ca"), (cert, "cert"), (key, "key")))
        if (cert is None) != (key is None):
            raise StoreError("state store: etcd needs both cert and key (a client certificate), or neither")
        if key is not None and Path(key).stat().st_mode & stat.S_IROTH:
            raise StoreError(f"state store: the etcd client key {key} is readable by everyone (chmod 600 it)")
        self.ca = ca
        self._clients = []
        for url in self.endpoints:
            parts = urlsplit(url)
            # api_path: etcd >= 3.4's gateway (Debian 12 has 3.4.23), without etcd3gw's discovery round trip
            self._clients.append(Etcd3Client(host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                                             timeout=self.timeout, session=_session(ca, cert, key), api_path="/v3/"))
        self._preferred = 0
        self._mutex = threading.Lock()

    @classmethod
    def from_settings(cls, settings: dict) -> "EtcdStore":
        if not settings.get("endpoints"):
            raise StoreError("state store: backend etcd needs endpoints (a list of https://HOST:2379 URLs)")
        return cls(settings["endpoints"], ca=settings.get("ca"), cert=settings.get("cert"), key=settings.get("key"),
                   prefix=settings.get("prefix") or DEFAULT_PREFIX, timeout=settings.get("timeout") or DEFAULT_TIMEOUT)

    @property
    def current_endpoint(self) -> str:
        """The member this store sends its next request to (the last one that answered)."""
        return self.endpoints[self._preferred]

    def describe(self) -> str:
        return f"etcd {', '.join(self.endpoints)} (prefix {self.prefix})"

    def close(self):
        for client in self._clients:
            client.session.close()

    # ---------------------------------------------------------------- requests, member by member

    def _call(self, what: str, request, resend: bool = True):
        """``request(client)`` on the preferred member, then on the others while it is safe to resend."""
        with self._mutex:
            start = self._preferred
        reasons = []
        for step in range(len(self._clients)):
            index = (start + step) % len(self._clients)
            try:
                result = _translate(request, self._clients[index])
            except _Unsent as exc:
                reasons.append(f"{self.endpoints[index]}: {exc}")
                continue
            except _Lost as exc:
                if not resend:
                    raise StoreOutcomeUnknown(f"state store: etcd {self.endpoints[index]} {exc} during {what}; "
                                              "whether it was applied is unknown (`invoke state.check` finds "
                                              "what it left)") from None
                reasons.append(f"{self.endpoints[index]}: {exc}")
                continue
            if step:
                with self._mutex:
                    self._preferred = index
            return result
        raise StoreUnavailable(f"state store: no etcd member answered {what} ({'; '.join(reasons)})")

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _txn(self, what, compare, success, failure=(), resend=False):
        body = {"compare": compare, "success": list(success), "failure": list(failure)}
        return self._call(what, lambda client: client.transaction(body), resend=resend)

    # ---------------------------------------------------------------- the primitives

    def get(self, key):
        check_key(key)
        rows = self._call(f"get {key}", lambda client: client.get(self._key(key), metadata=True))
        if not rows:
            return None
        raw, meta = rows[0]
        return Entry(decode(key, raw), int(meta["mod_revision"]))

    def items(self, prefix):
        if not prefix:
            raise StoreError("state store: items() needs a prefix")
        rows = self._call(f"list {prefix}", lambda client: client.get_prefix(self._key(prefix)))
        entries = {}
        for raw, meta in rows:
            key = meta["key"].decode("utf-8", "replace")[len(self.prefix):]
            entries[key] = Entry(decode(key, raw), int(meta["mod_revision"]))
        return dict(sorted(entries.items()))

    def create(self, key, value):
        check_key(key)
        text = encode(value)
        k = _b64(self._key(key))
        result = self._txn(f"create {key}", [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
                           [{"request_put": {"key": k, "value": _b64(text)}}])
        return bool(result.get("succeeded"))

    def replace(self, key, value, version):
        check_key(key)
        text = encode(value)
        k = _b64(self._key(key))
        result = self._txn(f"replace {key}",
                           [{"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": int(version)}],
                           [{"request_put": {"key": k, "value": _b64(text)}}])
        return bool(result.get("succeeded"))

    def put(self, key, value):
        """One unconditional write (one request, where the base class reads first to compare-and-swap)."""
        check_key(key)
        k = _b64(self._key(key))
        self._txn(f"put {key}", [], [{"request_put": {"key": k, "value": _b64(encode(value))}}])

    def delete(self, key, version=None):
        check_key(key)
        k = _b64(self._key(key))
        compare = ({"key": k, "target": "CREATE", "result": "GREATER", "create_revision": 0} if version is None
                   else {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": int(version)})
        result = self._txn(f"delete {key}", [compare], [{"request_delete_range": {"key": k}}])
        return bool(result.get("succeeded"))

    def _acquire(self, name, owner, ttl):
        key = f"locks/{name}"
        k = _b64(self._key(key))
        # etcd leases count whole seconds (and have a floor of about 2 s)
        lease = self._call(f"lease for lock {name}", lambda client: client.lease(max(2, math.ceil(ttl))))
        value = encode({"owner": owner, "lease": lease.id})
        try:
            # resending is safe: when an earlier copy got through, the key carries our lease id
            result = self._txn(f"lock {name}", [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
                               [{"request_put": {"key": k, "value": _b64(value), "lease": lease.id}}],
                               [{"request_range": {"key": k}}], resend=True)
        except BaseException:
            self._revoke(lease)
            raise
        if result.get("succeeded") or _holder_lease(result) == lease.id:
            return (name, lease)
        self._revoke(lease)
        return None

    def _refresh(self, handle):
        name, lease = handle
        ttl = self._call(f"keep-alive of lock {name}", lambda client: _on(client, lease).refresh())
        return ttl > 0

    def _release(self, handle):
        _name, lease = handle
        self._revoke(lease)

    def _revoke(self, lease):
        """Revoke a lease (its lock key goes with it); a lease that is already gone is fine."""
        from etcd3gw.exceptions import Etcd3Exception

        try:
            self._call("lease revoke", lambda client: _on(client, lease).revoke())
        except (StoreUnavailable, Etcd3Exception):
            pass  # it expires by itself after its ttl


# ---------------------------------------------------------------- helpers

def _translate(request, client):
    """Run ``request(client)``: etcd3gw's and requests' failures as _Unsent, _Lost or one-line StoreUnavailable."""
    import requests
    from etcd3gw import exceptions as ex

    try:
        return request(client)
    except (ex.ConnectionFailedError, ex.ConnectionTimeoutError) as exc:
        cause = exc.__context__
        if isinstance(cause, requests.exceptions.SSLError):
            raise StoreUnavailable(f"state store: TLS with etcd {client.base_url} failed: {_ssl_reason(cause)}"
                                   f" (ca {client.session.verify if client.session.verify is not True else 'system'})"
                                   ) from None
        if isinstance(cause, requests.exceptions.ConnectTimeout):
            raise _Unsent("no connection within the timeout") from None
        if isinstance(cause, requests.exceptions.ConnectionError) and _never_sent(cause):
            raise _Unsent("connection refused") from None
        if isinstance(cause, requests.exceptions.ReadTimeout):
            raise _Lost(f"gave no answer within {client.timeout:g}s (no quorum?)") from None
        if cause is None:  # an HTTP 503/504/408 from the member: it did not apply the request
            raise _Unsent(_etcd_message(exc)) from None
        raise _Lost("dropped the connection") from None
    except ex.Etcd3Exception as exc:
        message = _etcd_message(exc)
        if "no leader" in message or "timed out" in message or "leader changed" in message:
            raise _Lost(message) from None
        raise StoreUnavailable(f"state store: etcd {client.base_url} refused the request: {message}") from None


def _session(ca, cert, key):
    """A requests session that verifies with ``ca`` and nothing else from the environment.

    etcd3gw sets ``session.verify`` to its ``ca_cert``, but requests lets $REQUESTS_CA_BUNDLE and
    $CURL_CA_BUNDLE replace a session's CA on every request (and $HTTPS_PROXY route it): with
    ``trust_env`` off the cluster's CA is the one used, and requests go straight to the members.
    """
    import requests

    session = requests.Session()
    session.trust_env = False
    session.verify = ca or True  # never False: without a ca, requests' default CA bundle verifies the members
    if cert:
        session.cert = (cert, key)
    return session


def _never_sent(cause) -> bool:
    """A requests ConnectionError raised before any byte of the request left (refused, unreachable, DNS)."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    reason = cause.args[0] if cause.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError)


def _etcd_message(exc) -> str:
    import json

    text = getattr(exc, "detail_text", None) or str(exc)
    try:
        body = json.loads(text)
        text = body.get("message") or body.get("error") or text
    except (TypeError, ValueError, AttributeError):
        pass
    return " ".join(str(text).split())[:200] or type(exc).__name__


def _ssl_reason(cause) -> str:
    text = str(cause)
    for marker in ("certificate verify failed", "unknown ca", "bad certificate", "certificate required",
                   "wrong version number"):
        if marker in text.lower():
            return marker
    return " ".join(text.split())[-160:]


def _holder_lease(result) -> int | None:
    for response in result.get("responses", []):
        for kv in response.get("response_range", {}).get("kvs", []):
            return int(kv.get("lease", 0))
    return None


def _on(client, lease):
    """The lease bound to ``client`` (a lease is cluster-wide: any member can refresh or revoke it)."""
    from etcd3gw.lease import Lease

    return Lease(lease.id, client=client)


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _endpoints(endpoints) -> list[str]:
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.replace(",", " ").split()]
    urls = []
    for url in endpoints or []:
        parts = urlsplit(str(url))
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise StoreError(f"state store: etcd endpoint {url!r} is not an https://HOST:PORT URL")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK:
            raise StoreError(f"state store: etcd endpoint {url} is plain http: the cloud's state would cross the "
                             "network unencrypted; use https with a CA")
        urls.append(f"{parts.scheme}://{parts.netloc}")
    if not urls:
        raise StoreError("state store: backend etcd needs endpoints (a list of https://HOST:2379 URLs)")
    return urls


def _prefix(prefix: str) -> str:
    prefix = "/" + str(prefix).strip("/") + "/" if str(prefix).strip("/") else "/"
    return prefix


def _readable(path, what: str):
    if path in (None, ""):
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise StoreError(f"state store: etcd {what} file {path} does not exist")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise StoreError(f"state store: etcd {what} file {path}: {exc.strerror}") from None
    return str(path)
