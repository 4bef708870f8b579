"""What an output says about itself, from the markers: the run's record
(`RunRecord`) writes preprocessing_metadata.json, schema.pbtxt
(tensorflow_metadata Schema), config.yaml and the quality report."""
from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from pipeline.io.identity import TableIdentity
from pipeline.output import cohort as cohort_run
from pipeline.output import names, provenance, storage
from pipeline.output.contracts import DoneMarker, Status
from pipeline.output.records import CaseAccount, Metadata, SplitCounts, SplitRule, Transfer, split_counts
from pipeline.report import quality as report
from pipeline.report import table1
from transforms import cohort, encode, spec, statistics
from transforms.case_ids import format_cases
from transforms.settings import Settings


def example_features(settings: Settings) -> tuple[encode.ExampleFeature, ...]:
    """Every example feature of an output with these settings, in the contract's order."""
    fs = settings.feature_spec()
    return encode.example_features(settings.window, fs.n_features, spec.N_STATIC, fs.n_targets,
                                   settings.emit_mask, settings.emit_delta)


_SCHEMA_TYPE = {"float": schema_pb2.FLOAT, "int64": schema_pb2.INT}


def schema_text(settings: Settings) -> str:
    schema = schema_pb2.Schema()
    # The splits (or folds) the files are in: split:<name> tags, for tools that read the schema alone.
    schema.annotation.tag.extend(f"split:{s}" for s in settings.split_names)
    for feat in example_features(settings):
        f = schema.feature.add(name=feat.name, type=_SCHEMA_TYPE[feat.kind])
        f.shape.dim.add(size=feat.length)
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


def split_rule(settings: Settings, done: dict[int, DoneMarker], clinical_table: Optional[TableIdentity],
               counts: dict[str, SplitCounts]) -> SplitRule:
    """How the cases were split (contract 1.2): by patient where the clinical
    table has a subjectid column, the patients per split (of `counts`), and
    the cases split by case id because their row names no patient."""
    tables = [m.clinical for m in done.values() if m.clinical] + ([clinical_table] if clinical_table else [])
    by_patient = (any(t.by_patient for t in tables)
                  or any(m.split_key.startswith("s") for m in done.values()))
    return SplitRule(
        by="patient" if by_patient else "case",
        key="subjectid" if by_patient else "caseid",
        rule="bucket = int(sha256(f'{seed}:{key}')) % 100, key = 's<subjectid>' (else the case id); "
             + (f"fold-(floor(bucket * {settings.folds} / 100) + 1)" if settings.folds else
                "train below percent[0], validation below percent[0] + percent[1], test otherwise"),
        seed=settings.split_seed, percent=tuple(settings.split), folds=settings.folds,
        names=tuple(settings.split_names), patients={s: c.patients for s, c in counts.items()},
        # Split by case id although the table names patients: their row has no subjectid (or no row).
        cases_split_by_case_id=tuple(sorted(c for c, m in done.items()
                                            if by_patient and not m.split_key.startswith("s"))))


def statistics_of(settings: Settings, done: dict[int, DoneMarker]) -> dict:
    """Per split, per feature, target and static feature: count, mean, std,
    min, max and quantiles in clinical units, of all values and of the
    measured ones, as the examples hold them (transforms.statistics), summed
    from the cases' statistics in their markers."""
    fs = settings.feature_spec()
    groups = {"timeseries": [(f.name, f.unit, *f.norm) for f in fs.timeseries],
              "targets": [(n, fs.feature(n).unit, *fs.feature(n).norm) for n in fs.targets],
              "static": [(s.name, s.unit, *s.span) for s in spec.STATIC]}
    kinds = ("all", "measured")
    acc = {s: {g: {k: statistics.Accumulator(len(cols)) for k in kinds} for g, cols in groups.items()}
           for s in settings.split_names}
    for m in done.values():
        values = m.stats.values if m.stats else None
        if values is not None and m.split in acc:
            for g in groups:
                for k in kinds:
                    acc[m.split][g][k].add(values.columns(g, k))
    return {
        "about": "in clinical units, over the values as the examples hold them (a second once per window it "
                 "is in; targets and static features once per window; values outside a feature's "
                 "normalisation range at its bound); 'measured': measured values only (static: not "
                 "defaulted); std is the population's; quantiles are within 'resolution' (one histogram "
                 "bin) of the exact inverted-CDF quantile",
        "bins": statistics.STAT_BINS,
        "splits": {s: {g: {name: {"unit": unit, "resolution": (hi - lo) / statistics.STAT_BINS,
                                  **{k: acc[s][g][k].summary(j, lo, hi) for k in kinds}}
                           for j, (name, unit, lo, hi) in enumerate(cols)}
                       for g, cols in groups.items()}
                   for s in settings.split_names},
    }


def transfer_summary(done: dict[int, DoneMarker]) -> Optional[Transfer]:
    """What reading the remote input files cost (streamed, stopped early):
    bytes transferred against the files' sizes; None for local inputs."""
    remote = [m.input for m in done.values() if m.input is not None and m.input.remote]
    if not remote:
        return None
    read, size = sum(i.bytes_read for i in remote), sum(i.bytes or 0 for i in remote)
    return Transfer(len(remote), read, size, round(read / size, 4) if size else None,
                    sum(i.requests or 0 for i in remote), sum(i.retries or 0 for i in remote))


@dataclass
class RunRecord:
    """One invocation as its output records it: when it started, what it was
    asked (cases, input, clinical table), what it found (the source, the
    table's identity and format), its times and configuration. `write`
    writes the metadata, the schema, config.yaml and the report."""

    output: str
    settings: Settings
    started: str = field(default_factory=lambda: utcnow())
    requested: Optional[list[int]] = None
    input: Optional[str] = None  # as given: a folder, a prefix, a URL, "vitaldb"
    source: Optional[dict] = None  # pipeline.io.sources.Source.describe()
    clinical: Optional[str] = None
    clinical_table: Optional[TableIdentity] = None  # the table read
    cases: Optional[str] = None  # --cases as given
    num_shards: int = 0
    timings: dict = field(default_factory=dict)
    criteria: tuple = ()  # the cohort's, in evaluation order (transforms.cohort.Criterion)
    track_list: Optional[str] = None  # the track table the cohort's require was decided on, if any
    clinical_frame: Any = None  # the clinical table as read (all columns), for Table 1

    def config(self) -> dict:
        """The effective configuration, in the form --config reads: giving it
        back rebuilds the same dataset."""
        cfg = self.settings.as_json()
        cfg.update(input=self.input, clinical=self.clinical, output=self.output,
                   cases=format_cases(self.requested) if self.requested else self.cases, num_shards=self.num_shards)
        if self.criteria:
            cfg.update(cohort=cohort.dump_criteria(self.criteria), track_list=self.track_list)
        return {k: v for k, v in cfg.items() if v is not None}

    def table1(self, done: dict[int, DoneMarker]) -> table1.Table1:
        """Table 1 of the cases in the split files, per split (or fold), from the clinical table's rows."""
        cases = {c: m for c, m in done.items() if m.has_windows}
        return table1.build_table1(self.clinical_frame, {c: m.split for c, m in cases.items()},
                                   {c: m.split_unit for c, m in cases.items()}, self.settings.split_names)

    def write(self, status: Status, verification=None, done: Optional[dict[int, DoneMarker]] = None) -> Metadata:
        """Metadata, schema, config.yaml and the quality report, from the
        markers (`done` if already read); returns the metadata."""
        out, fs = self.output, self.settings.feature_spec()
        done = storage.read_selected_done(out) if done is None else done
        excluded_ids = storage.marker_ids(out, storage.EXCLUDED)
        failed = {c: f for c, f in storage.read_failed(out).items() if c not in done and c not in excluded_ids}
        requested = (self.requested if self.requested is not None
                     else sorted(set(done) | set(failed) | excluded_ids))
        flow = cohort_run.flow(out, requested, self.criteria)
        left_out = {c for step in flow.steps for c in step.excluded}
        not_done = [c for c in requested if c not in done and c not in failed and c not in left_out]
        if status == Status.COMPLETE and not_done:
            status = Status.INCOMPLETE
        t = time.time()
        files = {s: sorted(f.rsplit("/", 1)[-1] for f in storage.list_files(storage.split_files_glob(out, s)))
                 for s in self.settings.split_names}
        counts = split_counts(self.settings.split_names, done, files)
        cases = CaseAccount.of(len(requested), done, failed, not_done)
        t1 = self.table1(done)
        meta = build_metadata(self, status, done, counts, cases, verification)
        meta = dataclasses.replace(meta, table1=t1.as_json(),
                                   cohort=cohort_run.CohortSummary(flow, self.track_list, cases, counts,
                                                                   cohort_run.coverage(done, fs)))
        report.write_report(out, done, failed, meta.status, fs, meta.provenance, self.settings.split_names,
                            meta.split, meta.cohort.as_json(), t1.html(), counts)
        timings = dict(self.timings, metadata_report_s=round(time.time() - t, 3))
        meta = dataclasses.replace(meta, timings=dict(timings, case_steps_s=case_step_seconds(done)))
        document = meta.as_json()
        storage.write_json(storage.metadata_path(out), document)
        storage.write_json(storage.statistics_path(out), document["statistics"])
        storage.write_atomic(storage.table1_path(out), t1.csv_text().encode())
        storage.write_atomic(storage.schema_path(out), schema_text(self.settings).encode())
        storage.write_atomic(storage.config_path(out), config_text(meta.config).encode())
        return meta


def build_metadata(record: RunRecord, status: Status, done: dict[int, DoneMarker], counts: dict[str, SplitCounts],
                   cases: CaseAccount, verification) -> Metadata:
    settings, output = record.settings, record.output
    fs = settings.feature_spec()
    w = settings.window
    return Metadata(
        status=status, started=record.started, finished=utcnow(), input=record.input, source=record.source,
        clinical=record.clinical, clinical_table=record.clinical_table, output=output,
        settings=fingerprint(settings),
        format={**encode.FORMAT,
                "pattern": names.SHARD_PATTERN,
                "schema": names.SCHEMA_NAME,
                "features": {f.name: {"type": f.kind, "length": f.length} for f in example_features(settings)},
                "shapes": {"timeseries": [w, fs.n_features], "static": [spec.N_STATIC], "targets": [fs.n_targets]},
                "timeseries_layout": "row-major (time, feature)",
                "target_second": f"window_start + {w} - 1 + horizon"},
        spec=spec.spec_as_dict(fs),
        splits=counts,
        split=split_rule(settings, done, record.clinical_table, counts),
        transfer=transfer_summary(done),
        statistics=statistics_of(settings, done),
        cases=cases,
        verification=verification,
        provenance=provenance.build(done, record.source),
        config=record.config())


def config_text(config: dict) -> str:
    """The run's effective configuration as a --config file."""
    import yaml
    head = ("# The effective configuration of the run that made this output: give it back to\n"
            "#   master-poc-preprocess --config config.yaml --output ANOTHER_OUTPUT\n"
            "# to rebuild the same dataset (flags win over the file).\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
