"""The remote readers' parts: backoff and Retry-After, block-wise reading,
the bound on connections per process."""
import email.utils
import threading

import pytest

from pipeline.io import remote
from webstandin import StandIn


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
        assert c.head(f"{s.url}/v/1.vital", t)["bytes"] == 5000
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
