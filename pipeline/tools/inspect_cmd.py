"""master-poc-preprocess inspect PATH: counts, shapes and example windows in
clinical units, for a TFRecord file, a split folder or an output folder
(local or s3://). De-normalises with the ranges in preprocessing_metadata.json."""
from __future__ import annotations

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.output import names, storage
from transforms import encode, tfrecord
from transforms.cohort import flag_of
from transforms.features import SINCE_MEASURED_CAP_S as SINCE_CAP_S
from transforms.features import denormalise


def locate(path: str) -> tuple[list[str], str]:
    """(files, output folder) for a file, a split folder or an output folder."""
    path = path.rstrip("/")
    if path.endswith(names.SUFFIX):
        return [path], path.rsplit("/", 2)[0]
    if storage.exists(storage.metadata_path(path)):
        splits = storage.read_json(storage.metadata_path(path))["splits"]  # train/validation/test, or the folds
        return [f for s in splits for f in storage.list_files(storage.split_files_glob(path, s))], path
    root, split = path.rsplit("/", 1) if "/" in path else (".", path)
    files = storage.list_files(storage.split_files_glob(root, split))
    if not files:
        raise FileNotFoundError(f"no {names.SUFFIX} files at {path}")
    return files, root


def denorm(values: np.ndarray, norm: dict) -> np.ndarray:
    """De-normalise with a range as the metadata writes it ({"lo", "hi"})."""
    return denormalise(values, norm["lo"], norm["hi"])


def _header(root: str, meta: dict, out) -> None:
    print(f"output {root}: status {meta['status']}, settings {meta['settings']}", file=out)
    c = meta.get("cohort")
    if c and c.get("criteria"):
        print(f"cohort: {c['requested']} requested, {c['selected']} selected; excluded: "
              + "; ".join(f"{flag_of(r['kind'])} {r['text']!r}: {len(r['excluded'])}"
                          for r in c["criteria"]),
              file=out)
    print("(values are de-normalised; a value exactly at a range edge may have been clipped there)", file=out)


def _static_text(sp: dict, values) -> str:
    return ", ".join(f"{st['name']}={'M' if v > 0 else 'F'}" if st["norm"] is None
                     else f"{st['name']}={denorm(v, st['norm']):.1f}" for st, v in zip(sp["static"], values))


def _print_example(row: dict, meta: dict, secs: list[int], out) -> None:
    """One example: its case and window, static features, the chosen seconds of each feature, its targets."""
    fmt, sp = meta["format"], meta["spec"]
    window, n_feat = fmt["shapes"]["timeseries"]
    ts = row["timeseries"].reshape(window, n_feat)
    print(f"\n  example: case {int(row['case_id'][0])}, window_start {int(row['window_start'][0])} s, "
          f"shapes timeseries {ts.shape}, static {row['static'].shape}, targets {row['targets'].shape}", file=out)
    print("  static: " + _static_text(sp, row["static"]), file=out)
    observed = row["observed"].reshape(window, n_feat) if "observed" in row else None
    since = row["since_measured"].reshape(window, n_feat) * SINCE_CAP_S if "since_measured" in row else None
    width = 10 + (8 if since is not None else 0) + (2 if observed is not None else 0)
    if observed is not None or since is not None:
        print("  (" + ", ".join(x for x in ("* = imputed (observed 0)" if observed is not None else "",
                                             "[N s] = seconds since measured (600 = never or more)"
                                             if since is not None else "") if x) + ")", file=out)
    print("  " + "feature".ljust(18) + "unit".ljust(11) + "".join(f"t+{s}s".rjust(width) for s in secs), file=out)
    for j, feat in enumerate(sp["timeseries"]):
        vals = denorm(ts[secs, j], feat["norm"])
        cells = []
        for k, s_ in enumerate(secs):
            cell = f"{vals[k]:10.3f}"
            if observed is not None:
                cell += " *" if observed[s_, j] == 0 else "  "
            if since is not None:
                cell += f" [{since[s_, j]:3.0f} s]"
            cells.append(cell.rjust(width))
        print("  " + feat["name"].ljust(18) + feat["unit"].ljust(11) + "".join(cells), file=out)
    tg = ", ".join(f"{t['name']}={denorm(v, t['norm']):.3f} {t['unit']}" for t, v in zip(sp["targets"], row["targets"]))
    print(f"  targets (second {fmt['target_second']}): {tg}", file=out)


def inspect(path: str, n_examples: int = 2, seconds=None, out=None) -> int:
    """`seconds`: the seconds of each window to show (default: first, middle, last)."""
    import sys
    out = out or sys.stdout
    files, root = locate(path)
    meta = storage.read_json(storage.metadata_path(root))
    fmt = meta["format"]
    window = fmt["shapes"]["timeseries"][0]
    secs = [s for s in (seconds or (0, window // 2 - 1, window - 1)) if 0 <= s < window]
    dec = encode.examples_decoder({name: f["type"] for name, f in fmt["features"].items()})
    _header(root, meta, out)
    total, shown = 0, 0
    for f in files:
        records, count = [], 0  # count every record, keep only those to show
        with FileSystems.open(f, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            for rec in tfrecord.iter_records(fh):
                if count < n_examples - shown:
                    records.append(rec)
                count += 1
        total += count
        print(f"{f}: {count} examples", file=out)
        if records:
            rb = dec.DecodeBatch(records)
            for i in range(rb.num_rows):
                shown += 1
                _print_example({name: np.asarray(rb.column(name)[i].as_py()) for name in fmt["features"]},
                               meta, secs, out)
    print(f"\n{total} examples in {len(files)} files", file=out)
    return 0
