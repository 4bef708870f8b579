"""preprocessing_metadata.json, schema.pbtxt (tensorflow_metadata Schema) and
the quality report, from the markers."""
from __future__ import annotations

import datetime
import time
from typing import Optional

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from pipeline import provenance, report, storage
from pipeline.contracts import DoneMarker, FailedMarker
from transforms import encode, spec
from transforms.settings import Settings

def example_features(settings: Settings) -> list[tuple[str, int, int]]:
    """(name, schema type, length) of every example feature, in the contract's order."""
    fs = settings.feature_spec()
    feats = [("timeseries", schema_pb2.FLOAT, settings.window * fs.n_features),
             ("static", schema_pb2.FLOAT, spec.N_STATIC),
             ("targets", schema_pb2.FLOAT, fs.n_targets),
             ("case_id", schema_pb2.INT, 1),
             ("window_start", schema_pb2.INT, 1)]
    if settings.emit_mask:
        feats.append(("observed", schema_pb2.FLOAT, settings.window * fs.n_features))
    if settings.emit_delta:
        feats.append(("since_measured", schema_pb2.FLOAT, settings.window * fs.n_features))
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


def fingerprint(settings: Settings) -> dict:
    """What an output keeps: the data settings, the contract and the format."""
    return dict(settings.as_json(), spec_version=spec.SPEC_VERSION, format_version=encode.FORMAT_VERSION)


def case_step_seconds(done: dict[int, DoneMarker]) -> dict[str, float]:
    """Stage 1's seconds per step (load, parse within load, transform,
    encode, compress, write) summed over the committed cases."""
    total: dict[str, float] = {}
    for m in done.values():
        for k, v in m.timings.items():
            total[k] = total.get(k, 0.0) + v
    return {k: round(v, 3) for k, v in total.items()}


def split_summary(settings: Settings, done: dict[int, DoneMarker], clinical_table: Optional[dict]) -> dict:
    """How the cases were split (contract 1.2): by patient where the clinical
    table has a subjectid column, the patients per split, and the cases split
    by case id because their row names no patient."""
    tables = [m.clinical for m in done.values() if m.clinical] + ([clinical_table] if clinical_table else [])
    by_patient = (any(t.get("split_key") == "subjectid" for t in tables)
                  or any(m.split_key.startswith("s") for m in done.values()))
    return {
        "by": "patient" if by_patient else "case",
        "key": "subjectid" if by_patient else "caseid",
        "rule": "bucket = int(sha256(f'{seed}:{key}')) % 100, key = 's<subjectid>' (else the case id); "
                "train below percent[0], validation below percent[0] + percent[1], test otherwise",
        "seed": settings.split_seed,
        "percent": list(settings.split),
        "patients": {s: len({m.patient for m in done.values() if m.split == s and m.has_windows})
                     for s in spec.SPLIT_NAMES},
        # Split by case id although the table names patients: their row has no subjectid (or no row).
        "cases_split_by_case_id": sorted(c for c, m in done.items() if by_patient and not m.split_key.startswith("s")),
    }


def transfer_summary(done: dict[int, DoneMarker]) -> Optional[dict]:
    """What reading the remote input files cost (streamed, stopped early):
    bytes transferred against the files' sizes; None for local inputs."""
    remote = [m.input for m in done.values() if "bytes_read" in m.input]
    if not remote:
        return None
    read, size = sum(i["bytes_read"] for i in remote), sum(i.get("bytes", 0) for i in remote)
    return {"cases": len(remote), "bytes_read": read, "file_bytes": size,
            "share_read": round(read / size, 4) if size else None,
            "requests": sum(i.get("requests", 0) for i in remote), "retries": sum(i.get("retries", 0) for i in remote)}


def build_metadata(*, settings: Settings, status: str, requested: list[int], done: dict[int, DoneMarker],
                   failed: dict[int, FailedMarker], verification: Optional[dict], started: str,
                   input_dir: Optional[str], clinical: Optional[str], output: str,
                   not_done: Optional[list[int]] = None, config: Optional[dict] = None,
                   source: Optional[dict] = None, clinical_table: Optional[dict] = None) -> dict:
    fs = settings.feature_spec()
    prov = provenance.build(done)
    splits = {}
    for s in spec.SPLIT_NAMES:
        cases = sorted(c for c, m in done.items() if m.split == s and m.has_windows)
        splits[s] = {"cases": len(cases), "windows": int(sum(done[c].windows for c in cases)),
                     "patients": len({done[c].patient for c in cases}),
                     "case_ids": cases,
                     "files": sorted(f.rsplit("/", 1)[-1] for f in storage.list_files(storage.split_files_glob(output, s)))}
    w = settings.window
    return {
        "status": status,
        "started": started,
        "finished": utcnow(),
        "input": input_dir,
        "source": source,
        "clinical": clinical,
        "clinical_table": clinical_table,
        "output": output,
        "settings": fingerprint(settings),
        "format": {**encode.FORMAT,
                   "pattern": "<split>/<split>-SSSSS-of-NNNNN.tfrecord.gz",
                   "schema": storage.SCHEMA_NAME,
                   "features": {n: {"type": "float" if t == schema_pb2.FLOAT else "int64", "length": L}
                                for n, t, L in example_features(settings)},
                   "shapes": {"timeseries": [w, fs.n_features], "static": [spec.N_STATIC],
                              "targets": [fs.n_targets]},
                   "timeseries_layout": "row-major (time, feature)",
                   "target_second": f"window_start + {w} - 1 + horizon"},
        "spec": spec.spec_as_dict(fs),
        "splits": splits,
        "split": split_summary(settings, done, clinical_table),
        "transfer": transfer_summary(done),
        "cases": {
            "requested": len(requested),
            "ok": sorted(c for c, m in done.items() if m.status == "ok"),
            "too_short": sorted(c for c, m in done.items() if m.status == "too_short"),
            "failed": [{"case_id": c, "reason": f.reason, "detail": f.detail} for c, f in sorted(failed.items())],
            "not_done": not_done or [],
            "static_defaults": {str(c): m.static_defaults for c, m in sorted(done.items()) if m.static_defaults},
            # Clinical entry errors (outside the plausible range, not a number, a sex other
            # than M/F): treated as missing, so their features are in static_defaults too.
            "static_implausible": {str(c): m.static_implausible for c, m in sorted(done.items())
                                   if m.static_implausible},
            "dose_weight_default": sorted(c for c, m in done.items() if m.dose_weight_default),
            "no_clinical_row": sorted(c for c, m in done.items() if m.no_clinical_row),
            # Processed again because the input file changed after an earlier commit.
            "changed_inputs": sorted(c for c, m in done.items() if m.changed_input),
        },
        "verification": verification,
        "versions": prov["versions"],  # also in provenance; kept here for readers of earlier outputs
        "provenance": prov,
        "config": config,
    }


def write_outputs(output: str, settings: Settings, status: str, *, requested: Optional[list[int]] = None,
                  verification: Optional[dict] = None, started: Optional[str] = None, input_dir: Optional[str] = None,
                  clinical_path: Optional[str] = None, done: Optional[dict[int, DoneMarker]] = None,
                  timings: Optional[dict] = None, config: Optional[dict] = None, source: Optional[dict] = None,
                  clinical_table: Optional[dict] = None) -> dict:
    """Metadata, schema, the run's configuration file and the quality report,
    from the markers; returns the metadata."""
    done = storage.read_done(output) if done is None else done
    failed = {c: f for c, f in storage.read_failed(output).items() if c not in done}
    requested = requested if requested is not None else sorted(set(done) | set(failed))
    not_done = [c for c in requested if c not in done and c not in failed]
    if status == "complete" and not_done:
        status = "incomplete"
    t = time.time()
    meta = build_metadata(settings=settings, status=status, requested=requested, done=done, failed=failed,
                          verification=verification, started=started or utcnow(),
                          input_dir=input_dir, clinical=clinical_path, output=output, not_done=not_done,
                          config=config, source=source, clinical_table=clinical_table)
    report.write_report(output, done, failed, meta["status"], settings.feature_spec(), meta["provenance"])
    timings = dict(timings or {}, metadata_report_s=round(time.time() - t, 3))
    meta["timings"] = dict(timings, case_steps_s=case_step_seconds(done))
    storage.write_json(storage.metadata_path(output), meta)
    storage.write_atomic(storage.schema_path(output), schema_text(settings).encode())
    if config is not None:
        storage.write_atomic(storage.config_path(output), config_text(config).encode())
    return meta


def config_text(config: dict) -> str:
    """The run's effective configuration as a --config file."""
    import yaml
    head = ("# The effective configuration of the run that made this output: give it back to\n"
            "#   master-poc-preprocess --config config.yaml --output ANOTHER_OUTPUT\n"
            "# to rebuild the same dataset (flags win over the file).\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
