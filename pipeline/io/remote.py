"""Reading remote case files as streams: bounded range requests, retries,
and a count of every byte transferred.

A `.vital` file of VitalDB's open dataset is *packed*: numeric tracks first,
waveforms last, so vitaldb stops reading after the last wanted track. To
make that stop save the transfer too, a remote file is read block by block
with range requests (`RangeReader`), never as one open-ended download whose
rest the server would push into socket buffers: at most one block beyond
what the parser consumed is ever transferred. Two kinds of remote store:

* web servers (http/https; VitalDB's API), through `HttpClient`: its own
  small client on `http.client` with connect and read timeouts, keep-alive
  connections (at most `WebOptions.connections` per process), and retries
  with exponential backoff and full jitter on connection errors, a
  connection cut mid-body (resumed where it stopped), 5xx and 429,
  honouring `Retry-After`. A server that ignores `Range` is streamed
  instead (and a cut restarts the body, skipping what was read);
* S3, through the same boto3 client Beam's S3 filesystem builds from the
  pipeline options (endpoint, region, credentials): `GetObject` with a
  byte range and `If-Match` on the ETag; botocore retries the requests, a
  body cut mid-read is fetched again here.

One `RetryPolicy` decides every retry here (web requests of each kind and
S3 range reads alike), and one classification (`classify_status`,
`status_error`, the transport errors that may pass) sorts the answers.
Every reader records the file's identity as the server states it (ETag,
else size and Last-Modified) and the bytes, requests and retries it cost.
"""
from __future__ import annotations

import email.utils
import gzip
import http.client
import io
import ipaddress
import logging
import os
import random
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar
from urllib.parse import urljoin, urlsplit

from pipeline.io.identity import FileIdentity

_LOG = logging.getLogger(__name__)
T = TypeVar("T")

BLOCK = 512 * 1024  # bytes per range request: the most transferred beyond what the parser read
RETRY_AFTER_MAX_S = 300.0  # a longer Retry-After fails the request instead of stalling the worker
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
ERROR_BODY_MAX = 1 << 20  # an error page is read (to reuse the connection) up to this


class TransferError(IOError):
    """A remote read that failed after its retries (or for good, e.g. 403):
    the case fails with reason `download_failed`; a rerun tries again."""


class ChangedWhileReading(TransferError):
    """The file's ETag changed between two range requests of one read."""


class NotFound(TransferError):
    """404 / 410: there is no such file."""


class HTTPStatus(TransferError):
    """A final answer (403, 405, ...): retrying will not change it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLong(TransferError):
    """The server sent more than was asked for (e.g. a whole file for a range)."""


@dataclass(frozen=True)
class WebOptions:
    """How a process talks to a web server (run options, see
    pipeline.options: --http-timeout, --http-max-attempts, --http-connections)."""

    timeout_s: float = 30.0  # connect timeout, and the longest wait for the next bytes
    max_attempts: int = 8
    connections: int = 4  # per process and server
    backoff_s: float = 0.5  # first backoff; doubles per attempt, full jitter
    backoff_max_s: float = 30.0


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Retry-After as seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Transfer:
    """What reading one file cost: body bytes received, requests, retries."""

    bytes: int = 0
    requests: int = 0
    retries: int = 0

    def as_json(self) -> dict:
        return {"bytes_read": self.bytes, "requests": self.requests, "retries": self.retries}


# ---- what an answer means ---------------------------------------------------------

class _Retry(Exception):
    """An attempt failed in a way that may pass (a dropped connection, a
    timeout, a cut body, 429, 5xx): the policy tries again. `retry_after`:
    the server's wait; `partial`: the file's bytes that arrived before a cut."""

    def __init__(self, why: str, retry_after: Optional[float] = None, partial: bytes = b""):
        super().__init__(why)
        self.retry_after = retry_after
        self.partial = partial


class _TooLong(Exception):
    pass


# Transport failures that may pass, as _Retry: before the answer's headers (a refused or dropped
# connection, a timeout, a garbled answer), and while its body is read (a cut, a stall).
SEND_ERRORS = (ConnectionError, socket.timeout, OSError, http.client.HTTPException)
BODY_ERRORS = (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError)

OK, REDIRECT, MISSING, RETRY, FINAL = "ok", "redirect", "missing", "retry", "final"


def classify_status(status: int, ok=(200, 206), missing=(404, 410), follow: bool = False) -> str:
    """What an HTTP answer means, in this order: OK (wanted), REDIRECT (to
    follow; `follow` says it has a Location and redirects are left), MISSING
    (no such file: NotFound), RETRY (429, 5xx: may pass), FINAL (any other,
    e.g. 403 or a redirect not followed: retrying will not change it)."""
    if status in ok:
        return OK
    if follow and status in REDIRECTS:
        return REDIRECT
    if status in missing:
        return MISSING
    if status == 429 or status >= 500:
        return RETRY
    return FINAL


def status_error(url: str, status: int, kind: str, retry_after: Optional[str] = None,
                 body: bytes = b"") -> Exception:
    """The exception for an answer `classify_status` called MISSING, RETRY or
    FINAL: NotFound, _Retry (with the Retry-After header's wait) or
    HTTPStatus (naming the status and the page's start)."""
    if kind == MISSING:
        return NotFound(f"{url}: HTTP {status}")
    if kind == RETRY:
        return _Retry(f"HTTP {status}", parse_retry_after(retry_after))
    return HTTPStatus(status, f"{url}: HTTP {status} {body[:200]!r}")


def transport_failure(e: BaseException) -> _Retry:
    """A transport error (SEND_ERRORS, or S3's) as a failure that may pass."""
    return _Retry(f"{type(e).__name__}: {e}")


# ---- retries ----------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """How a remote read is retried: at most `max_attempts` attempts; before
    the next, the server's Retry-After when it gave one (one longer than
    `retry_after_max_s` fails the read at once instead of stalling the
    worker), else exponential backoff with full jitter (`rng`). One policy
    serves every web request kind and S3's range reads."""

    max_attempts: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    retry_after_max_s: float = RETRY_AFTER_MAX_S
    rng: Callable[[], float] = random.random

    @classmethod
    def of(cls, opts: WebOptions, rng: Callable[[], float] = random.random) -> "RetryPolicy":
        return cls(opts.max_attempts, opts.backoff_s, opts.backoff_max_s, rng=rng)

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1):
        the server's Retry-After when it gave one, else exponential backoff with
        full jitter (uniform in [0, min(max, base * 2^(attempt-1))])."""
        if retry_after is not None:
            return retry_after
        return self.rng() * min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))

    def next_wait(self, attempt: int, failure: _Retry, what: str) -> Optional[float]:
        """After attempt `attempt` failed with `failure`: the seconds to wait
        before the next, or None when the attempts are spent; TransferError
        when the server asks for a wait past `retry_after_max_s`."""
        if attempt >= self.max_attempts:
            return None
        if failure.retry_after is not None and failure.retry_after > self.retry_after_max_s:
            raise TransferError(f"{what}: the server asks to retry after {failure.retry_after:.0f} s") from None
        return self.delay(attempt, failure.retry_after)

    def run(self, attempt: Callable[[], T], what: str, transfer: Transfer,
            sleep: Callable[[float], None] = time.sleep, action: Optional[str] = None) -> T:
        """attempt() until it returns. A _Retry from it is a failure that may
        pass: the policy waits (`sleep`, one retry counted in `transfer`,
        logged as `action`) and tries again; any other exception ends the run
        at once. TransferError naming `what` when the attempts are spent."""
        last = ""
        for n in range(1, self.max_attempts + 1):
            try:
                return attempt()
            except _Retry as e:
                last = str(e)
                delay = self.next_wait(n, e, what)
            if delay is None:
                break
            transfer.retries += 1
            _LOG.warning("%s failed (%s); retry %d of %d in %.2f s", action or what, last, n,
                         self.max_attempts - 1, delay)
            sleep(delay)
        raise TransferError(f"{what}: failed after {self.max_attempts} attempts (last: {last})")


def backoff_delay(attempt: int, opts: WebOptions, retry_after: Optional[float] = None,
                  rng: Callable[[], float] = random.random) -> float:
    """RetryPolicy.delay for these options."""
    return RetryPolicy.of(opts, rng).delay(attempt, retry_after)


# ---- HTTP -------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict  # lower-case names
    body: bytes


class _Pool:
    """Keep-alive connections per server (scheme, host, port): at most
    `connections` in use at once (more callers wait); idle ones are reused."""

    def __init__(self, connections: int, timeout_s: float):
        self.connections, self.timeout_s = connections, timeout_s
        self._lock = threading.Lock()
        self._idle: dict[tuple, list] = {}
        self._slots: dict[tuple, threading.BoundedSemaphore] = {}

    def take(self, key: tuple) -> "_Conn":
        """A connection to this server, once one of its slots is free."""
        with self._lock:
            slot = self._slots.setdefault(key, threading.BoundedSemaphore(self.connections))
        slot.acquire()
        with self._lock:
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
        if conn is None:
            cls = http.client.HTTPSConnection if key[0] == "https" else http.client.HTTPConnection
            conn = cls(key[1], key[2], timeout=self.timeout_s)
        return _Conn(self, key, conn, slot)

    def keep(self, key: tuple, conn) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()


class _Conn:
    """A pooled connection in use: released once, reused only if the
    response was read to its end on a keep-alive connection."""

    def __init__(self, pool: _Pool, key: tuple, conn, slot: threading.BoundedSemaphore):
        self.pool, self.key, self.conn, self.slot = pool, key, conn, slot
        self._released = False

    def release(self, reuse: bool) -> None:
        if self._released:
            return
        self._released = True
        if reuse:
            self.pool.keep(self.key, self.conn)
        else:
            self.conn.close()
        self.slot.release()


def _read_all(resp, transfer: Transfer, limit: Optional[int] = None) -> bytes:
    """The body, counted; _Retry with what arrived if the connection is cut;
    _TooLong past `limit` bytes."""
    parts: list[bytes] = []
    got = 0
    expected = resp.getheader("Content-Length")
    try:
        while True:
            chunk = resp.read(64 * 1024)
            if not chunk:
                if expected and expected.isdigit() and got < int(expected):
                    # http.client returns a short body quietly when the connection drops
                    raise ConnectionError(f"the body ended after {got} of {expected} bytes")
                return b"".join(parts)
            parts.append(chunk)
            got += len(chunk)
            transfer.bytes += len(chunk)
            if limit is not None and got > limit:
                raise _TooLong()
    except BODY_ERRORS as e:
        if isinstance(e, http.client.IncompleteRead):
            parts.append(e.partial)
            transfer.bytes += len(e.partial)
        raise _Retry(f"connection cut after {got} bytes of the body ({type(e).__name__})",
                     partial=b"".join(parts)) from None


def _exchange(client: "HttpClient", method: str, url: str, headers: dict, transfer: Transfer,
              limit: Optional[int]) -> Response:
    """One request and its whole answer (an error page up to ERROR_BODY_MAX);
    the connection kept for reuse when the answer allows it. _Retry for a
    transport failure (with the file's bytes that arrived, never an error
    page's), _TooLong past `limit`."""
    resp, handle = client._send(method, url, headers, transfer)
    try:
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        # HEAD has no body, but the response must be read before the connection is reused
        body = resp.read() if method == "HEAD" else \
            _read_all(resp, transfer, limit if resp.status < 300 else ERROR_BODY_MAX)
    except _Retry as e:
        handle.release(False)
        if resp.status >= 300:  # only a file's bytes are kept for resuming, never an error page's
            raise _Retry(str(e)) from None
        raise
    except BaseException:
        handle.release(False)
        raise
    handle.release(not resp.will_close)
    return Response(resp.status, hdrs, body)


class _Attempts:
    """One HttpClient.request across its attempts: where it is (a redirect
    is followed, not an attempt), the file's bytes kept from cut attempts,
    and the headers that resume the body after them (`resume(n)`)."""

    def __init__(self, client: "HttpClient", method: str, url: str, headers: dict, transfer: Transfer,
                 ok, missing, resume: Optional[Callable[[int], dict]], limit: Optional[int]):
        self.client, self.method, self.url, self.headers, self.transfer = client, method, url, headers, transfer
        self.ok, self.missing, self.resume, self.limit = ok, missing, resume, limit
        self.target, self.redirects, self.partial = url, 0, b""

    def __call__(self) -> Response:
        """One attempt: the wanted answer, else _Retry, NotFound, HTTPStatus or BodyTooLong."""
        while True:
            try:
                r = _exchange(self.client, self.method, self.target, self.headers, self.transfer, self.limit)
            except _TooLong:
                raise BodyTooLong(f"{self.url}: the server sent more than the {self.limit} bytes asked for") from None
            except _Retry as e:
                if e.partial and self.resume is not None:
                    self.partial += e.partial
                    self.headers.update(self.resume(len(self.partial)))
                raise
            location = r.headers.get("location")
            kind = classify_status(r.status, self.ok, self.missing,
                                   follow=bool(location) and self.redirects < MAX_REDIRECTS)
            if kind == OK:
                r.body = self.partial + r.body
                return r
            if kind != REDIRECT:
                raise status_error(self.url, r.status, kind, r.headers.get("retry-after"), r.body)
            self.target = urljoin(self.target, location)  # a mirror or a CDN: not an attempt
            self.redirects += 1


class HttpClient:
    """A per-process HTTP/1.1 client: keep-alive connections per server (at
    most `connections` in use at once; more callers wait), timeouts, and
    retries (`request`, by `retry`). Thread-safe."""

    def __init__(self, opts: WebOptions):
        self.opts = opts
        self.retry = RetryPolicy.of(opts)
        self._pool = _Pool(opts.connections, opts.timeout_s)
        self.sleep = time.sleep  # the backoff's wait

    @staticmethod
    def _split(url: str) -> tuple[tuple, str]:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        port = u.port or (443 if u.scheme == "https" else 80)
        return (u.scheme, u.hostname, port), (u.path or "/") + (f"?{u.query}" if u.query else "")

    def send(self, method: str, url: str, headers: dict, transfer: Transfer):
        """Sends one request on a pooled connection: (the response with its
        headers read, the connection to release)."""
        key, target = self._split(url)
        handle = self._pool.take(key)
        transfer.requests += 1
        try:
            handle.conn.request(method, target, headers={"User-Agent": "master-poc-preprocess", **headers})
            resp = handle.conn.getresponse()
        except BaseException:
            handle.release(False)
            raise
        return resp, handle

    def _send(self, method: str, url: str, headers: dict, transfer: Transfer):
        """send, a transport failure (SEND_ERRORS) raised as _Retry."""
        try:
            return self.send(method, url, headers, transfer)
        except SEND_ERRORS as e:
            raise transport_failure(e) from None

    def close(self) -> None:
        self._pool.close()

    def request(self, method: str, url: str, headers: Optional[dict] = None,
                transfer: Optional[Transfer] = None, ok=(200, 206), missing=(404, 410),
                resume: Optional[Callable[[int], dict]] = None, limit: Optional[int] = None) -> Response:
        """The request, retried on connection errors, cuts, 5xx and 429 (the
        server's Retry-After honoured, else backoff with jitter).
        `resume(n)` gives the headers that continue a body cut after n bytes
        (a Range), so what arrived is kept; without it the body is asked for
        again whole. Raises NotFound, or TransferError when the attempts run
        out or the answer is final (403, ...)."""
        transfer = transfer if transfer is not None else Transfer()
        attempt = _Attempts(self, method, url, dict(headers or {}), transfer, ok, missing, resume, limit)
        return self.retry.run(attempt, url, transfer, self.sleep, f"{method} {url}")

    def stream(self, url: str, transfer: Transfer):
        """GET with the body left to read: (the response, its connection to
        release). Redirects are followed; an error's page is read and the
        connection released; _Retry for what may pass (connection errors,
        5xx, 429), NotFound, HTTPStatus."""
        target, redirects = url, 0
        while True:
            resp, handle = self._send("GET", target, {}, transfer)
            if resp.status == 200:
                return resp, handle
            try:
                body = _read_all(resp, transfer, ERROR_BODY_MAX)
            except (_Retry, _TooLong):
                body = b""
            finally:
                handle.release(False)
            location = resp.getheader("Location")
            kind = classify_status(resp.status, (200,), follow=bool(location) and redirects < MAX_REDIRECTS)
            if kind != REDIRECT:
                raise status_error(url, resp.status, kind, resp.getheader("Retry-After"), body)
            target, redirects = urljoin(target, location), redirects + 1

    def head(self, url: str, transfer: Optional[Transfer] = None) -> Optional[FileIdentity]:
        """The file's identity from a HEAD request (web_identity), or None if
        the server has no such file. A server that refuses HEAD is asked for
        the file's first byte instead (its Content-Range tells the size)."""
        try:
            try:
                r = self.request("HEAD", url, transfer=transfer, ok=(200,))
            except HTTPStatus as e:
                if e.status not in (403, 405, 501):
                    raise
                r = self.request("GET", url, headers={"Range": "bytes=0-0"}, transfer=transfer, ok=(200, 206),
                                 limit=1)
                return _first_byte_identity(url, r)
        except NotFound:
            return None
        except BodyTooLong:  # a 200 with the whole file to a byte range: its size is unknown until read
            return FileIdentity(url)
        return web_identity(url, r.headers)

    def get_bytes(self, url: str, transfer: Optional[Transfer] = None) -> bytes:
        """A whole small document (the clinical table), a gzip
        Content-Encoding decoded."""
        r = self.request("GET", url, headers={"Accept-Encoding": "gzip"}, transfer=transfer, ok=(200,))
        if r.headers.get("content-encoding", "").lower() in ("gzip", "x-gzip"):
            try:
                return gzip.decompress(r.body)
            except (OSError, EOFError, zlib.error) as e:
                raise TransferError(f"{url}: a damaged gzip-encoded body ({e})") from None
        return r.body


def _first_byte_identity(url: str, r: Response) -> FileIdentity:
    """The identity from the answer to a request for byte 0: a 206's
    Content-Range tells the size, a 200 (the whole, one-byte file) its body."""
    total = r.headers.get("content-range", "").rpartition("/")[2]
    if r.status == 206 and total.isdigit():
        return web_identity(url, r.headers, int(total))
    return web_identity(url, {k: v for k, v in r.headers.items() if k != "content-length"}, len(r.body)
                        if r.status == 200 else None)

def web_identity(url: str, headers: dict, size: Optional[int] = None) -> FileIdentity:
    """Path, size and ETag, or path, size and Last-Modified: the server's
    word on which file this is (the ETag when it sends one)."""
    if size is None and headers.get("content-length", "").isdigit():
        size = int(headers["content-length"])
    etag = headers.get("etag") or None
    return FileIdentity(url, size, etag=etag, last_modified=None if etag else headers.get("last-modified") or None)


_CLIENTS: dict[WebOptions, HttpClient] = {}
_CLIENTS_LOCK = threading.Lock()


def http_client(opts: WebOptions) -> HttpClient:
    """This process's client for these options (connections are reused)."""
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(opts)
        if c is None:
            c = _CLIENTS[opts] = HttpClient(opts)
        return c


def forget_connections() -> None:
    """Drops every pooled connection (a forked child must not share them)."""
    with _CLIENTS_LOCK:
        for c in _CLIENTS.values():
            c.close()
        _CLIENTS.clear()


# ---- the reader ---------------------------------------------------------------------

UNKNOWN_SIZE = 1 << 62
HEAD_BYTES = 64 * 1024  # the file's first bytes, kept to name what is wrong with a file that does not parse


class _RemoteStream(io.RawIOBase):
    """What every remote stream has: `read` (the subclass's), `readinto` from
    it, `transfer` (what reading cost), `head` (the first bytes read), and
    what the read adds to the file's identity."""

    transfer: Transfer

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def finish_identity(self, hasher) -> dict:
        """What the parse adds to the file's identity: what reading it cost
        and the CRC-32C of the bytes read (the rest is never transferred;
        the store's ETag stands for the whole file)."""
        return {**self.transfer.as_json(), "crc32c_read": hasher.hexdigest()}


class RangeReader(_RemoteStream):
    """A read-only stream over a remote file of known size, fetched `block`
    bytes at a time as it is read (`fetch(start, end) -> bytes`). Keeps the
    file's first bytes (`head`) and what the reading cost (`transfer`)."""

    def __init__(self, path: str, size: Optional[int], fetch: Callable[[int, int], bytes], transfer: Transfer,
                 block: int = BLOCK):
        super().__init__()
        self.name = path
        self.size = size if size is not None else UNKNOWN_SIZE  # until a short block shows the end
        self.fetch = fetch
        self.transfer = transfer
        self.head = b""
        self._block = block
        self._buf = b""
        self._buf_at = 0  # file offset of _buf[0]
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = min(max(0, base + offset), self.size)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        out = []
        while n > 0 and self._pos < self.size:
            if not self._buf_at <= self._pos < self._buf_at + len(self._buf):
                end = min(self.size, self._pos + self._block)
                self._buf, self._buf_at = self.fetch(self._pos, end), self._pos
                if len(self._buf) < end - self._pos:  # the end of a file of unknown size
                    self.size = self._pos + len(self._buf)
                if len(self.head) < HEAD_BYTES and self._buf_at == len(self.head):
                    self.head += self._buf[:HEAD_BYTES - len(self.head)]
                if not self._buf:
                    break
            i = self._pos - self._buf_at
            chunk = self._buf[i:i + n]
            out.append(chunk)
            self._pos += len(chunk)
            n -= len(chunk)
        return b"".join(out)

    def close(self) -> None:
        close = getattr(self.fetch, "close", None)
        if close is not None:
            close()
        super().close()


class _NoRanges(Exception):
    """The server answered a range request with the whole file (200)."""


def _ranged_fetch(client: HttpClient, url: str, etag: Optional[str], transfer: Transfer):
    def fetch(start: int, end: int) -> bytes:
        want = end - start
        try:
            r = client.request("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}, transfer=transfer,
                               resume=lambda got: {"Range": f"bytes={start + got}-{end - 1}"}, limit=want)
        except BodyTooLong:  # a 200 with the whole file: no range support after all
            raise _NoRanges() from None
        if r.status == 200 and start == 0 and len(r.body) == want:
            return r.body  # the whole file fits one block
        if r.status != 206:
            raise _NoRanges()
        if etag and r.headers.get("etag") and r.headers["etag"] != etag:
            raise ChangedWhileReading(f"{url} changed while it was read (ETag {etag} -> {r.headers['etag']})")
        if len(r.body) != want:
            raise TransferError(f"{url}: asked for bytes {start}-{end - 1}, got {len(r.body)}")
        return r.body
    return fetch


class _StreamedFetch:
    """fetch(start, end) over one streamed GET, for a server without range
    support (or a file of unknown size): reads on from where the last call
    stopped; a cut (or a jump backwards) asks for the file again and skips
    to `start`. With no known size, the end of the body is the file's end
    (a short last block)."""

    def __init__(self, client: HttpClient, url: str, etag: Optional[str], transfer: Transfer,
                 size: Optional[int] = None):
        self.client, self.url, self.etag, self.transfer, self.size = client, url, etag, transfer, size
        self._resp = self._handle = None
        self._pos = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.release(False)
        self._resp = self._handle = None

    def _open(self) -> None:
        self.close()
        resp, handle = self.client.stream(self.url, self.transfer)
        etag = resp.getheader("ETag")
        if self.etag and etag and etag != self.etag:
            handle.release(False)
            raise ChangedWhileReading(f"{self.url} changed while it was read (ETag {self.etag} -> {etag})")
        self._resp, self._handle, self._pos = resp, handle, 0

    def _read(self, n: int) -> bytes:
        """Up to n bytes; b"" at the end of a body of unknown size."""
        try:
            data = self._resp.read(n)
        except BODY_ERRORS as e:
            raise _Retry(f"connection cut ({type(e).__name__})") from None
        if not data and (self.size is not None or self._resp.length):
            raise _Retry("the body ended early")
        self.transfer.bytes += len(data)
        self._pos += len(data)
        return data

    def _attempt(self, start: int, end: int) -> bytes:
        """Bytes [start, end) from the stream, opened (again) if need be; on a
        failure that may pass the stream is dropped (the next attempt opens it)."""
        try:
            if self._resp is None or self._pos > start:
                self._open()
            while self._pos < start:
                if not self._read(min(start - self._pos, 1 << 20)):
                    return b""
            parts = []
            while self._pos < end:
                data = self._read(end - self._pos)
                if not data:  # the end of a file of unknown size
                    break
                parts.append(data)
            return b"".join(parts)
        except _Retry:
            self.close()
            raise

    def __call__(self, start: int, end: int) -> bytes:
        return self.client.retry.run(lambda: self._attempt(start, end), self.url, self.transfer,
                                     self.client.sleep, f"GET {self.url}")


# Servers (scheme, host, port) found to answer range requests with whole files, per process.
_NO_RANGES: set = set()


class _WebFetch:
    """Range requests; where the server turns out to ignore them (remembered
    for this process), one streamed GET."""

    def __init__(self, client: HttpClient, url: str, etag: Optional[str], transfer: Transfer, ranges: bool,
                 size: Optional[int] = None):
        self._server = HttpClient._split(url)[0]
        self._streamed = _StreamedFetch(client, url, etag, transfer, size)
        ranges = ranges and self._server not in _NO_RANGES
        self._ranged = _ranged_fetch(client, url, etag, transfer) if ranges else None

    def __call__(self, start: int, end: int) -> bytes:
        if self._ranged is not None:
            try:
                return self._ranged(start, end)
            except _NoRanges:
                _LOG.warning("%s://%s:%s ignores Range requests: its files are streamed instead (the rest of a "
                             "file is no longer left unread on the server)", *self._server)
                _NO_RANGES.add(self._server)
                self._ranged = None
        return self._streamed(start, end)

    def close(self) -> None:
        self._streamed.close()


def open_web(client: HttpClient, identity: FileIdentity, transfer: Transfer) -> RangeReader:
    """A stream over a web file whose identity `client.head` gave (its size
    and ETag): range requests of BLOCK bytes, each checked against the ETag,
    or one streamed GET where the server does not support ranges."""
    url, size = identity.path, identity.bytes
    fetch = _WebFetch(client, url, identity.etag, transfer, ranges=size is not None, size=size)
    return RangeReader(url, size, fetch, transfer)


# ---- S3 ---------------------------------------------------------------------------

def open_s3(client, identity: FileIdentity, transfer: Transfer, max_attempts: Optional[int] = None,
            sleep: Callable[[float], None] = time.sleep) -> RangeReader:
    """A stream over an S3 object (identity from HeadObject: size, ETag):
    GetObject with a byte range and If-Match per block. botocore retries
    the requests; a body cut mid-read is fetched again here, as often as
    botocore would try (AWS_MAX_ATTEMPTS, which --s3-max-attempts sets)."""
    max_attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS") or 3)
    path = identity.path
    policy = RetryPolicy(max_attempts=max_attempts)
    get = _s3_range_get(client, path, identity.etag, transfer)

    def fetch(start: int, end: int) -> bytes:
        return policy.run(lambda: get(start, end), path, transfer, sleep, f"GET {path}")

    return RangeReader(path, int(identity.bytes), fetch, transfer)


def _s3_range_get(client, path: str, etag: Optional[str], transfer: Transfer) -> Callable[[int, int], bytes]:
    """One attempt at bytes [start, end) of an S3 object, counted: a short
    body or a transport error is _Retry; S3's refusals are final
    (`s3_refusal`)."""
    from botocore.exceptions import BotoCoreError, ClientError
    bucket, key = path[len("s3://"):].split("/", 1)
    kw = {"IfMatch": etag} if etag else {}

    def get(start: int, end: int) -> bytes:
        transfer.requests += 1
        try:
            data = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **kw)["Body"].read()
        except ClientError as e:
            raise s3_refusal(e, path, etag) from None
        except (BotoCoreError, ConnectionError, OSError) as e:
            raise transport_failure(e) from None
        transfer.bytes += len(data)
        if len(data) != end - start:
            raise _Retry(f"got {len(data)} of {end - start} bytes")
        return data

    return get


def s3_refusal(e, path: str, etag: Optional[str]) -> TransferError:
    """The final error for S3's answer (a botocore ClientError): its ETag no
    longer matches (412), no such object (404), anything else."""
    code = str(e.response.get("Error", {}).get("Code", ""))
    if code in ("PreconditionFailed", "412"):
        return ChangedWhileReading(f"{path} changed while it was read (ETag {etag})")
    if code in ("NoSuchKey", "404"):
        return NotFound(f"{path}: no such object")
    return TransferError(f"{path}: {e}")


class CountingReader(_RemoteStream):
    """Any other filesystem's stream (FileSystems.open), counted."""

    def __init__(self, raw, path: str, transfer: Transfer):
        super().__init__()
        self._raw = raw
        self.name = path
        self.transfer = transfer
        transfer.requests += 1
        self.head = b""

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.transfer.bytes += len(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()
