"""The documents a user reads are true: the docs site builds with mkdocs
--strict (no page outside the nav, no broken link or anchor), and the data
contract's tables equal the feature spec the code runs."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.io.documents import load_track_map
from transforms import spec

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRACT = (ROOT / "docs" / "data-contract.md").read_text()


def nav_pages(nav) -> list[str]:
    """The .md files named in mkdocs.yml's nav, nested sections included."""
    pages = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_docs_site_builds_strict_with_every_page_in_the_nav(tmp_path):
    """What CI runs (`mkdocs build --strict`, .ci/run): every warning (a broken
    link or anchor, a page left out of the nav) fails it."""
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    if not os.path.exists(mkdocs):
        pytest.fail(f"{mkdocs} is missing: install the test extra (pip install -c constraints.txt -e '.[test]')")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    pages = nav_pages(config["nav"])
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))  # every page, each once
    site = tmp_path / "site"
    res = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page[:-len(".md")] + "/index.html")
        assert built.is_file(), page


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def num(text: str) -> float:
    return float(text)


def test_the_contracts_feature_table_is_the_spec():
    rows = table_rows(CONTRACT, "| # | name | unit | sources")
    assert len(rows) == spec.DEFAULT_SPEC.n_features
    for row, f in zip(rows, spec.DEFAULT_SPEC.timeseries):
        idx, name, unit, sources, plausible, before, after, lo, hi = row
        assert (name, unit) == (f.name, f.unit)
        assert re.findall(r"[A-Za-z0-9]+/[A-Z0-9_]+", sources) == [s.track for s in f.sources], name
        assert tuple(map(num, plausible.split(".."))) == f.plausible, name
        assert num(before) == f.before and (num(lo), num(hi)) == f.norm, name
        if f.after_carry_s:
            assert after == f"carry {f.after_carry_s} s, then {f.after:g}", name
        else:
            assert num(after) == f.after, name
        if any(s.per == spec.PER_WEIGHT for s in f.sources):
            assert "/ weight" in sources
        if any(s.per == spec.PER_IBW for s in f.sources):
            assert "/ IBW" in sources
    assert "Noradrenalin_INF: a gap of\n   more than 10 missing seconds" in CONTRACT
    assert spec.DEFAULT_SPEC.feature("Noradrenalin_INF").max_gap_s == 10


def test_the_contracts_static_table_is_the_spec():
    rows = table_rows(CONTRACT, "| # | name | column of clinical_data.csv")
    assert [r[1] for r in rows] == [s.name for s in spec.STATIC]
    for row, s in zip(rows, spec.STATIC):
        _, name, column, default, lo, hi, plausible = row
        assert column.startswith(s.column)
        if s.norm:
            assert (num(lo), num(hi)) == s.norm and num(default) == s.default
            assert tuple(map(num, plausible.split(".."))) == s.plausible
    targets = re.search(r"Its target is the 8 features ([^(]+)\(", CONTRACT).group(1)
    assert [t.strip() for t in re.split(r",\s*|\s+and\s+|\n\s*", targets) if t.strip()] == list(spec.TARGETS)
    assert f"version {spec.SPEC_VERSION}" in CONTRACT.splitlines()[0]


def test_the_contracts_ventilator_settings_table_is_the_shipped_map():
    rows = table_rows(CONTRACT, "| feature | set sources, in order")
    tm = load_track_map("ventilator-settings")
    assert [r[0] for r in rows] == [e.feature for e in tm.features] == ["TV", "PEEP", "FIO2", "RR"]
    for (feature, sources), e in zip(rows, tm.features):
        assert e.mode == "before"
        assert re.findall(r"[A-Za-z0-9]+/[A-Z0-9_]+", sources) == [s.track for s in e.sources], feature
        if any(s.per == spec.PER_IBW for s in e.sources):
            assert "/ IBW" in sources
    assert "× 1000" in rows[0][1] and "× 1.01972" in rows[1][1]
    assert "Solar8000/VENT_SET_PCP" in CONTRACT and "VENT_SET_PCP" in open(
        ROOT / "transforms" / "trackmaps" / "ventilator-settings.yaml").read()
