"""Shared fixtures: VitalDB-format cases generated with the `vitaldb` library,
including every kind of broken input, and helpers to read outputs back with
TensorFlow."""
from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
import vitaldb

from pipeline.tools import sample

GOOD = [1, 2, 3, 4, 5, 6, 7, 8]
TRUNCATED, BAD_MAGIC, EMPTY, NO_TRACKS, SHORT, NO_ROW, MISSING = 101, 102, 103, 104, 105, 106, 107
IMPLAUSIBLE, DUPLICATE_ROW, NOT_VITAL = 108, 109, 110
ALL_CASES = GOOD + [TRUNCATED, BAD_MAGIC, EMPTY, NO_TRACKS, SHORT, NO_ROW, MISSING, IMPLAUSIBLE, DUPLICATE_ROW,
                    NOT_VITAL]
# A Philips monitor's tracks as Vital Recorder names them: a valid file with none of our tracks.
INTELLIVUE_TRACKS = ["Intellivue/ECG_HR", "Intellivue/HR", "Intellivue/ABP_SYS", "Intellivue/ABP_DIA",
                     "Intellivue/ABP_MEAN", "Intellivue/NIBP_SYS", "Intellivue/NIBP_DIA", "Intellivue/NIBP_MEAN",
                     "Intellivue/PLETH_SAT_O2", "Intellivue/PLETH_HR", "Intellivue/RR", "Intellivue/TEMP",
                     "Intellivue/CVP_MEAN", "Intellivue/ST_II"]
# Entry errors of the clinical table (contract 1.1): all treated as missing.
IMPLAUSIBLE_ROW = {"weight": 900.0, "height": 500.0, "age": 430.0, "asa": 7.0, "sex": " m "}


# What the run over every case kind records as failures.
EXPECTED_FAILURES = {TRUNCATED: "corrupt_file", BAD_MAGIC: "corrupt_file", EMPTY: "corrupt_file",
                     NOT_VITAL: "corrupt_file", NO_TRACKS: "no_tracks", MISSING: "missing_file",
                     DUPLICATE_ROW: "duplicate_clinical_row"}
# VitalDB's track names -> a Philips IntelliVue monitor's, as Vital Recorder names them.
TO_INTELLIVUE = {"Solar8000/HR": "Intellivue/HR", "Solar8000/ART_SBP": "Intellivue/ABP_SYS",
                 "Solar8000/ART_DBP": "Intellivue/ABP_DIA", "Solar8000/ART_MBP": "Intellivue/ABP_MEAN",
                 "Solar8000/NIBP_SBP": "Intellivue/NIBP_SYS", "Solar8000/NIBP_DBP": "Intellivue/NIBP_DIA",
                 "Solar8000/NIBP_MBP": "Intellivue/NIBP_MEAN", "Solar8000/PLETH_SPO2": "Intellivue/PLETH_SAT_O2",
                 "Solar8000/ETCO2": "Intellivue/AWAY_CO2_ET", "Solar8000/RR": "Intellivue/RR"}


def write_foreign_monitor_file(path: str, tracks=INTELLIVUE_TRACKS, seconds: int = 1200) -> None:
    """A .vital file another monitor wrote, made like a user would with the
    library: tracks added, the header's times left to vitaldb."""
    vf = vitaldb.VitalFile()
    t0 = 4102444800.0
    for name in tracks:
        vf.add_track(name, [{"dt": t0 + t, "val": 1.0} for t in range(0, seconds, 2)], unit="")
    vf.to_vital(path)


def write_dataset(folder: str, good=GOOD, duration_s: int = 1500) -> str:
    """Good cases (with a missing weight and a missing ASA), plus broken ones."""
    sample.write_sample(folder, list(good) + [SHORT, NO_ROW, IMPLAUSIBLE, DUPLICATE_ROW], duration_s,
                        short_case=SHORT, missing_weight=good[1], missing_asa=good[2], no_clinical_row=NO_ROW)
    # Truncated: the first third of a real file.
    src = open(os.path.join(folder, f"{good[0]:04d}.vital"), "rb").read()
    open(os.path.join(folder, f"{TRUNCATED:04d}.vital"), "wb").write(src[: len(src) // 3])
    open(os.path.join(folder, f"{BAD_MAGIC:04d}.vital"), "wb").write(b"PK\x03\x04 this is a zip, not a vital file")
    open(os.path.join(folder, f"{EMPTY:04d}.vital"), "wb").write(b"")
    write_foreign_monitor_file(os.path.join(folder, f"{NO_TRACKS:04d}.vital"))
    import gzip
    with gzip.open(os.path.join(folder, f"{NOT_VITAL:04d}.vital"), "wb") as fh:
        fh.write(b"caseid,age\n1,50\n")  # gzip, but not a .vital file
    # Rows for the broken cases too, so only the file is at fault.
    df = pd.read_csv(os.path.join(folder, "clinical_data.csv"))
    extra = df.iloc[[0] * 5].copy()
    extra["caseid"] = [TRUNCATED, BAD_MAGIC, EMPTY, NO_TRACKS, NOT_VITAL]
    df = df.astype({"sex": object})
    df.loc[df["caseid"] == IMPLAUSIBLE, list(IMPLAUSIBLE_ROW)] = list(IMPLAUSIBLE_ROW.values())
    df.loc[df["caseid"] == IMPLAUSIBLE, "bmi"] = None
    same = df[df["caseid"] == GOOD[0]]  # an identical duplicate row is one row
    other = df[df["caseid"] == DUPLICATE_ROW].assign(weight=lambda d: d["weight"] + 10)
    pd.concat([df, extra, same, other]).to_csv(os.path.join(folder, "clinical_data.csv"), index=False)
    return folder


def expected_split(case_id: int, clinical_csv: str, seed: int = 42, percent=(70, 15, 15)) -> str:
    """A case's split computed here, independently of the pipeline's code
    (contract 1.2): key "s<subjectid>" from its row, else the case id."""
    import hashlib
    df = pd.read_csv(clinical_csv, dtype={"subjectid": str})
    rows = df[df["caseid"] == case_id]
    sid = rows["subjectid"].iloc[0] if len(rows) and "subjectid" in df else None
    key = f"s{int(float(sid))}" if isinstance(sid, str) and sid.strip() else str(case_id)
    bucket = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) % 100
    return "train" if bucket < percent[0] else "validation" if bucket < percent[0] + percent[1] else "test"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    return write_dataset(str(tmp_path_factory.mktemp("vital")))


INMEM = "--direct_running_mode=in_memory"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_repo(dest) -> str:
    """The repository's files as a user's clone has them (tracked, and new
    ones git does not ignore) copied to `dest`; nothing built or installed."""
    import shutil
    import subprocess
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if os.path.exists(os.path.join(REPO, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), os.path.join(dest, f))
    return str(dest)


def run_cli(*argv: str) -> int:
    """The command line with its stages in this process (no stage process to
    start: the same graph and code, ~6 s less per run); its exit code."""
    from pipeline import cli
    return cli.main(list(argv), supervised=False)


@pytest.fixture(scope="session")
def run_output(dataset, tmp_path_factory):
    """One run over every case kind; returns (exit code, output dir)."""
    out = str(tmp_path_factory.mktemp("out"))
    cases = ",".join(map(str, ALL_CASES))
    return run_cli("--input", dataset, "--output", out, "--cases", cases, "--min-success-rate", "0", INMEM), out


def parse_spec():
    import tensorflow as tf
    return {
        "timeseries": tf.io.FixedLenFeature([4800], tf.float32),
        "static": tf.io.FixedLenFeature([6], tf.float32),
        "targets": tf.io.FixedLenFeature([8], tf.float32),
        "case_id": tf.io.FixedLenFeature([1], tf.int64),
        "window_start": tf.io.FixedLenFeature([1], tf.int64),
    }


def read_examples(files, features=None) -> list[dict]:
    """Every example of GZIP TFRecord files, parsed by TensorFlow."""
    import tensorflow as tf
    features = features or parse_spec()
    out = []
    for rec in tf.data.TFRecordDataset(list(files), compression_type="GZIP"):
        ex = tf.io.parse_single_example(rec, features)
        out.append({k: v.numpy() for k, v in ex.items()})
    return out


def examples_by_key(examples) -> dict:
    return {(int(e["case_id"][0]), int(e["window_start"][0])): e for e in examples}


def assert_same_examples(got: dict, ref: dict) -> None:
    """Two {(case, window_start): example} maps hold the same values."""
    import numpy as np
    assert got.keys() == ref.keys()
    for k in ref:
        for f in ("timeseries", "static", "targets"):
            np.testing.assert_array_equal(got[k][f], ref[k][f])


def split_bytes(out: str) -> dict:
    """{relative path: bytes} of an output's split files."""
    from pipeline.output import storage
    from transforms import spec
    return {os.path.relpath(f, out): open(f, "rb").read()
            for s in spec.SPLIT_NAMES for f in storage.list_files(storage.split_files_glob(out, s))}


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3/SageMaker/IAM server on a free loopback port, for the session."""
    from moto.server import ThreadedMotoServer
    from s3util import free_port, s3_env
    old = {k: os.environ.get(k) for k in s3_env()}
    os.environ.update(s3_env())
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_endpoint, request):
    """A fresh bucket (valid S3 name) for one test."""
    from s3util import boto_client
    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    boto_client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def io_settings_restored():
    """parse_request applies the Beam flags' S3 options to this process (the
    environment, Beam's FileSystems): undone after the test."""
    from apache_beam.io.filesystems import FileSystems
    env, options = dict(os.environ), FileSystems._pipeline_options
    yield
    os.environ.clear()
    os.environ.update(env)
    FileSystems._pipeline_options = options


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page, profile, *args: str) -> str:
    """Headless Chromium on a local page, as this machine allows it (no
    background networking); its standard output (--dump-dom's DOM)."""
    import subprocess
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args, page.as_uri()], capture_output=True, text=True,
                          timeout=120).stdout
