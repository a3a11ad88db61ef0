"""The mistakes page of a test set: every student error and every student/teacher
disagreement, for a person to read (the playbook's practice #11: look at the errors).

One self-contained HTML file per test set (no network, no external scripts): a table with the
input, gold, teacher, student, the student's confidence and the error type; the headers sort,
the controls above filter by kind (error / disagreement), error type and confidence range.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

ERROR = "error"  # the student's label is not the gold label
DISAGREEMENT = "disagreement"  # student right, teacher says otherwise


def error_type(gold: str, student: str | None, labels: list[str]) -> str:
    """'unparsed', for a binary task 'false positive'/'false negative' (the positive label is
    the last of `labels`, as for the threshold), else 'gold → predicted'."""
    if student is None:
        return "unparsed"
    if len(labels) == 2:
        return "false positive" if student == labels[1] else "false negative"
    return f"{gold} → {student}"


def mistake_rows(
    student_rows: list[dict[str, Any]],
    teacher_labels: dict[str, str | None],
    labels: list[str],
) -> list[dict[str, Any]]:
    """The page's rows: each student error (kind 'error'), then each row the student got right
    and the teacher did not answer alike (kind 'disagreement'). `student_rows` carry id, input,
    gold, label (the student's) and confidence; `teacher_labels` maps id -> the teacher's
    label (rows the teacher did not score are absent)."""
    out = []
    for r in student_rows:
        teacher = teacher_labels.get(r["id"])
        wrong = r["label"] != r["gold"]
        disagrees = r["id"] in teacher_labels and teacher != r["label"]
        if not wrong and not disagrees:
            continue
        out.append(
            {
                "kind": ERROR if wrong else DISAGREEMENT,
                "line": r.get("source_line"),
                "input": r["input"],
                "gold": r["gold"],
                "teacher": teacher,
                "student": r["label"],
                "confidence": r.get("confidence"),
                "error_type": error_type(r["gold"], r["label"], labels) if wrong else "",
                "teacher_right": None if r["id"] not in teacher_labels else teacher == r["gold"],
            }
        )
    out.sort(key=lambda m: (m["kind"] != ERROR, -(m["confidence"] or 0.0)))
    return out


_SCRIPT = """
const rows = [...document.querySelectorAll('#mistakes tbody tr')];
function filter() {
  const kind = document.getElementById('kind').value;
  const type = document.getElementById('type').value;
  const lo = parseFloat(document.getElementById('cmin').value || '0');
  const hi = parseFloat(document.getElementById('cmax').value || '1');
  let shown = 0;
  for (const r of rows) {
    const c = parseFloat(r.dataset.confidence);
    const ok = (!kind || r.dataset.kind === kind) && (!type || r.dataset.errorType === type)
      && (isNaN(c) || (c >= lo && c <= hi));
    r.hidden = !ok; shown += ok;
  }
  document.getElementById('shown').textContent = shown;
}
function sortBy(col, numeric) {
  const body = document.querySelector('#mistakes tbody');
  const th = document.querySelectorAll('#mistakes th')[col];
  const dir = th.dataset.dir === 'asc' ? -1 : 1;
  th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const key = r => numeric ? parseFloat(r.cells[col].dataset.value ?? r.cells[col].textContent)
                           : r.cells[col].textContent;
  rows.sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * dir; });
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll('select, input').forEach(e => e.addEventListener('input', filter));
filter();
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; font-size: 13px; }
th { background: #f0f0f0; cursor: pointer; position: sticky; top: 0; }
td.input { white-space: pre-wrap; max-width: 60em; }
tr.error td.kind { color: #b00; } tr.disagreement td.kind { color: #a60; }
.controls { margin: 0.8em 0; } .controls > * { margin-right: 1em; }
"""

COLUMNS = [
    ("kind", False),
    ("line", True),
    ("input", False),
    ("gold", False),
    ("teacher", False),
    ("student", False),
    ("confidence", True),
    ("error type", False),
]


def render_mistakes_html(test_set: str, rows: list[dict[str, Any]], scored_rows: int) -> str:
    """The page (see the module docstring) for `rows` from ``mistake_rows``."""
    e = html.escape
    errors = sum(r["kind"] == ERROR for r in rows)
    types = sorted({r["error_type"] for r in rows if r["error_type"]})
    head = "".join(
        f'<th onclick="sortBy({i}, {str(num).lower()})">{e(name)}</th>'
        for i, (name, num) in enumerate(COLUMNS)
    )
    body = []
    for r in rows:
        conf = "" if r["confidence"] is None else f"{r['confidence']:.4f}"
        cells = [
            f'<td class="kind">{e(r["kind"])}</td>',
            f'<td data-value="{r["line"] if r["line"] is not None else ""}">'
            f"{'' if r['line'] is None else r['line']}</td>",
            f'<td class="input">{e(r["input"] or "")}</td>',
            f"<td>{e(r['gold'])}</td>",
            f"<td>{e('' if r['teacher'] is None else r['teacher'])}</td>",
            f"<td>{e('(unparsed)' if r['student'] is None else r['student'])}</td>",
            f'<td data-value="{conf or "NaN"}">{conf}</td>',
            f"<td>{e(r['error_type'])}</td>",
        ]
        body.append(
            f'<tr class="{e(r["kind"])}" data-kind="{e(r["kind"])}" '
            f'data-error-type="{e(r["error_type"])}" data-confidence="{conf or "NaN"}">'
            + "".join(cells)
            + "</tr>"
        )
    type_options = "".join(f'<option value="{e(t)}">{e(t)}</option>' for t in types)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Mistakes: {e(test_set)}</title><style>{_STYLE}</style></head>
<body>
<h1>Student mistakes on <code>{e(test_set)}</code></h1>
<p>{errors} errors of {scored_rows} rows, {len(rows) - errors} more rows where the student is
right and the teacher disagrees. Click a column header to sort.</p>
<div class="controls">
<label>kind <select id="kind"><option value="">all</option>
<option value="{ERROR}">errors</option><option value="{DISAGREEMENT}">disagreements</option>
</select></label>
<label>error type <select id="type"><option value="">all</option>{type_options}</select></label>
<label>confidence from <input id="cmin" type="number" min="0" max="1" step="0.05" value="0">
to <input id="cmax" type="number" min="0" max="1" step="0.05" value="1"></label>
<span><span id="shown">{len(rows)}</span> shown</span>
</div>
<table id="mistakes"><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_mistakes_page(
    path: Path, test_set: str, rows: list[dict[str, Any]], scored_rows: int
) -> Path:
    path.write_text(render_mistakes_html(test_set, rows, scored_rows), encoding="utf-8")
    return path
