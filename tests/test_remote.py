"""The remote readers' parts: the retry policy (backoff, Retry-After) and the
classification of answers, block-wise reading, S3 range reads,
the bound on connections per process."""
import email.utils
import http.client
import io
import random
import socket
import threading

import pytest
from webstandin import StandIn

from pipeline.io import remote
from pipeline.io.identity import FileIdentity


def test_backoff_honours_retry_after_else_jitters_exponentially():
    opts = remote.WebOptions(backoff_s=0.5, backoff_max_s=4.0)
    assert remote.backoff_delay(3, opts, retry_after=7.0) == 7.0
    assert [remote.backoff_delay(a, opts, rng=lambda: 1.0) for a in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert remote.backoff_delay(5, opts, rng=lambda: 0.0) == 0.0


def test_retry_after_in_seconds_or_as_a_date():
    assert remote.parse_retry_after("120") == 120.0
    now = 1_800_000_000.0
    assert remote.parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert remote.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert remote.parse_retry_after("soon") is None and remote.parse_retry_after(None) is None


def test_a_range_reader_fetches_only_the_blocks_read():
    data = bytes(range(256)) * 4096  # 1 MiB
    calls = []

    def fetch(start, end):
        calls.append((start, end))
        return data[start:end]

    r = remote.RangeReader("x", len(data), fetch, remote.Transfer(), block=100_000)
    assert r.read(10) == data[:10] and r.read(99_990) == data[10:100_000]
    assert calls == [(0, 100_000)]
    r.seek(350_000)
    assert r.read(5) == data[350_000:350_005] and calls[-1] == (350_000, 450_000)
    assert r.head == data[:remote.HEAD_BYTES]
    r.seek(0, 2)
    assert r.read(10) == b"" and len(calls) == 2


def test_a_long_retry_after_fails_at_once(tmp_path):
    (tmp_path / "1.vital").write_bytes(b"x")
    with StandIn(str(tmp_path), version="v") as s:
        s.plan("/v/1.vital", "503:3600")
        c = remote.HttpClient(remote.WebOptions(max_attempts=5))
        waits = []
        c.sleep = waits.append
        with pytest.raises(remote.TransferError, match="retry after 3600 s"):
            c.head(f"{s.url}/v/1.vital")
        assert len(s.log) == 1 and waits == []  # no wait, no second request


def test_retry_after_is_honoured_and_faults_are_retried(tmp_path):
    """The waits the client takes between attempts (recorded, not slept):
    the server's Retry-After, else backoff with jitter."""
    (tmp_path / "1.vital").write_bytes(b"z" * 5000)
    with StandIn(str(tmp_path), version="v") as s:
        s.plan("/v/1.vital", "503:7", "429:3", "drop", "500")
        c = remote.HttpClient(remote.WebOptions(backoff_s=0.5, backoff_max_s=4.0))
        waits = []
        c.sleep = waits.append
        t = remote.Transfer()
        assert c.head(f"{s.url}/v/1.vital", t).bytes == 5000
        assert waits[:2] == [7.0, 3.0] and 0 <= waits[2] <= 2.0 and 0 <= waits[3] <= 4.0
        assert t.requests == 5 and t.retries == 4


def test_connections_per_process_are_bounded(tmp_path):
    (tmp_path / "1.vital").write_bytes(b"y" * 1000)
    with StandIn(str(tmp_path), version="v") as s:
        s.plan("/v/1.vital", *["slow:0.3"] * 8)
        c = remote.HttpClient(remote.WebOptions(connections=2))
        threads = [threading.Thread(target=c.head, args=(f"{s.url}/v/1.vital",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.requests["/v/1.vital"] == 8 and 1 <= s.most_active <= 2
        c.close()


def test_a_cut_error_page_is_not_taken_for_file_bytes(tmp_path):
    """A 503 whose page is cut mid-body: retried, and nothing of the page
    ends up among the file's bytes (the resumed range starts where the file's
    bytes ended)."""
    data = bytes(range(256)) * 4000  # 1 MB
    (tmp_path / "1.vital").write_bytes(data)
    with StandIn(str(tmp_path), version="v") as s:
        s.plan("/v/1.vital", "ok", "cut:70000", "errcut:500", "ok")
        c = remote.HttpClient(remote.WebOptions())
        c.sleep = lambda _: None
        t = remote.Transfer()
        ident = c.head(f"{s.url}/v/1.vital", t)
        r = remote.open_web(c, ident, t)
        assert r.read() == data
        assert [w for _, _, w in s.log][:4] == ["ok", "cut:70000", "errcut:500", "ok"]


# ---- the one classification of answers and transport errors ----------------------

@pytest.mark.parametrize("status", [429, 500, 501, 502, 503, 504, 599])
def test_429_and_every_5xx_may_pass(status):
    assert remote.classify_status(status) == remote.RETRY
    e = remote.status_error("u", status, remote.RETRY, "7")
    assert isinstance(e, remote._Retry) and str(e) == f"HTTP {status}" and e.retry_after == 7.0
    assert remote.status_error("u", status, remote.RETRY).retry_after is None


def test_statuses_are_sorted_in_one_order():
    assert [remote.classify_status(s) for s in (200, 206)] == [remote.OK] * 2
    assert remote.classify_status(206, ok=(200,)) == remote.FINAL  # a range answer where the whole was asked for
    assert [remote.classify_status(s) for s in (404, 410)] == [remote.MISSING] * 2
    assert remote.classify_status(404, missing=()) == remote.FINAL
    assert [remote.classify_status(s) for s in (400, 401, 403, 405, 416)] == [remote.FINAL] * 5
    for s in remote.REDIRECTS:  # followed only with a Location and redirects left, else final
        assert remote.classify_status(s, follow=True) == remote.REDIRECT
        assert remote.classify_status(s) == remote.FINAL
    assert remote.classify_status(302, ok=range(100, 600), follow=True) == remote.OK  # what is wanted comes first
    assert remote.classify_status(404, follow=True) == remote.MISSING


def test_final_answers_name_the_file_and_the_status():
    e = remote.status_error("http://h/1.vital", 404, remote.MISSING, "7", b"gone")
    assert type(e) is remote.NotFound and str(e) == "http://h/1.vital: HTTP 404"
    e = remote.status_error("http://h/1.vital", 403, remote.FINAL, None, b"x" * 300)
    assert type(e) is remote.HTTPStatus and e.status == 403
    assert str(e) == "http://h/1.vital: HTTP 403 " + repr(b"x" * 200)


def test_transport_errors_that_may_pass():
    for e in (ConnectionResetError("reset"), socket.timeout("timed out"), http.client.RemoteDisconnected("gone"),
              http.client.BadStatusLine("?"), OSError("unreachable")):
        assert isinstance(e, remote.SEND_ERRORS)
    for e in (http.client.IncompleteRead(b"ab", 3), ConnectionAbortedError(), socket.timeout()):
        assert isinstance(e, remote.BODY_ERRORS)
    assert not isinstance(ValueError(), remote.SEND_ERRORS + remote.BODY_ERRORS)
    r = remote.transport_failure(ConnectionResetError("reset"))
    assert isinstance(r, remote._Retry) and str(r) == "ConnectionResetError: reset" and r.retry_after is None


# ---- the one retry policy -------------------------------------------------------

def _attempts(*outcomes):
    """An attempt function: each call raises or returns the next outcome; `calls` counts them."""
    it = iter(outcomes)

    def attempt():
        attempt.calls += 1
        o = next(it)
        if isinstance(o, BaseException):
            raise o
        return o
    attempt.calls = 0
    return attempt


def test_the_policy_waits_with_backoff_and_full_jitter():
    p = remote.RetryPolicy(max_attempts=8, backoff_s=0.5, backoff_max_s=4.0, rng=lambda: 1.0)
    assert [p.delay(a) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert remote.RetryPolicy(rng=lambda: 0.0).delay(5) == 0.0
    seeded = remote.RetryPolicy(backoff_s=0.5, backoff_max_s=4.0, rng=random.Random(7).random)
    r = random.Random(7)
    assert [seeded.delay(a) for a in (1, 2, 3, 4)] == [r.random() * c for c in (0.5, 1.0, 2.0, 4.0)]
    # The web's options and S3's reads: the same defaults as WebOptions'.
    assert remote.RetryPolicy.of(remote.WebOptions()) == remote.RetryPolicy()
    opts = remote.WebOptions(max_attempts=3, backoff_s=0.2, backoff_max_s=1.0)
    assert remote.RetryPolicy.of(opts) == remote.RetryPolicy(3, 0.2, 1.0)
    assert remote.backoff_delay(4, opts, rng=lambda: 1.0) == remote.RetryPolicy.of(opts, lambda: 1.0).delay(4) == 1.0


def test_the_policy_honours_retry_after_uncapped_by_the_backoff_up_to_its_limit():
    p = remote.RetryPolicy(max_attempts=5, backoff_s=0.5, backoff_max_s=4.0, rng=lambda: 1.0)
    waits, t = [], remote.Transfer()
    attempt = _attempts(remote._Retry("HTTP 503", retry_after=7.0), remote._Retry("cut"),
                        remote._Retry("HTTP 429", retry_after=300.0), "body")
    assert p.run(attempt, "u", t, waits.append) == "body"
    assert waits == [7.0, 1.0, 300.0] and t.retries == 3 and attempt.calls == 4
    assert p.next_wait(1, remote._Retry("HTTP 503", retry_after=0.0), "u") == 0.0


def test_a_retry_after_past_the_limit_fails_at_once():
    p = remote.RetryPolicy(max_attempts=5)
    waits, t = [], remote.Transfer()
    attempt = _attempts(remote._Retry("HTTP 503", retry_after=301.0))
    with pytest.raises(remote.TransferError) as e:
        p.run(attempt, "http://h/1.vital", t, waits.append)
    assert type(e.value) is remote.TransferError
    assert str(e.value) == "http://h/1.vital: the server asks to retry after 301 s"
    assert waits == [] and t.retries == 0 and attempt.calls == 1


def test_spent_attempts_fail_naming_the_last_failure():
    p = remote.RetryPolicy(max_attempts=3, rng=lambda: 0.0)
    waits, t = [], remote.Transfer()
    # the last attempt's long Retry-After: the attempts are spent, not a wait refused
    attempt = _attempts(remote._Retry("HTTP 500"), remote._Retry("cut"), remote._Retry("HTTP 503", retry_after=3600))
    with pytest.raises(remote.TransferError) as e:
        p.run(attempt, "http://h/1.vital", t, waits.append)
    assert str(e.value) == "http://h/1.vital: failed after 3 attempts (last: HTTP 503)"
    assert waits == [0.0, 0.0] and t.retries == 2 and attempt.calls == 3
    one = remote.RetryPolicy(max_attempts=1)
    with pytest.raises(remote.TransferError, match=r"^u: failed after 1 attempts \(last: x\)$"):
        one.run(_attempts(remote._Retry("x")), "u", t, waits.append)
    assert t.retries == 2


def test_a_final_answer_is_not_retried():
    p = remote.RetryPolicy(max_attempts=5)
    waits, t = [], remote.Transfer()
    attempt = _attempts(remote._Retry("HTTP 500"), remote.NotFound("u: HTTP 404"))
    with pytest.raises(remote.NotFound):
        p.run(attempt, "u", t, waits.append)
    assert attempt.calls == 2 and t.retries == 1 and len(waits) == 1


def test_a_streamed_read_follows_the_same_policy(tmp_path):
    """A server without range support: the streamed GET's faults are retried
    by the same policy (Retry-After honoured; a long one fails at once)."""
    data = b"s" * 3000
    (tmp_path / "1.vital").write_bytes(data)
    with StandIn(str(tmp_path), version="v", ranges=False) as s:
        s.plan("/v/1.vital", "503:7", "500", "ok", "503:3600")
        c = remote.HttpClient(remote.WebOptions(backoff_s=0.5, backoff_max_s=4.0))
        waits = []
        c.sleep = waits.append
        t = remote.Transfer()
        fetch = remote._StreamedFetch(c, f"{s.url}/v/1.vital", None, t, size=len(data))
        assert fetch(0, 1000) == data[:1000]
        assert waits[0] == 7.0 and 0 <= waits[1] <= 1.0 and t.requests == 3 and t.retries == 2
        fetch.close()
        with pytest.raises(remote.TransferError, match="retry after 3600 s"):
            remote._StreamedFetch(c, f"{s.url}/v/1.vital", None, t)(0, 10)
        assert len(waits) == 2 and t.requests == 4
        c.close()


# ---- S3 range reads, through the same policy ---------------------------------------

class _FakeS3:
    """get_object answers: bytes (a body, maybe short) or an exception, in order."""

    def __init__(self, data: bytes, *answers):
        self.data, self.answers, self.calls = data, list(answers), []

    def get_object(self, Bucket, Key, Range, **kw):
        self.calls.append((Bucket, Key, Range, kw))
        a = self.answers.pop(0) if self.answers else None
        if isinstance(a, BaseException):
            raise a
        start, end = (int(x) for x in Range[len("bytes="):].split("-"))
        return {"Body": io.BytesIO(self.data[start:end + 1][:a])}


def _s3_error(code):
    from botocore.exceptions import ClientError
    return ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")


def test_s3_range_reads_retry_short_bodies_and_dropped_connections():
    data = bytes(range(256)) * 8
    s3 = _FakeS3(data, 10, ConnectionResetError("reset"))  # a short body, a dropped connection, then whole
    t, waits = remote.Transfer(), []
    r = remote.open_s3(s3, FileIdentity("s3://b/k.vital", len(data), etag='"e"'), t, max_attempts=3,
                       sleep=waits.append)
    assert r.read() == data
    assert s3.calls[0] == ("b", "k.vital", f"bytes=0-{len(data) - 1}", {"IfMatch": '"e"'})
    assert t.requests == 3 and t.retries == 2 and t.bytes == 10 + len(data)
    assert 0 <= waits[0] <= 0.5 and 0 <= waits[1] <= 1.0  # WebOptions' backoff: 0.5 s doubling, full jitter


def test_s3_range_reads_give_up_as_before():
    t = remote.Transfer()
    s3 = _FakeS3(b"x" * 100, *[ConnectionResetError("reset")] * 3)
    r = remote.open_s3(s3, FileIdentity("s3://b/k", 100), t, max_attempts=3, sleep=lambda _: None)
    with pytest.raises(remote.TransferError) as e:
        r.read()
    assert str(e.value) == "s3://b/k: failed after 3 attempts (last: ConnectionResetError: reset)"
    assert t.requests == 3 and t.retries == 2 and s3.calls[0][3] == {}
    for code, kind, message in [("PreconditionFailed", remote.ChangedWhileReading,
                                 "s3://b/k changed while it was read (ETag \"e\")"),
                                ("412", remote.ChangedWhileReading, "s3://b/k changed while it was read (ETag \"e\")"),
                                ("NoSuchKey", remote.NotFound, "s3://b/k: no such object"),
                                ("404", remote.NotFound, "s3://b/k: no such object"),
                                ("AccessDenied", remote.TransferError, None)]:
        t = remote.Transfer()
        r = remote.open_s3(_FakeS3(b"x" * 100, _s3_error(code)), FileIdentity("s3://b/k", 100, etag='"e"'),
                           t, max_attempts=3, sleep=lambda _: None)
        with pytest.raises(remote.TransferError) as e:
            r.read()
        assert type(e.value) is kind and t.requests == 1 and t.retries == 0  # final: not retried
        assert str(e.value) == (message or f"s3://b/k: {_s3_error(code)}")
