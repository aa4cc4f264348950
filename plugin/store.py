"""The datastore: a small key/value interface with compare-and-swap, over etcd or memory.

Everything above this module (IPAM, driver, agent) sees only these calls::

    get(key)                    -> (value | None, revision)     revision 0 = absent
    get_prefix(prefix)          -> [(key, value, revision), ...]  sorted by key
    put(key, value, lease=None)
    delete(key)
    lease(ttl), refresh(lease)  keys put with ``lease=`` vanish when it is not refreshed
    txn(expect, put, delete)    -> the new revision (> 0) if every key in ``expect`` still had
                                   the given revision (0 = must not exist) and the writes were
                                   applied, else 0; the revision lets callers cache what they wrote
    read(prefixes)              -> ({key: (value, revision)}, store revision): several prefixes
                                   read at one revision (a consistent snapshot)
    follow(prefix, revision, callback)
                                -> cancel(); callback([(key, value | None, revision)]) with the
                                   changes after ``revision``, in order (None: deleted);
                                   callback(error) once if the watch breaks or was compacted past

Values are strings (JSON by convention). Every etcd call is bounded by ``timeout`` seconds
(twice that at most with several endpoints, see ``EtcdStore._call``); a failure to reach etcd
raises :class:`StoreError` with a message fit for the user.
"""

import json
import threading
import time
import types
from urllib.parse import urlsplit

from core.errors import L3netError


class StoreError(L3netError):
    """etcd could not be reached or answered with an error."""


def get_json(store, key, default=None):
    """The JSON record at ``key``, or ``default`` when there is none."""
    value, _ = store.get(key)
    return json.loads(value) if value is not None else default


class MemoryStore:
    """In-memory store with etcd's revision semantics, for unit tests and dry runs."""

    def __init__(self):
        self._data = {}
        self._rev = 0
        self._lock = threading.Lock()
        self._watches = {}

    def get(self, key):
        with self._lock:
            return self._data.get(key, (None, 0))

    def get_prefix(self, prefix):
        with self._lock:
            return sorted((k, v, r) for k, (v, r) in self._data.items() if k.startswith(prefix))

    def keys(self, prefix):
        return [k for k, _, _ in self.get_prefix(prefix)]

    def put(self, key, value, lease=None):
        self.txn({}, put={key: value})
        if lease is not None:
            lease.keys.add(key)

    def delete(self, key):
        self.txn({}, delete=[key])

    def lease(self, ttl):
        return _MemoryLease(self, ttl)

    def refresh(self, lease):
        return not lease.expired

    def txn(self, expect, put=None, delete=None):
        with self._lock:
            for key, rev in expect.items():
                if self._data.get(key, (None, 0))[1] != rev:
                    return False
            self._rev += 1
            for key, value in (put or {}).items():
                self._data[key] = (value, self._rev)
            for key in delete or []:
                self._data.pop(key, None)
            rev = self._rev
            watches = list(self._watches.values())
        events = [(k, v, rev) for k, v in (put or {}).items()] + [(k, None, rev) for k in delete or []]
        for prefix, callback in watches:
            mine = [e for e in events if e[0].startswith(prefix)]
            if mine:
                callback(mine)
        return rev

    def read(self, prefixes):
        with self._lock:
            return ({k: item for k, item in self._data.items() if k.startswith(tuple(prefixes))},
                    self._rev)

    def follow(self, prefix, revision, callback):
        """(In memory, changes are delivered as they happen: ``revision`` must be current.)"""
        token = object()
        with self._lock:
            if revision != self._rev:
                raise StoreError(f"cannot follow from revision {revision} (now {self._rev})")
            self._watches[token] = (prefix, callback)
        return lambda: self._watches.pop(token, None)


class _MemoryLease:
    """A lease that lives until a test calls expire()."""

    def __init__(self, store, ttl):
        self.store, self.ttl, self.keys, self.expired = store, ttl, set(), False

    def expire(self):
        self.expired = True
        for key in self.keys:
            self.store.delete(key)


def parse_endpoints(endpoints):
    """``"http://a:2379,https://b:2379"`` -> [(host, port, secure)], with a clear error."""
    result = []
    for item in str(endpoints).split(","):
        item = item.strip()
        if not item:
            continue
        if "://" not in item:
            item = "http://" + item
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise L3netError(f"invalid etcd endpoint {item!r}: expected http(s)://host:port")
        try:
            port = parts.port or 2379
        except ValueError:
            raise L3netError(f"invalid etcd endpoint {item!r}: bad port") from None
        result.append((parts.hostname, port, parts.scheme == "https"))
    if not result:
        raise L3netError("no etcd endpoint given")
    return result


def describe_endpoints(endpoints):
    """Endpoints as URLs fit for logs (any user:password@ in the configured URL is dropped)."""
    if isinstance(endpoints, str):
        endpoints = parse_endpoints(endpoints)
    return ",".join(f"{'https' if s else 'http'}://{h}:{p}" for h, p, s in endpoints)


def _patch_etcd3_watch():
    """python3-etcd3 0.13's watch thread calls ``six.itervalues`` when its stream ends (etcd
    restarted, client closed) but never imports six: the thread dies with a NameError and no
    callback hears of the failure, so nobody would watch again. Give the module the one
    function it uses."""
    import etcd3.watch

    if not hasattr(etcd3.watch, "six"):
        etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(d.values()))


def check_tls(endpoints, ca_cert=None, cert=None, key=None):
    """TLS options only with https:// endpoints, a certificate with its key, files readable:
    refused at start with one clear line, never ignored (a TLS flag given with an http://
    endpoint would otherwise talk to etcd in clear)."""
    given = {"--etcd-ca-cert": ca_cert, "--etcd-cert": cert, "--etcd-key": key}
    given = {flag: path for flag, path in given.items() if path}
    if not given:
        return
    plain = [f"{h}:{p}" for h, p, secure in parse_endpoints(endpoints) if not secure]
    if plain:
        raise L3netError(f"{', '.join(given)} given, but etcd endpoint(s) {', '.join(plain)} are "
                         "http://: use https:// endpoints (or drop the TLS options)")
    if bool(cert) != bool(key):
        raise L3netError("--etcd-cert and --etcd-key go together")
    for flag, path in given.items():
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise L3netError(f"{flag} {path}: {e.strerror}") from None


class EtcdStore:
    """The store over etcd v3 (python3-etcd3). The gRPC client is created on first use,
    so that a store built before gunicorn forks opens its channel in the worker.

    Several endpoints: a call that cannot connect to one is tried on the next at once (a read
    that timed out too, once: a write that timed out may have been applied). When every
    endpoint said "unavailable", the call is tried again on all of them, after a short pause,
    for up to ``timeout`` seconds: the members that are up say "unavailable" too while they
    elect a new leader (a member stopped, even gracefully), and that lasts a second or two.
    With a user, the auth token is renewed when etcd says it expired, and the call tried again."""

    def __init__(self, endpoints="http://127.0.0.1:2379", timeout=5.0, ca_cert=None,
                 cert_cert=None, cert_key=None, user=None, password=None):
        self.endpoints = parse_endpoints(endpoints)
        check_tls(endpoints, ca_cert, cert_cert, cert_key)
        if bool(user) != bool(password):
            raise L3netError("--etcd-user and --etcd-password go together")
        self.timeout = float(timeout)
        self._tls = (ca_cert, cert_cert, cert_key)
        self._auth = (user, password)
        self._client = None
        self._lock = threading.Lock()
        self.reauthentications = 0

    def describe(self):
        return describe_endpoints(self.endpoints)

    def _make_client(self):
        import etcd3
        import grpc

        ca_cert, cert_cert, cert_key = self._tls
        eps = []
        for host, port, secure in self.endpoints:
            creds = None
            if secure:
                def read(path):
                    if not path:
                        return None
                    with open(path, "rb") as f:
                        return f.read()
                creds = grpc.ssl_channel_credentials(read(ca_cert), read(cert_key), read(cert_cert))
            # time_retry: how long a failed endpoint is shunned. The library's 300 s default
            # would keep failing for five minutes after etcd comes back.
            eps.append(etcd3.Endpoint(host, port, secure=secure, creds=creds,
                                      time_retry=0 if len(self.endpoints) == 1 else 2.0))
        # no user here: the library would authenticate once, on a random endpoint, and never
        # again; _authenticate does it with failover, and again when the token expires
        client = etcd3.MultiEndpointEtcd3Client(endpoints=eps, timeout=self.timeout, failover=True)
        if self._auth[0]:
            self._authenticate(client)
        return client

    def _authenticate(self, client):
        import grpc
        from etcd3 import etcdrpc
        from etcd3.client import EtcdTokenCallCredentials

        user, password = self._auth
        for attempt in range(len(self.endpoints)):
            try:
                response = client.authstub.Authenticate(
                    etcdrpc.AuthenticateRequest(name=user, password=password), self.timeout)
                break
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or attempt == len(self.endpoints) - 1:
                    raise
                self._failed(client)
        client.metadata = (("token", response.token),)
        # the token goes as metadata on every call; gRPC refuses call credentials on a
        # plain-text channel, so only https endpoints get them too
        client.call_credentials = grpc.metadata_call_credentials(
            EtcdTokenCallCredentials(response.token)) if all(e[2] for e in self.endpoints) else None
        client._clear_old_stubs()       # a watcher holds the old token: its watches end, and are made again

    @staticmethod
    def _failed(client):
        """Shun the endpoint in use for a while (the library does this only for some calls)."""
        try:
            client.endpoint_in_use.fail()
            client._clear_old_stubs()
        except Exception:  # noqa: BLE001 - best effort: the next call finds out anyway
            pass

    @staticmethod
    def _unshun(client):
        """Make every endpoint eligible again (after a pause: see ``_call``)."""
        for endpoint in client.endpoints.values():
            endpoint.last_failed = 0

    def _unreachable(self):
        return StoreError(f"etcd at {self.describe()} is unreachable")

    def _no_answer(self):
        return StoreError(f"etcd at {self.describe()} did not answer within {self.timeout:g}s")

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._call(self._make_client)
        return self._client

    def _call(self, fn, *args, idempotent=True, **kwargs):
        """``fn(*args, **kwargs)``, bounded, errors as StoreError. ``fn`` may be called again
        (next endpoint, renewed token): it must look ``self.client`` up each time (a lambda),
        not be a method bound to one client."""
        import etcd3.exceptions
        import grpc

        timed_out = renewed = False
        tries = len(self.endpoints)
        # several endpoints: "unavailable" from all of them is tried again until this deadline
        deadline = time.monotonic() + self.timeout if len(self.endpoints) > 1 else 0.0
        pause = 0.2
        while True:
            tries -= 1
            try:
                return fn(*args, **kwargs)
            except etcd3.exceptions.ConnectionTimeoutError:
                if timed_out or not idempotent or tries <= 0:
                    raise self._no_answer() from None
                timed_out = True
                continue
            except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.NoServerAvailableError):
                pass        # "unavailable": handled below the try
            except etcd3.exceptions.Etcd3Exception as e:
                raise StoreError(f"etcd error: {type(e).__name__} {e}".strip()) from None
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                details = e.details() if hasattr(e, "details") else ""
                if code == grpc.StatusCode.UNAUTHENTICATED and self._auth[0] and not renewed \
                        and self._client is not None:
                    renewed = True
                    tries += 1
                    with self._lock:
                        self._authenticate(self._client)
                    self.reauthentications += 1
                    continue
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise StoreError(f"etcd error: {code.name if code else '?'} {details}".strip()) from None
                if self._client is not None:
                    self._failed(self._client)      # a raw call (Txn, Authenticate)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if tries > 0 and idempotent:
                        continue
                    raise self._no_answer() from None
                if self._client is None:
                    raise self._unreachable() from None
            # "unavailable": the next endpoint at once; all said so: again after a pause, while
            # the deadline allows (a leader election answers "unavailable" for a second or two)
            if tries > 0:
                continue
            if time.monotonic() + pause >= deadline:
                raise self._unreachable() from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
            tries = len(self.endpoints)
            if self._client is not None:
                self._unshun(self._client)

    @staticmethod
    def _dec(value):
        return value.decode() if isinstance(value, bytes) else value

    def get(self, key):
        value, meta = self._call(lambda: self.client.get(key))
        if value is None:
            return None, 0
        return self._dec(value), meta.mod_revision

    def get_prefix(self, prefix):
        items = self._call(lambda: list(self.client.get_prefix(prefix, sort_order="ascend")))
        return [(self._dec(m.key), self._dec(v), m.mod_revision) for v, m in items]

    def keys(self, prefix):
        """The keys under ``prefix``, without their values (blocks are large)."""
        items = self._call(lambda: list(self.client.get_prefix(prefix, sort_order="ascend", keys_only=True)))
        return [self._dec(m.key) for _, m in items]

    def put(self, key, value, lease=None):
        self._call(lambda: self.client.put(key, value, lease=lease))

    def lease(self, ttl):
        """A new etcd lease of ``ttl`` seconds (keys put with it vanish when it expires)."""
        return self._call(lambda: self.client.lease(int(ttl)), idempotent=False)

    def refresh(self, lease):
        """Keep the lease alive; False if it had already expired."""
        responses = self._call(lambda: list(lease.refresh()))
        return bool(responses) and responses[0].TTL > 0

    def delete(self, key):
        self._call(lambda: self.client.delete(key))

    def read(self, prefixes):
        """Every prefix at the revision of the first read: what follow() continues from."""
        from etcd3 import etcdrpc, utils

        items, revision = {}, None
        for prefix in prefixes:
            request = etcdrpc.RangeRequest(key=utils.to_bytes(prefix),
                                           range_end=utils.prefix_range_end(utils.to_bytes(prefix)))
            if revision is not None:
                request.revision = revision

            def call():
                c = self.client
                return c.kvstub.Range(request, c.timeout, credentials=c.call_credentials, metadata=c.metadata)
            response = self._call(call)
            if revision is None:
                revision = response.header.revision
            for kv in response.kvs:
                items[self._dec(kv.key)] = (self._dec(kv.value), kv.mod_revision)
        return items, revision or 0

    def follow(self, prefix, revision, callback):
        from etcd3 import events as E
        _patch_etcd3_watch()

        def on_response(response):
            if response is None or isinstance(response, Exception):
                callback(response or StoreError("the etcd watch ended"))
                return
            changes = [(self._dec(e.key), None if isinstance(e, E.DeleteEvent) else self._dec(e.value),
                        e.mod_revision) for e in response.events]
            if changes:
                callback(changes)
        watch_id = self._call(lambda: self.client.add_watch_prefix_callback(
            prefix, on_response, start_revision=revision + 1))
        return lambda: self._call(lambda: self.client.cancel_watch(watch_id))

    def txn(self, expect, put=None, delete=None):
        from etcd3 import etcdrpc

        c = self.client
        t = c.transactions
        compare = [((t.version(k) == 0) if rev == 0 else (t.mod(k) == rev)).build_message()
                   for k, rev in expect.items()]
        ops = [t.put(k, v) for k, v in (put or {}).items()]
        ops += [t.delete(k) for k in delete or []]
        # The library's transaction() drops the response header; we want its revision.
        request = etcdrpc.TxnRequest(compare=compare, success=c._ops_to_requests(ops), failure=[])
        def call():
            c = self.client             # afresh: the token may have been renewed meanwhile
            return c.kvstub.Txn(request, c.timeout, credentials=c.call_credentials, metadata=c.metadata)
        response = self._call(call, idempotent=False)
        return response.header.revision if response.succeeded else 0

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None
