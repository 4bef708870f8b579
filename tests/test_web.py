"""VitalDB's open dataset as an input (--input vitaldb, or any http(s) base
URL), against a stand-in for its web API on loopback (tests/webstandin.py)
that serves generated packed files with long waveforms, the gzip-encoded
/cases table, and injected faults. Also: remote files stream (S3 too) and
stop early; every file layout gives the same split files."""
import json
import os
import shutil

import pytest
from conftest import INMEM, run_cli, split_bytes
from s3util import FaultProxy, beam_s3_args, boto_client, upload_dir
from webstandin import StandIn

from pipeline.io import remote
from pipeline.io.sources import VITALDB_API_ENV, Source, SourceError, check_reachable
from pipeline.output import storage
from pipeline.tools import sample

CASES = [1, 2, 3, 4]
HOURS = 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Packed files with 500 Hz waveforms (VitalDB 1.0.1's layout) and the clinical table."""
    folder = tmp_path_factory.mktemp("api-files")
    sample.write_sample(str(folder), CASES, HOURS * 3600, waveforms=True, missing_weight=2)
    return str(folder)


@pytest.fixture(scope="module")
def local_run(files, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local-run"))
    assert run_cli("--input", files, "--output", out, INMEM) == 0
    return out


@pytest.fixture
def api(files, monkeypatch):
    with StandIn(files) as s:
        monkeypatch.setenv(VITALDB_API_ENV, s.url)
        yield s


def vital_bytes(files: str, cid: int) -> int:
    return os.path.getsize(f"{files}/{cid:04d}.vital")


def test_the_open_dataset_from_its_web_api_equals_a_local_run(api, files, local_run, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli("--input", "vitaldb", "--output", out, INMEM) == 0  # no --cases: every case of /cases
    text = capsys.readouterr().out
    assert split_bytes(out) == split_bytes(local_run) != {}
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["input"] == "vitaldb" and meta["source"]["dataset"] == "VitalDB open dataset 1.0.1"
    assert meta["source"]["location"] == f"{api.url}/1.0.1" and meta["clinical"] == f"{api.url}/cases"
    assert meta["cases"]["ok"] == CASES and meta["config"]["input"] == "vitaldb"
    # Streamed and stopped early: the waveforms were never sent.
    sent = sum(api.sent_for(c) for c in CASES)
    held = sum(vital_bytes(files, c) for c in CASES)
    assert sent < 0.25 * held, (sent, held)
    t = meta["transfer"]
    assert t["bytes_read"] == sent and t["file_bytes"] == held and t["cases"] == 4
    marker = storage.read_json(storage.marker_path(out, storage.DONE, 1))
    assert marker["input"]["bytes_read"] == api.sent_for(1) and marker["input"]["etag"].startswith('"')
    assert marker["input"]["bytes"] == vital_bytes(files, 1)
    assert f"remote input files: {sent / 1e6:.1f} MB read of {held / 1e6:.1f} MB in 4 files" in text
    assert "VitalDB open dataset 1.0.1" in text and "split by patient (subjectid)" in text
    assert ("GET", "/cases", "ok") in api.log


def test_faults_are_retried_and_change_nothing(api, local_run, tmp_path):
    api.plan("/1.0.1/1.vital", "ok", "503:1", "cut:1000")  # HEAD ok; GET: 503 with Retry-After, then a cut body
    api.plan("/1.0.1/2.vital", "429:0", "drop")  # HEAD: 429, then the connection closed
    api.plan("/1.0.1/3.vital", "ok", "cut:200000", "500")
    api.plan("/cases", "503:0")
    out = str(tmp_path / "o")
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1-4", INMEM) == 0
    assert split_bytes(out) == split_bytes(local_run)
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["transfer"]["retries"] == 6  # HEAD of 2 twice, GET of 1 twice, GET of 3 twice (/cases is not a case)
    assert [w for _, p, w in api.log if p == "/1.0.1/1.vital"] == ["ok", "503:1", "cut:1000", "ok"]
    # The cut body was resumed, not fetched again: case 3 cost one block and a bit.
    assert storage.read_json(storage.marker_path(out, storage.DONE, 3))["input"]["bytes_read"] \
        == remote.BLOCK + len("fault 500")


def test_a_missing_case_fails_alone_and_the_run_goes_on(api, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1,9", "--min-success-rate", "0", INMEM) == 0
    failed = json.load(open(f"{out}/preprocessing_metadata.json"))["cases"]["failed"]
    assert failed == [{"case_id": 9, "reason": "missing_file",
                       "detail": f"no 9.vital or 0009.vital in {api.url}/1.0.1"}]


def test_a_download_that_keeps_failing_is_a_recorded_failure(api, tmp_path):
    api.plan("/1.0.1/2.vital", "ok", *["503:0"] * 3)
    out = str(tmp_path / "o")
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1,2", "--http-max-attempts", "3",
                   "--min-success-rate", "0", INMEM) == 0
    (f,) = json.load(open(f"{out}/preprocessing_metadata.json"))["cases"]["failed"]
    assert f["case_id"] == 2 and f["reason"] == "download_failed" and "after 3 attempts" in f["detail"]
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1,2", INMEM) == 0  # a rerun heals it


def test_a_stalled_server_hits_the_read_timeout_and_is_retried(api, local_run, tmp_path):
    api.plan("/1.0.1/4.vital", "ok", "hang:3")
    out = str(tmp_path / "o")
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "4", "--http-timeout", "1", INMEM) == 0
    assert storage.read_json(storage.marker_path(out, storage.DONE, 4))["input"]["retries"] == 1


def test_an_unreachable_api_is_refused_at_start(files, tmp_path, monkeypatch, capsys):
    from s3util import free_port
    monkeypatch.setenv(VITALDB_API_ENV, f"http://127.0.0.1:{free_port()}")
    out = tmp_path / "o"
    assert run_cli("--input", "vitaldb", "--output", str(out), "--cases", "1", INMEM) == 2
    assert "--input vitaldb: cannot reach http://127.0.0.1" in capsys.readouterr().err
    assert not out.exists()


def test_plain_http_to_another_host_is_warned_about(caplog):
    with pytest.raises(SourceError):
        check_reachable("http://no-such-host.invalid/1.0.1", remote.WebOptions(timeout_s=1, max_attempts=1))
    assert "is plain http" in caplog.text
    caplog.clear()
    with pytest.raises(SourceError):
        check_reachable("http://127.0.0.1:9/", remote.WebOptions(timeout_s=1, max_attempts=1))
    assert "plain http" not in caplog.text


def test_a_rerun_checks_with_head_requests_and_a_changed_file_is_reprocessed(api, files, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1-4", INMEM) == 0
    n = len(api.log)
    assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1-4", INMEM) == 0
    rerun = api.log[n:]
    assert [m for m, p, _ in rerun if p.endswith(".vital")] == ["HEAD"] * 4  # nothing downloaded again
    # A changed file on the server: a new ETag, processed again and listed.
    saved = open(f"{files}/0003.vital", "rb").read()
    try:
        shutil.copy(f"{files}/0004.vital", f"{files}/0003.vital")
        capsys.readouterr()
        assert run_cli("--input", "vitaldb", "--output", out, "--cases", "1-4", INMEM) == 0
    finally:
        open(f"{files}/0003.vital", "wb").write(saved)
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["cases"]["changed_inputs"] == [3]
    assert "processed again because their input file changed" in capsys.readouterr().out


def test_any_https_base_url_works_the_same_way_and_a_server_without_ranges_too(files, local_run, tmp_path):
    with StandIn(files, version="mirror", ranges=False) as s:
        out = str(tmp_path / "o")
        assert run_cli("--input", f"{s.url}/mirror", "--clinical", f"{s.url}/cases", "--output", out,
                       "--cases", "1-4", INMEM) == 0
    assert split_bytes(out) == split_bytes(local_run)
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["source"]["kind"] == "web" and "dataset" not in meta["source"]


def test_s3_objects_stream_and_stop_early(moto_endpoint, s3_bucket, files, local_run, tmp_path):
    """Waveform-heavy packed files on the S3 emulator: the bytes that crossed
    the wire (counted by a proxy in front of it) are a small share of the
    objects, and the output equals the local run."""
    c = boto_client(moto_endpoint)
    src = upload_dir(c, files, s3_bucket, "raw")
    port = int(moto_endpoint.rsplit(":", 1)[1])
    out = str(tmp_path / "o")
    with FaultProxy(port, rate=0.0) as proxy:
        assert run_cli(*["--input", src, "--output", out, INMEM] + beam_s3_args(proxy.endpoint)) == 0
    assert split_bytes(out) == split_bytes(local_run)
    held = sum(vital_bytes(files, cid) for cid in CASES)
    vital_get = sum(n for path, n in proxy.sent.items() if path.endswith(".vital"))
    assert vital_get == 4 * remote.BLOCK < 0.25 * held
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["transfer"]["bytes_read"] == vital_get and meta["transfer"]["file_bytes"] == held
    inp = meta["provenance"]["inputs"]["1"]
    assert inp["etag"] and inp["crc32c_read"] and "crc32c" not in inp  # the store's identity; CRC of the bytes read


@pytest.mark.parametrize("layout", ["unpacked", "interleaved"])
def test_every_file_layout_gives_the_same_split_files(layout, tmp_path):
    """VitalDB's packed files, older unpacked ones, and Vital Recorder's own
    files with every track's records interleaved in time."""
    outs = {}
    for lay in ("packed", layout):
        folder = str(tmp_path / lay)
        sample.write_sample(folder, [1, 2, 3, 4, 5, 6], 1200, waveforms=True, layout=lay)
        outs[lay] = str(tmp_path / f"out-{lay}")
        assert run_cli("--input", folder, "--output", outs[lay], INMEM) == 0
    assert split_bytes(outs[layout]) == split_bytes(outs["packed"]) != {}


def test_an_interleaved_file_interleaves_and_streams_whole(tmp_path):
    """The interleaved writer's records really alternate between tracks in
    time order, and vitaldb reads such a file to its end (nothing to skip)."""
    import gzip
    import struct
    folder = str(tmp_path / "rec")
    sample.write_sample(folder, [1], 900, layout="interleaved")
    data = gzip.open(f"{folder}/0001.vital").read()
    pos = 10 + struct.unpack_from("<H", data, 8)[0]
    tids, dts = [], []
    while pos < len(data):
        kind, length = data[pos], struct.unpack_from("<I", data, pos + 1)[0]
        if kind == 1:
            dts.append(struct.unpack_from("<d", data, pos + 7)[0])
            tids.append(struct.unpack_from("<H", data, pos + 15)[0])
        pos += 5 + length
    assert dts == sorted(dts) and len(set(tids[:50])) > 3  # the first records already come from several tracks
    with StandIn(folder, version="v") as s:
        source = Source.for_location(f"{s.url}/v")
        from pipeline.io.vital import load_case
        rc = load_case(source, 1)
    assert rc.input.bytes_read == os.path.getsize(f"{folder}/0001.vital")


@pytest.mark.parametrize("mode", ["no-sizes", "no-head", "redirect"])
def test_servers_that_send_no_sizes_refuse_head_or_redirect(mode, files, local_run, tmp_path):
    """Web servers unlike VitalDB's: bodies without Content-Length (they end
    when the connection closes), HEAD refused (405: the first byte is asked
    for instead), case files behind a redirect (a mirror, a CDN)."""
    kw = {"no-sizes": {"sizes": False}, "no-head": {"head": False}, "redirect": {"redirect": True}}[mode]
    with StandIn(files, version="m", **kw) as s:
        out = str(tmp_path / "o")
        assert run_cli("--input", f"{s.url}/m", "--clinical", f"{s.url}/cases", "--output", out, "--cases", "1-4",
                       INMEM) == 0
        log = list(s.log)
    assert split_bytes(out) == split_bytes(local_run)
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    assert meta["transfer"]["retries"] == 0
    if mode == "redirect":
        assert ("GET", "/files/m/1.vital", "ok") in log
    if mode == "no-head":
        assert ("HEAD", "/m/1.vital", "ok") in log and meta["provenance"]["inputs"]["1"]["bytes"] == \
            os.path.getsize(f"{files}/0001.vital")
