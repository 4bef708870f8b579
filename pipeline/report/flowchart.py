"""The cohort's flow as a CONSORT-style diagram (inline SVG, for the report).

    Requested ──┬──> left out by criterion 1 (n)
                ├──> left out by criterion 2 (n)
                v
    Selected, processed ──> too short (n), failed (n)
                v
    train | validation | test   (cases, patients, windows)

Every box is a <rect class="box" id=...>, every arrow a <line class="arrow"
data-to=...> ending on the edge of the box it points at; the page's script
checks that in the browser (pipeline.report.quality) and says so in the body's
data-flow-ok attribute.
"""
from __future__ import annotations

import html

from pipeline.output.cohort import plural
from transforms.cohort import flag_of

BOX_W, BOX_H, GAP = 300, 46, 26
MAIN_X, SIDE_X = 20, 420
SIDE_W = 420


def _box(box_id: str, x: int, y: int, w: int, lines: list[str], tone: str = "main") -> str:
    e = html.escape
    fill = {"main": "#eef4fb", "side": "#fbeeee", "split": "#eefbef"}[tone]
    text = "".join(f'<tspan x="{x + 10}" dy="{16 if i else 0}">{e(t)}</tspan>' for i, t in enumerate(lines))
    return (f'<g><rect class="box" id="{e(box_id)}" x="{x}" y="{y}" width="{w}" height="{BOX_H}" rx="4" '
            f'fill="{fill}" stroke="#446"/><text x="{x + 10}" y="{y + 19}" font-size="13">{text}</text></g>')


def _arrow(x1: int, y1: int, x2: int, y2: int, to: str) -> str:
    return (f'<line class="arrow" data-to="{html.escape(to)}" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" '
            'stroke="#446" stroke-width="1.5" marker-end="url(#head)"/>')


def _short(text: str, n: int = 52) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def flow_svg(cohort: dict) -> str:
    """The diagram of the metadata's `cohort` (pipeline.output.cohort.CohortSummary.as_json)."""
    parts, y = [], 10
    parts.append(_box("flow-requested", MAIN_X, y, BOX_W, [f"Requested: {plural(cohort['requested'], 'case')}"]))
    top = y + BOX_H
    y += BOX_H + GAP
    stem_x = MAIN_X + BOX_W // 2
    left = cohort["requested"]
    for i, c in enumerate(cohort["criteria"]):
        n = len(c["excluded"])
        left -= n
        flag = flag_of(c["kind"])
        parts.append(_box(f"flow-criterion-{i + 1}", SIDE_X, y, SIDE_W,
                          [f"Left out: {plural(n, 'case')} ({left} remain)", _short(f"{flag} {c['text']}")], "side"))
        parts.append(_arrow(stem_x, y + BOX_H // 2, SIDE_X, y + BOX_H // 2, f"flow-criterion-{i + 1}"))
        y += BOX_H + GAP // 2
    y += GAP // 2
    parts.append(f'<line class="stem" x1="{stem_x}" y1="{top}" x2="{stem_x}" y2="{y}" stroke="#446" '
                 'stroke-width="1.5"/>')
    parts.append(_arrow(stem_x, y - 1, stem_x, y, "flow-selected"))
    p = cohort["processed"]
    parts.append(_box("flow-selected", MAIN_X, y, BOX_W,
                      [f"Selected and processed: {plural(cohort['selected'], 'case')}"]))
    parts.append(_box("flow-not-used", SIDE_X, y, SIDE_W,
                      [f"Too short for a window: {p['too_short']}; failed: {p['failed']}"]
                      + ([f"not done yet: {p['not_done']}"] if p["not_done"] else []), "side"))
    parts.append(_arrow(MAIN_X + BOX_W, y + BOX_H // 2, SIDE_X, y + BOX_H // 2, "flow-not-used"))
    y += BOX_H + GAP
    splits = list(cohort["splits"].items())
    width = max(150, min(240, (SIDE_X + SIDE_W - MAIN_X - 10 * (len(splits) - 1)) // max(1, len(splits))))
    per_row = max(1, (SIDE_X + SIDE_W - MAIN_X + 10) // (width + 10))
    for i, (name, d) in enumerate(splits):
        row, col = divmod(i, per_row)
        x, sy = MAIN_X + col * (width + 10), y + row * (BOX_H + GAP)
        parts.append(_box(f"flow-split-{name}", x, sy, width,
                          [f"{name}: {plural(d['cases'], 'case')}",
                           f"{plural(d['patients'], 'patient')}, {plural(d['windows'], 'window')}"],
                          "split"))
        parts.append(_arrow(stem_x, y - GAP, x + width // 2, sy, f"flow-split-{name}"))
    rows = (len(splits) + per_row - 1) // per_row
    height = y + rows * (BOX_H + GAP)
    return (f'<svg id="flow" xmlns="http://www.w3.org/2000/svg" width="{SIDE_X + SIDE_W + 20}" height="{height}" '
            'role="img" aria-label="cohort flow diagram"><defs><marker id="head" markerWidth="8" markerHeight="8" '
            'refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#446"/></marker></defs>'
            + "".join(parts) + "</svg>")


# The page's check, run in the browser: every box drawn with a size, every
# arrow ending on the edge of the box it names.
CHECK_SCRIPT = """
  var boxes = Array.prototype.slice.call(document.querySelectorAll("#flow rect.box"));
  var arrows = Array.prototype.slice.call(document.querySelectorAll("#flow line.arrow"));
  var flowOk = boxes.length > 0 && \
boxes.every(function (b) { var r = b.getBBox(); return r.width > 0 && r.height > 0; });
  arrows.forEach(function (a) {
    var t = document.getElementById(a.getAttribute("data-to"));
    if (!t) { flowOk = false; return; }
    var r = t.getBBox(), x = a.x2.baseVal.value, y = a.y2.baseVal.value;
    var onEdge = x >= r.x - 1 && x <= r.x + r.width + 1 && y >= r.y - 1 && y <= r.y + r.height + 1 &&
      (Math.abs(x - r.x) <= 1 || Math.abs(x - r.x - r.width) <= 1 || \
Math.abs(y - r.y) <= 1 || Math.abs(y - r.y - r.height) <= 1);
    if (!onEdge) flowOk = false;
  });
  document.body.setAttribute("data-flow-ok", flowOk ? "true" : "false");
  document.body.setAttribute("data-flow-boxes", String(boxes.length));
  document.body.setAttribute("data-flow-arrows", String(arrows.length));
"""
