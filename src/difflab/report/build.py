"""Assemble the report folder: sections keyed on their inputs, reused when unchanged,
rebuilt whole (in a staging folder moved into place) when not; then index.html,
report.md and report.json written atomically from the section records."""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from difflab.report.cache import section_key
from difflab.report.html import render_html, render_markdown
from difflab.report.sections import SECTIONS, ReportOptions, missing

MARKER = "report.json"
RECORD = "section.json"


def check_report_folder(out: Path, overwrite: bool) -> None:
    """An --out that holds files but is not a difflab report is refused unless ``overwrite``
    (then it is replaced whole); an earlier report is updated section by section."""
    from difflab.io import check_fresh_output, check_output

    check_output(out, "dir", "out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        check_fresh_output(out, "out", False)  # raises, naming a file in it


def build_report(out: Path, o: ReportOptions, *, overwrite: bool = False,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    log = log or (lambda m: None)
    out = Path(out)
    check_report_folder(out, overwrite)
    if overwrite and out.is_dir():
        from difflab.io import check_fresh_output

        check_fresh_output(out, "out", True)  # refuses the working folder, its parents, home
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for sec in SECTIONS:
        records.append(_section(out, sec, o, log))
    numbers = {r["id"]: {"status": r["status"], **r["numbers"]} for r in records}
    from difflab.io import atomic_path

    for name, body in (("index.html", render_html(records)), ("report.md", render_markdown(records)),
                       (MARKER, json.dumps(numbers, indent=2, sort_keys=True) + "\n")):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(body, encoding="utf-8")
    return records


def _section(out: Path, sec, o: ReportOptions, log) -> dict:
    folder = out / sec.id
    needs = sec.needs(o)
    if needs:
        if folder.exists():
            shutil.rmtree(folder)
        text = "Not built. Missing: " + "; ".join(needs) + "."
        return {"id": sec.id, "title": sec.title, "status": "missing", "blocks": [missing(text)], "numbers": {}}
    inputs, options = sec.key_parts(o)
    key = section_key(sec.id, inputs, options)
    rec_path = folder / RECORD
    if rec_path.is_file():
        try:
            old = json.loads(rec_path.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key:
            log(f"{sec.id}: unchanged inputs, reusing {folder}")
            old["cached"] = True
            return old
    stage = out / f".staging-{sec.id}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    t0 = time.perf_counter()
    try:
        rec = sec.build(o, stage, sec.id, log)
    except Exception as e:  # a section's failure never takes the others down; the page says why
        shutil.rmtree(stage, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(folder)
        print(f"difflab: warning: report section {sec.id} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"id": sec.id, "title": sec.title, "status": "failed",
                "blocks": [missing(f"Building this section failed: {type(e).__name__}: {e}")], "numbers": {}}
    rec["key"] = key
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    (stage / RECORD).write_text(json.dumps(rec, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    stage.rename(folder)
    rec["cached"] = False
    return rec
