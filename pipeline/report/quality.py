"""The data-quality report: <output>/report/index.html and quality.json.

Built from the per-case statistics each case computed inside the pipeline
(stored in its marker: imputation rule counts, source track counts, values
outside the normalisation range, the statistics of the values its examples
hold), combined here; the output files are not read again. Charts are rendered by matplotlib to PNG and
embedded in the page as data URIs, so the page is one file, readable offline.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from typing import Optional

import numpy as np

from pipeline.output import provenance, storage
from pipeline.output.contracts import DoneMarker, FailedMarker, units_in_two_splits
from pipeline.output.records import SplitCounts, SplitRule, split_counts
from pipeline.report import flowchart
from transforms import features, spec, statistics
from transforms.cohort import flag_of

HIST_BINS = 20  # the report's distribution charts (from the statistics' finer histograms)


def _features(done: dict[int, DoneMarker], fs: spec.FeatureSpec, splits) -> list[dict]:
    """Per feature: the share of seconds of each imputation rule and source,
    and per split the histogram, the clipped and the imputed-outside shares."""
    F, R = fs.n_features, len(features.RULE_NAMES)
    rules = np.zeros((F, R), np.int64)
    sources = [np.zeros(len(f.sources), np.int64) for f in fs.timeseries]
    hist = {s: np.zeros((F, HIST_BINS), np.int64) for s in splits}
    clipped = {s: np.zeros(F, np.int64) for s in splits}
    imputed_outside = {s: np.zeros(F, np.int64) for s in splits}
    measured = {s: np.zeros(F, np.int64) for s in splits}
    seconds = {s: 0 for s in splits}
    for m in done.values():
        st, s = m.stats, m.split
        if not st:
            continue
        rules += np.asarray(st.rules, np.int64)
        for j, counts in enumerate(st.sources):
            sources[j] += np.asarray(counts, np.int64)
        if st.values is not None:  # a case with windows: its values as the examples hold them
            hist[s] += np.array([statistics.downsample(c, HIST_BINS) for c in st.values.timeseries.all])
        clipped[s] += np.asarray(st.clipped, np.int64)
        imputed_outside[s] += np.asarray(st.imputed_outside, np.int64)
        measured[s] += np.asarray(st.rules, np.int64)[:, features.MEASURED]
        seconds[s] += st.seconds
    total = max(1, int(rules[0].sum())) if F else 1
    return [{
        "name": f.name, "unit": f.unit, "seconds": int(rules[j].sum()),
        "rules": {n: round(float(rules[j, r]) / total, 6) for r, n in enumerate(features.RULE_NAMES)},
        "measured_share": round(float(rules[j, features.MEASURED]) / total, 6),
        "sources": {src.track: round(float(sources[j][k]) / max(1, int(sources[j].sum())), 6)
                    for k, src in enumerate(f.sources)},
        "splits": {s: {"hist": hist[s][j].tolist(),
                       # of the measured seconds: a range or unit problem when many
                       "clipped_share": round(float(clipped[s][j]) / max(1, measured[s][j]), 6),
                       # of all seconds: imputed values outside the range (a clinical zero below it)
                       "imputed_outside_share": round(float(imputed_outside[s][j]) / max(1, seconds[s]), 6)}
                   for s in splits},
    } for j, f in enumerate(fs.timeseries)]


def combine(done: dict[int, DoneMarker], failed: dict[int, FailedMarker],
            fs: spec.FeatureSpec = spec.DEFAULT_SPEC, splits=spec.SPLIT_NAMES,
            prov: Optional[dict] = None, split: Optional[SplitRule] = None,
            counts: Optional[dict[str, SplitCounts]] = None) -> dict:
    """The report's numbers (quality.json) from the done and failed markers;
    how the cases were split and the counts per split are the metadata's
    (`split`, `counts`: pipeline.output.records), counted from the markers where not given."""
    case_split = {cid: m.split for cid, m in done.items() if m.stats}
    by_split = {s: sorted(c for c, x in case_split.items() if x == s) for s in splits}
    seen_in = Counter(c for v in by_split.values() for c in v)
    # Patients (split units) in two splits: a leak a case check cannot see.
    in_two = units_in_two_splits((m.split_unit, m.split, c) for c, m in done.items() if m.has_windows)
    counts = counts if counts is not None else split_counts(tuple(splits), done)
    return {
        "features": _features(done, fs, splits),
        "hist_bins": np.linspace(-1, 1, HIST_BINS + 1).round(3).tolist(),
        "cases": [{"case_id": c, "split": m.split, "patient": m.split_unit, "status": m.status, "windows": m.windows,
                   "duration_s": m.duration_s, "static_defaults": m.static_defaults,
                   "static_implausible": m.static_implausible,
                   "no_clinical_row": m.no_clinical_row} for c, m in sorted(done.items())],
        "failed": [{"case_id": c, "reason": f.reason, "detail": f.detail} for c, f in sorted(failed.items())],
        "failed_by_reason": {r: sum(1 for f in failed.values() if f.reason == r)
                             for r in sorted({f.reason for f in failed.values()})},
        "splits": {s: {"cases": counts[s].cases, "patients": counts[s].patients, "windows": counts[s].windows}
                   for s in splits},
        "split_by": "patient (subjectid)" if split is not None and split.by == "patient" else "case id",
        "cases_in_two_splits": sorted(c for c, n in seen_in.items() if n > 1),
        "patients_in_two_splits": sorted(in_two),
        "cases_split_by_case_id": list(split.cases_split_by_case_id) if split is not None else [],
        "provenance": prov if prov is not None else provenance.build(done),
        "changed_inputs": sorted(c for c, m in done.items() if m.changed_input),
    }


CLIPPED_WARN = 0.05  # a measured share at +-1 above this is flagged


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def hist_shares(q: dict, split: str) -> np.ndarray:
    """(features, bins): each feature's share of seconds per bin of normalised value in a split."""
    h = np.array([f["splits"][split]["hist"] for f in q["features"]], dtype=float).reshape(len(q["features"]), -1)
    total = h.sum(axis=1, keepdims=True)
    return np.divide(h, total, out=np.zeros_like(h), where=total > 0)


def _charts(q: dict) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [f["name"] for f in q["features"]]
    charts = {}
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.25 * len(names)))
    left = np.zeros(len(names))
    for rule in features.RULE_NAMES:
        vals = np.array([f["rules"][rule] for f in q["features"]])
        ax.barh(names, vals, left=left, label=rule.replace("_", " "))
        left += vals
    ax.invert_yaxis()
    ax.set_xlabel("share of seconds")
    ax.set_title("Measured vs imputed, by rule")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.32), ncol=4, fontsize=8)
    charts["rules"] = _png(fig)

    # One heat map per split, a row per feature (any number of them): drawn
    # in a fraction of the time of a panel per feature (0.1 s against 0.6 s).
    splits = list(q["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(12, 1.2 + 0.28 * len(names)), sharey=True, squeeze=False)
    from matplotlib.colors import PowerNorm
    for ax, s in zip(axes[0], splits):
        shares = hist_shares(q, s)
        im = ax.imshow(shares, aspect="auto", cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1),
                       interpolation="nearest", extent=(-1, 1, len(names) - 0.5, -0.5))
        ax.set_title(s if shares.any() else f"{s} (no cases)", fontsize=10)
        ax.set_xlabel("normalised value")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([f"{f['name']} [{f['unit']}]" for f in q["features"]], fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of the feature's seconds")
    fig.suptitle("Distribution of normalised values per split (a value at ±1 may have been clipped there)")
    charts["hist"] = _png(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5))
    cases = [c for c in q["cases"] if c["status"] == "ok"]
    a1.scatter([c["duration_s"] / 60 for c in cases], [c["windows"] for c in cases], s=12)
    a1.set_xlabel("recording length (min)")
    a1.set_ylabel("windows")
    a1.set_title("Windows per case")
    splits = list(q["splits"])
    a2.bar(splits, [q["splits"][s]["windows"] for s in splits])
    for i, s in enumerate(splits):
        a2.text(i, q["splits"][s]["windows"], f"{q['splits'][s]['cases']} cases", ha="center", va="bottom")
    a2.set_title("Windows per split")
    charts["cases"] = _png(fig)
    return charts


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Data quality: {title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td.l,th.l{{text-align:left}}.warn{{color:#a00;font-weight:bold}}img{{max-width:100%}}</style>
</head><body data-images-ok="pending">
<h1>Data quality report</h1>
<p>Output <code>{title}</code>, status <b>{status}</b>. Numbers: <a href="quality.json">quality.json</a>;
metadata: <a href="../preprocessing_metadata.json">preprocessing_metadata.json</a>.</p>
<p>Sections: <a href="#cohort">cohort</a> · <a href="#table1">Table 1</a> · <a href="#splits">splits</a> ·
<a href="#features">features</a> · <a href="#cases">cases</a> ·
<a href="#provenance">provenance</a> · <a href="#failed">failed cases</a></p>
<h2 id="cohort">Cohort</h2>
{cohort_section}
<h2 id="table1">Table 1</h2>
{table1}
<h2 id="splits">Splits</h2>
<table><tr><th class="l">split</th><th>patients</th><th>cases</th><th>windows</th></tr>{split_rows}</table>
<p>{overlap}</p>
<img alt="windows per case and per split" src="{img_cases}">
<h2 id="features">Features</h2>
<img alt="measured vs imputed by rule" src="{img_rules}">
<table><tr><th class="l">feature</th><th class="l">unit</th>{rule_heads}<th class="l">source tracks</th>
{clip_heads}</tr>{feature_rows}</table>
<p>Many <em>measured</em> values at &plusmn;1 (clipped: the share of measured seconds) point to a
normalisation range or unit problem. Imputed values at &plusmn;1 (the share of all seconds) are shown
apart: a clinical zero below a range (ETCO2's 0 kPa, FiO2 and RR at 0 off the ventilator) is expected.</p>
<img alt="distributions of normalised values per split" src="{img_hist}">
<h2 id="cases">Cases</h2>
<p>{n_ok} cases with windows, {n_short} too short for one window, {n_failed} failed.
Static defaults used: {defaults}. Clinical entry errors (implausible values, treated as missing): {implausible}.</p>
<table><tr><th>case</th><th class="l">patient</th><th class="l">split</th><th class="l">status</th>\
<th>windows</th><th>minutes</th>
<th class="l">static defaults</th><th class="l">clinical entry errors</th></tr>{case_rows}</table>
<h2 id="provenance">Provenance</h2>
<p>Made by {package} (commit <code>{commit}</code>) with vitaldb {vitaldb}, Apache Beam {beam}, tfx-bsl {tfxbsl}.
Clinical table: {clinical}. {n_inputs} input files, each with its size and content identity (a local file: the
CRC-32C of its bytes; an object store's or web server's: its ETag, with the bytes read and their CRC-32C) in
<a href="../preprocessing_metadata.json">the metadata</a> (<code>provenance.inputs</code>).
{changed}</p>
<h2 id="failed">Failed cases</h2>
<table><tr><th>case</th><th class="l">reason</th><th class="l">detail</th></tr>{failed_rows}</table>
<p>By reason: {failed_by_reason}</p>
<script>
// Self-check, also for a person: a broken image is flagged on the page.
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }});
  document.body.setAttribute("data-images-ok", bad.length ? "false" : "true");
  document.body.setAttribute("data-images", String(imgs.length));
  if (bad.length) {{ var p = document.createElement("p"); p.className = "warn";
    p.textContent = bad.length + " image(s) failed to load"; document.body.prepend(p); }}
{flow_check}
}});
</script>
</body></html>
"""


def cohort_section(c: Optional[dict]) -> str:
    """The flow diagram, the excluded cases by criterion, the warnings and
    each feature's coverage."""
    if not c:
        return "<p>No cohort recorded.</p>"
    e = html.escape
    crit = "".join(f"<tr><td class='l'>{e(flag_of(r['kind']))}</td><td class='l'><code>"
                   f"{e(r['text'])}</code></td><td>{len(r['excluded'])}</td><td class='l'>"
                   f"{e(', '.join(map(str, r['excluded'][:40])) + (' ...' if len(r['excluded']) > 40 else ''))}"
                   f"</td></tr>" for r in c["criteria"]) or "<tr><td colspan='4' class='l'>no criteria</td></tr>"
    def pct(v):
        return "" if v is None else f"{v:.1%}"
    cov = "".join(f"<tr><td class='l'>{e(n)}</td><td>{'target' if d['target'] else ''}</td>"
                  f"<td>{d['cases_with_source']} of {d['cases']}</td><td>{pct(d['share_of_cases'])}</td>"
                  f"<td>{pct(d['measured_share_of_seconds'])}</td></tr>" for n, d in c["coverage"].items())
    warns = "".join(f"<p class='warn'>{e(w)}</p>" for w in c["warnings"])
    return (flowchart.flow_svg(c) + warns
            + "<table><tr><th class='l'>criterion</th><th class='l'>text</th><th>left out</th><th class='l'>cases"
              "</th></tr>" + crit + "</table>"
            + "<p>Coverage of the selected cases: which have a source track of each feature, and the share of "
              "those cases' used seconds that were measured.</p><table><tr><th class='l'>feature</th><th></th>"
              "<th>cases with a source track</th><th>share</th><th>measured seconds</th></tr>" + cov + "</table>")


def render_html(q: dict, title: str, status: str, cohort: Optional[dict] = None, table1: str = "") -> str:
    e = html.escape
    charts = _charts(q)
    rules = features.RULE_NAMES
    splits = list(q["splits"])
    split_rows = "".join(f"<tr><td class='l'>{e(s)}</td><td>{d['patients']}</td><td>{d['cases']}</td>"
                         f"<td>{d['windows']}</td></tr>" for s, d in q["splits"].items())
    fallback = (f" Split by case id, their clinical row names no patient: {q['cases_split_by_case_id']}."
                if q["cases_split_by_case_id"] else "")
    overlap = f"Split by {e(q['split_by'])}.{fallback} " + (
        "No patient and no case is in two splits." if not q["cases_in_two_splits"] and not q["patients_in_two_splits"]
        else f"<span class='warn'>In two splits: patients {e(str(q['patients_in_two_splits']))}, "
             f"cases {q['cases_in_two_splits']}</span>")
    feature_rows = "".join(
        f"<tr><td class='l'>{e(f['name'])}</td><td class='l'>{e(f['unit'])}</td>"
        + "".join(f"<td>{f['rules'][r]:.1%}</td>" for r in rules)
        + f"<td class='l'>{e(', '.join(f'{t} {v:.0%}' for t, v in f['sources'].items()))}</td>"
        + "".join(f"<td{' class=warn' if f['splits'][s]['clipped_share'] > CLIPPED_WARN else ''}>"
                  f"{f['splits'][s]['clipped_share']:.1%}</td>" for s in splits)
        + "".join(f"<td>{f['splits'][s]['imputed_outside_share']:.1%}</td>" for s in splits) + "</tr>"
        for f in q["features"])
    case_rows = "".join(
        f"<tr><td>{c['case_id']}</td><td class='l'>{e(str(c['patient']))}</td>"
        f"<td class='l'>{e(str(c['split']))}</td><td class='l'>{e(str(c['status']))}</td>"
        f"<td>{c['windows']}</td><td>{(c['duration_s'] or 0) / 60:.0f}</td>"
        f"<td class='l'>"
        f"{e(', '.join(c['static_defaults']) + (' (no clinical row)' if c['no_clinical_row'] else ''))}</td>"
        f"<td class='l{' warn' if c['static_implausible'] else ''}'>"
        f"{e(', '.join(f'{k}={v!r}' for k, v in c['static_implausible'].items()))}</td></tr>"
        for c in q["cases"])
    failed_rows = "".join(f"<tr><td>{f['case_id']}</td><td class='l'>{e(f['reason'])}</td>"
                          f"<td class='l'>{e(f['detail'])}</td></tr>" for f in q["failed"]) or \
        "<tr><td colspan='3' class='l'>none</td></tr>"
    defaults = sum(1 for c in q["cases"] if c["static_defaults"])
    return _PAGE.format(
        title=e(title), status=e(status), split_rows=split_rows, overlap=overlap, img_cases=charts["cases"],
        img_rules=charts["rules"], img_hist=charts["hist"],
        rule_heads="".join(f"<th>{e(r.replace('_', ' '))}</th>" for r in rules),
        clip_heads="".join(f"<th>clipped, measured ({e(s)})</th>" for s in splits)
        + "".join(f"<th>imputed at &plusmn;1 ({e(s)})</th>" for s in splits), feature_rows=feature_rows,
        n_ok=sum(1 for c in q["cases"] if c["status"] == "ok"),
        n_short=sum(1 for c in q["cases"] if c["status"] == "too_short"), n_failed=len(q["failed"]),
        defaults=f"{defaults} cases", implausible=f"{sum(1 for c in q['cases'] if c['static_implausible'])} cases",
        case_rows=case_rows, failed_rows=failed_rows,
        failed_by_reason=e(json.dumps(q["failed_by_reason"])) or "none",
        cohort_section=cohort_section(cohort), table1=table1 or "<p>No Table 1 (no case with windows).</p>",
        flow_check=flowchart.CHECK_SCRIPT if cohort else "",
        **_provenance_fields(q))


def _provenance_fields(q: dict) -> dict:
    e = html.escape
    p = q["provenance"]
    v = p["versions"]
    tables = "; ".join(f"{e(str(t.get('path')))} ({t.get('bytes')} bytes, sha256 <code>{e(str(t.get('sha256')))}"
                       f"</code>, {t['cases']} cases)" for t in p["clinical"]) or "none"
    changed = (f"<span class='warn'>Processed again because their input file changed after an earlier commit: "
               f"{q['changed_inputs']}</span>" if q["changed_inputs"] else "")
    return dict(package=e(f"{p['package']['name']} {p['package']['version']}"),
                commit=e(str(p["package"]["commit"] or "unknown")), vitaldb=e(str(v.get("vitaldb"))),
                beam=e(str(v.get("apache-beam"))), tfxbsl=e(str(v.get("tfx-bsl"))), clinical=tables,
                n_inputs=len(p["inputs"]), changed=changed)


def write_report(output: str, done: dict[int, DoneMarker], failed: dict[int, FailedMarker], status: str,
                 fs: spec.FeatureSpec = spec.DEFAULT_SPEC, prov: Optional[dict] = None,
                 splits: tuple[str, ...] = spec.SPLIT_NAMES, split: Optional[SplitRule] = None,
                 cohort: Optional[dict] = None, table1: str = "",
                 counts: Optional[dict[str, SplitCounts]] = None) -> dict:
    q = combine(done, failed, fs, splits, prov, split, counts)
    storage.write_json(storage.report_path(output, "quality.json"), q)
    storage.write_atomic(storage.report_path(output, "index.html"),
                         render_html(q, output, status, cohort, table1).encode())
    return q
