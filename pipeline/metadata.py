"""preprocessing_metadata.json and schema.pbtxt (tensorflow_metadata Schema)."""
from __future__ import annotations

import datetime
import platform
from importlib import metadata as importlib_metadata
from typing import Optional

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from pipeline import storage
from transforms import spec
from transforms.case import Settings

PACKAGES = ("master-poc-preprocessing", "apache-beam", "tfx-bsl", "tensorflow-metadata", "numpy", "pandas",
            "pyarrow", "vitaldb", "boto3")


def example_features(settings: Settings) -> list[tuple[str, int, int]]:
    """(name, schema type, length) of every example feature, in SPEC's order."""
    feats = [("timeseries", schema_pb2.FLOAT, settings.window * spec.N_FEATURES),
             ("static", schema_pb2.FLOAT, spec.N_STATIC),
             ("targets", schema_pb2.FLOAT, spec.N_TARGETS),
             ("case_id", schema_pb2.INT, 1),
             ("window_start", schema_pb2.INT, 1)]
    if settings.emit_mask:
        feats.append(("observed", schema_pb2.FLOAT, settings.window * spec.N_FEATURES))
    return feats


def schema_text(settings: Settings) -> str:
    schema = schema_pb2.Schema()
    for name, ftype, length in example_features(settings):
        f = schema.feature.add(name=name, type=ftype)
        f.shape.dim.add(size=length)
        f.presence.min_fraction = 1.0
        f.presence.min_count = 1
    return text_format.MessageToString(schema)


def utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib_metadata.version(p)
        except importlib_metadata.PackageNotFoundError:
            out[p] = None
    return out


def build_metadata(*, settings: Settings, status: str, requested: list[int], done: dict[int, dict],
                   failed: dict[int, dict], verification: Optional[dict], started: str,
                   input_dir: Optional[str], clinical: Optional[str], output: str,
                   not_done: Optional[list[int]] = None) -> dict:
    splits = {}
    for s in spec.SPLIT_NAMES:
        cases = sorted(c for c, m in done.items() if m.get("split") == s and m.get("windows", 0) > 0)
        splits[s] = {"cases": len(cases), "windows": int(sum(done[c]["windows"] for c in cases)),
                     "case_ids": cases,
                     "files": sorted(f.rsplit("/", 1)[-1] for f in
                                     storage.list_files(storage.join(output, s, "*.tfrecord.gz")))}
    w = settings.window
    return {
        "status": status,
        "started": started,
        "finished": utcnow(),
        "input": input_dir,
        "clinical": clinical,
        "output": output,
        "settings": settings.as_dict(),
        "format": {"files": "GZIP TFRecord of tf.train.Example",
                   "pattern": "<split>/<split>-SSSSS-of-NNNNN.tfrecord.gz",
                   "schema": storage.SCHEMA_NAME,
                   "features": {n: {"type": "float" if t == schema_pb2.FLOAT else "int64", "length": L}
                                for n, t, L in example_features(settings)},
                   "shapes": {"timeseries": [w, spec.N_FEATURES], "static": [spec.N_STATIC],
                              "targets": [spec.N_TARGETS]},
                   "timeseries_layout": "row-major (time, feature)",
                   "target_second": f"window_start + {w} - 1 + horizon"},
        "spec": spec.spec_as_dict(),
        "splits": splits,
        "cases": {
            "requested": len(requested),
            "ok": sorted(c for c, m in done.items() if m.get("status") == "ok"),
            "too_short": sorted(c for c, m in done.items() if m.get("status") == "too_short"),
            "failed": [{"case_id": c, "reason": f["reason"], "detail": f["detail"]} for c, f in sorted(failed.items())],
            "not_done": not_done or [],
            "static_defaults": {str(c): m["static_defaults"] for c, m in sorted(done.items()) if m.get("static_defaults")},
            # Clinical entry errors (outside the plausible range, not a number, a sex other
            # than M/F): treated as missing, so their features are in static_defaults too.
            "static_implausible": {str(c): m["static_implausible"] for c, m in sorted(done.items())
                                   if m.get("static_implausible")},
            "dose_weight_default": sorted(c for c, m in done.items() if m.get("dose_weight_default")),
            "no_clinical_row": sorted(c for c, m in done.items() if m.get("no_clinical_row")),
        },
        "verification": verification,
        "versions": versions(),
    }
