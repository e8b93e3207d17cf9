"""Our uploads to Kaggle and the scores Kaggle gave them (submissions/<competition>/
leaderboard.csv), and what they say about the CV.

    record_upload(layout, upload_row(summary, ref, message, metric))   # make submit
    table = with_kaggle_scores(read_uploads(layout), scores_on_kaggle(api, slug))  # make lb
    for flag in lb_flags(table, metric): print(flag)                    # make lb, runs, report

One row per upload: the submission's name, Kaggle's reference, when, the description sent, the
nested CV printed beside it and the spread of its folds, then Kaggle's status and scores. A
submission made outside `make submit` (the `kaggle` command, the web page) joins the table
unnamed when `make lb` first sees it.

The flags are what a competitor watches for in the CV-against-LB plot:
- drift: a public score further from its CV than LB_DRIFT_SPREADS times the folds' spread (a
  fold's score varies that much between folds of this size; the public part of the test set is
  usually no larger than a fold, so its score should vary no more);
- chasing: a submission that beats every earlier public score while its CV is no better than an
  earlier submission's, i.e. the public leaderboard chose it (the RSNA 2023 team that fell from
  0.63 to 0.44 on the private LB did that with thresholds).
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import pipeline
from pipeline.base.metrics import higher_is_better
from pipeline.base.utils import format_table, write_csv_atomic
from pipeline.experiments.layout import Layout
from pipeline.experiments.leaderboard import SubmissionSummary

COLUMNS = ["submission", "ref", "date", "description", "cv", "cv_std", "members", "status",
           "public", "private"]
TEXT_COLUMNS = ["submission", "ref", "date", "description", "members", "status"]
LB_DRIFT_SPREADS = 2.0  # judgement: two standard deviations of a fold's score
MESSAGE_LIMIT = 250  # characters; Kaggle keeps a short description


def read_uploads(layout: Layout) -> pd.DataFrame:
    """The table (empty, with its columns, before the first upload)."""
    path = layout.public_leaderboard
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    table = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False,
                        na_values={c: [""] for c in COLUMNS if c not in TEXT_COLUMNS})
    return table.reindex(columns=COLUMNS)


def write_uploads(layout: Layout, table: pd.DataFrame) -> None:
    write_csv_atomic(table[COLUMNS], layout.public_leaderboard)


def upload_message(summary: SubmissionSummary, metric: str, cv_std: float, note: str = "") -> str:
    """The description Kaggle shows beside the upload: name, members, the nested CV with its
    folds' spread, the code's version; the user's note first, shortened where the whole would
    pass Kaggle's length (the facts are never cut)."""
    if np.isnan(summary.cv):
        cv = "unvalidated: no CV (the full-data refit alone)"
    else:
        spread = "" if np.isnan(cv_std) else f" ± {cv_std:.4f}"
        cv = f"CV {metric} {summary.cv:.4f}{spread} (nested)"
    facts = f"{summary.name}: {'+'.join(summary.members)} | {cv} | pipeline {code_version()}"
    if len(facts) > MESSAGE_LIMIT:
        facts = facts[:MESSAGE_LIMIT - 3] + "..."
    room = MESSAGE_LIMIT - len(facts) - 3
    if note and room > 3:
        note = note if len(note) <= room else note[:room - 3] + "..."
        return f"{note} | {facts}"
    return facts


def code_version() -> str:
    """The package's version and, in a git checkout, the commit (`+dirty` with changes not
    committed): what made the submission, to the commit."""
    try:
        described = subprocess.run(
            ["git", "-C", str(Path(pipeline.__file__).parent), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__
    commit = described.stdout.strip() if described.returncode == 0 else ""
    return f"{pipeline.__version__}+{commit}" if commit else pipeline.__version__


def utc_text(value: Any) -> str:
    """A time as ISO text in UTC (Kaggle's datetimes are UTC without a zone), "" for none."""
    if value in (None, ""):
        return ""
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.isoformat(timespec="seconds")


def upload_row(summary: SubmissionSummary, *, ref: str, message: str,
               cv_std: float) -> dict[str, Any]:
    return {"submission": summary.name, "ref": ref,
            "date": utc_text(datetime.now(timezone.utc)),
            "description": message, "cv": summary.cv, "cv_std": cv_std,
            "members": "+".join(summary.members), "status": "pending", "public": np.nan,
            "private": np.nan}


def record_upload(layout: Layout, row: dict[str, Any]) -> pd.DataFrame:
    table = read_uploads(layout)
    table = pd.concat([table, pd.DataFrame([row], columns=COLUMNS)], ignore_index=True)
    write_uploads(layout, table)
    return table


def with_kaggle_scores(table: pd.DataFrame, kaggle_rows: list[dict[str, Any]],
                       known: dict[str, SubmissionSummary]) -> pd.DataFrame:
    """The table with Kaggle's status and scores for each upload it knows, matched by Kaggle's
    reference, else by the description sent (the older package returns no reference), else by
    the file's name; an upload the table lacks (the `kaggle` command, the web page, a crash
    before it was recorded) appended, named and with its CV when its file is one of the
    `known` submissions (name -> summary). Kaggle lists the newest first."""
    table = table.copy().reset_index(drop=True)
    added = []
    for row in reversed(kaggle_rows):  # oldest first: two uploads of one description in order
        row = {**row, "date": utc_text(row["date"]),
               "status": f"error: {row['error']}" if row.get("error") else row["status"]}
        at = matching_row(table, row)
        if at is None:
            added.append(unrecorded_row(row, known.get(Path(row.get("file", "")).stem)))
            continue
        table.loc[at, ["ref", "date", "status"]] = [row["ref"], row["date"], row["status"]]
        table.loc[at, ["public", "private"]] = [row["public"], row["private"]]
    if added:
        table = pd.concat([table, pd.DataFrame(added, columns=COLUMNS)], ignore_index=True)
    return table.astype({"public": float, "private": float, "cv": float, "cv_std": float})


def unrecorded_row(row: dict[str, Any], summary: SubmissionSummary | None) -> dict[str, Any]:
    named = {"submission": summary.name, "cv": summary.cv, "cv_std": summary.cv_std,
             "members": "+".join(summary.members)} if summary else {}
    return {**dict.fromkeys(COLUMNS, ""), "cv": np.nan, "cv_std": np.nan, **named,
            **{k: row[k] for k in ("ref", "date", "description", "status", "public", "private")}}


def matching_row(table: pd.DataFrame, row: dict[str, Any]) -> int | None:
    if row["ref"]:
        same = table.index[table["ref"] == row["ref"]]
        if len(same):
            return int(same[0])
    unreferenced = table["ref"] == ""
    same = table.index[unreferenced & (table["description"] == row["description"])]
    if not len(same) and row.get("file"):
        same = table.index[unreferenced & (table["submission"] == Path(row["file"]).stem)]
    return int(same[0]) if len(same) else None


def lb_flags(table: pd.DataFrame, metric: str) -> list[str]:
    """What the table says against the CV (the module's docstring): drift and chasing."""
    return drift_flags(table) + chasing_flags(table, metric)


def drift_flags(table: pd.DataFrame) -> list[str]:
    flags = []
    for row in table.dropna(subset=["cv", "cv_std", "public"]).itertuples():
        gap = row.public - row.cv
        if row.cv_std > 0 and abs(gap) > LB_DRIFT_SPREADS * row.cv_std:
            flags.append(
                f"{row.submission or row.ref}: public LB {row.public:.4f} is {gap:+.4f} from its "
                f"CV {row.cv:.4f}, more than {LB_DRIFT_SPREADS:g}x the folds' spread "
                f"({row.cv_std:.4f}): the test set may differ from the training images (`make "
                f"audit` measures the shift), or the public part is small")
    return flags


def chasing_flags(table: pd.DataFrame, metric: str) -> list[str]:
    sign = 1.0 if higher_is_better(metric) else -1.0
    scored = table.dropna(subset=["cv", "public"]).sort_values("date", kind="stable")
    flags, best_public, best_cv = [], -np.inf, -np.inf
    for row in scored.itertuples():
        public, cv = sign * row.public, sign * row.cv
        if public > best_public and cv <= best_cv and np.isfinite(best_public):
            flags.append(
                f"{row.submission or row.ref}: the best public LB so far ({row.public:.4f}) "
                f"with a CV ({row.cv:.4f}) no better than an earlier submission's "
                f"({sign * best_cv:.4f}): the public leaderboard chose it, and the private one "
                f"need not agree; choose the final submissions by CV")
        best_public, best_cv = max(best_public, public), max(best_cv, cv)
    return flags


def cv_lb_correlation(table: pd.DataFrame, column: str = "public") -> float:
    """Pearson's r of the nested CV and a leaderboard score over the uploads with both (NaN
    under three)."""
    both = table.dropna(subset=["cv", column])
    if len(both) < 3 or both["cv"].std() == 0 or both[column].std() == 0:
        return float("nan")
    return float(np.corrcoef(both["cv"], both[column])[0, 1])


LB_HEADERS = ["submission", "date", "cv", "cv std", "public LB", "private LB", "status"]


def lb_rows(table: pd.DataFrame) -> list[list[Any]]:
    """The table as `make lb` and `make runs` print it, oldest first."""
    shown = table.sort_values("date", kind="stable")
    return [[r.submission or f"{r.description[:40]} (ref {r.ref}, not ours)", r.date[:16], r.cv,
             r.cv_std, r.public, r.private, r.status] for r in shown.itertuples()]


def correlation_line(table: pd.DataFrame, metric: str) -> str:
    """How well the CV has predicted the public (and private) LB, in a line (the plot's title)."""
    said = []
    for column in ("public", "private"):
        r, n = cv_lb_correlation(table, column), len(table.dropna(subset=["cv", column]))
        if np.isfinite(r):
            said.append(f"{column} LB: Pearson r {r:.2f} over {n} uploads")
        elif column == "public" or n:
            said.append(f"{column} LB: {n} scored upload(s) with a CV, the correlation needs "
                        f"three")
    return f"CV against LB ({metric}): " + "; ".join(said)


def lb_summary(table: pd.DataFrame, metric: str) -> list[str]:
    """The printed table and, under it, the correlation line."""
    return [format_table(lb_rows(table), LB_HEADERS), correlation_line(table, metric)]


def has_lb_scores(table: pd.DataFrame) -> bool:
    """Whether any upload with a CV has a leaderboard score (something to plot)."""
    return bool(table.dropna(subset=["cv"])[["public", "private"]].notna().any().any())
