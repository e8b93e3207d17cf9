"""`make runs` and `make report` with nothing changed (issue 26: under 3 s at 16,000 images,
bench/scale.py): they load only what judging freshness needs, and `make runs` redraws its
leaderboard picture only when the table changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline.experiments.layout import Layout
from pipeline.experiments.leaderboard import HEADERS
from pipeline.stages.runs import write_leaderboard

ROOT = Path(__file__).resolve().parents[1]
# What only drawing or writing a page needs: seconds of imports for a command that changed nothing
DRAWING_ONLY = ("sklearn", "matplotlib", "jinja2", "scipy", "torch")


def third_party_loaded(module: str) -> list[str]:
    code = (f"import json, sys, {module}\n"
            f"print(json.dumps(sorted(set({list(DRAWING_ONLY)!r}) & set(sys.modules))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_the_runs_and_report_verbs_load_no_drawing_library_until_they_draw():
    assert third_party_loaded("pipeline.stages.runs") == []
    assert third_party_loaded("pipeline.stages.report") == []


def board(oof: float) -> pd.DataFrame:
    row = {h: "-" for h in HEADERS} | {"experiment": "resnet20", "model": "resnet20",
                                        "oof": oof, "cv mean": oof, "cv std": 0.01}
    return pd.DataFrame([row], columns=HEADERS)


def written(layout: Layout) -> dict[str, int]:
    return {kind: layout.leaderboard(kind).stat().st_mtime_ns for kind in ("csv", "md", "png")}


def test_the_leaderboard_is_rewritten_and_redrawn_only_when_it_changed(tiny_config):
    layout = Layout.of(tiny_config)
    layout.runs.mkdir(parents=True, exist_ok=True)
    write_leaderboard(board(0.5), tiny_config, layout)
    first = written(layout)
    write_leaderboard(board(0.5), tiny_config, layout)
    assert written(layout) == first  # nothing changed: nothing written, nothing drawn

    layout.leaderboard("png").unlink()
    write_leaderboard(board(0.5), tiny_config, layout)
    assert layout.leaderboard("png").is_file()  # a deleted picture is drawn again

    drawn = written(layout)["png"]
    write_leaderboard(board(0.75), tiny_config, layout)
    assert pd.read_csv(layout.leaderboard("csv"))["oof"].tolist() == [0.75]
    assert "0.7500" in layout.leaderboard("md").read_text()
    assert layout.leaderboard("png").stat().st_mtime_ns != drawn
