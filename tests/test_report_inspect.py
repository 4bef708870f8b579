"""What users see: the quality report (checked in headless Chromium), inspect, progress."""
import json
import re
from pathlib import Path

import pytest
from conftest import CHROMIUM, GOOD, NO_ROW, chromium, run_cli
from s3util import beam_s3_args, boto_client, upload_dir

from pipeline.cli import main
from transforms import spec


def test_quality_numbers_match_the_metadata(run_output):
    _, out = run_output
    q = json.load(open(f"{out}/report/quality.json"))
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    for s in spec.SPLIT_NAMES:
        assert q["splits"][s]["windows"] == meta["splits"][s]["windows"]
        assert q["splits"][s]["cases"] == meta["splits"][s]["cases"]
    assert q["cases_in_two_splits"] == []
    assert [f["name"] for f in q["features"]] == list(spec.DEFAULT_SPEC.feature_names)
    for f in q["features"]:
        assert abs(sum(f["rules"].values()) - 1.0) < 1e-4
    hr = q["features"][0]
    assert 0.3 < hr["measured_share"] < 0.6  # Solar 8000 records every 2 s
    assert hr["sources"] == {"Solar8000/HR": 1.0}
    assert q["failed_by_reason"] == {"corrupt_file": 4, "missing_file": 1, "no_tracks": 1, "duplicate_clinical_row": 1}
    assert {c["case_id"] for c in q["cases"] if c["no_clinical_row"]} == {NO_ROW}
    # A drug at 0 mg/kg/h sits at -1 but is not outside its range; ETCO2 0 kPa imputed off the
    # ventilator is below lo = 2 kPa: shown apart, not counted as clipped (that warns of a unit problem).
    names = [f["name"] for f in q["features"]]
    train = {n: q["features"][names.index(n)]["splits"]["train"] for n in ("Propofol_INF", "ETCO2", "FIO2", "RR")}
    assert train["Propofol_INF"]["imputed_outside_share"] == 0
    for n in ("ETCO2", "FIO2", "RR"):
        assert train[n]["clipped_share"] < 0.01 < 0.1 < train[n]["imputed_outside_share"], (n, train[n])
    hr = q["features"][0]["splits"]["train"]["hist"]
    assert sum(hr) == sum(w for c in q["cases"] if c["split"] == "train" for w in [c["windows"] * 300])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_page_loads_in_a_real_browser_with_images_and_no_broken_links(run_output, tmp_path):
    _, out = run_output
    page = Path(out) / "report" / "index.html"
    dom = chromium(page, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images-ok="true"' in body and 'data-images="3"' in body  # set by the page after load
    ids = set(re.findall(r'id="([^"]+)"', dom))
    for href in re.findall(r'href="([^"]+)"', dom):
        if href.startswith("#"):
            assert href[1:] in ids, href
        else:
            assert (page.parent / href).resolve().exists(), href
    shot = tmp_path / "report.png"
    chromium(page, tmp_path / "profile", "--window-size=1300,3000", f"--screenshot={shot}")
    assert shot.stat().st_size > 50_000  # a page with charts, not a blank one


def test_inspect_local_output_split_folder_and_file(run_output, capsys):
    _, out = run_output
    assert main(["inspect", out, "--examples", "1"]) == 0
    text = capsys.readouterr().out
    assert "example: case" in text and "Propofol_INF" in text and "mg/kg/h" in text
    assert re.search(r"HR\s+1/min\s+[\d.]+", text)
    total = sum(json.load(open(f"{out}/preprocessing_metadata.json"))["splits"][s]["windows"]
                for s in spec.SPLIT_NAMES)
    assert f"{total} examples in" in text
    assert main(["inspect", f"{out}/train"]) == 0
    files = sorted(Path(out, "train").glob("*.tfrecord.gz"))
    assert main(["inspect", str(files[0]), "--examples", "0"]) == 0
    assert "examples in 1 files" in capsys.readouterr().out
    assert main(["inspect", f"{out}/nothing-here"]) == 2


def test_inspect_s3_output(moto_endpoint, s3_bucket, dataset, capsys):
    c = boto_client(moto_endpoint)
    src = upload_dir(c, dataset, s3_bucket, "raw")
    out = f"s3://{s3_bucket}/out"
    assert run_cli(*["--input", src, "--output", out, "--cases", ",".join(map(str, GOOD[:2])),
                 "--direct_running_mode=in_memory"] + beam_s3_args(moto_endpoint)) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--examples", "1"] + beam_s3_args(moto_endpoint)) == 0
    text = capsys.readouterr().out
    assert "example: case" in text and f"{out}/" in text
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=s3_bucket, Prefix="out/report/")["Contents"]]
    assert sorted(keys) == ["out/report/index.html", "out/report/quality.json"]
