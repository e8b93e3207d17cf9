"""Upload a submission to Kaggle through the official `kaggle` package.

    make submit                         # the newest current submission of DATA
    make submit NAME=resnet18+resnet34_cv0.9123 MESSAGE="thresholds on"
    python -m pipeline submit --data aptos --name resnet18_cv0.9012

The competition's YAML names it on Kaggle (`kaggle: aptos2019-blindness-detection`). A
submission whose members changed since it was written (stale), or one made from a partial set
of folds (unless PARTIAL=1), is refused with the remedy: what is uploaded is what the CV beside
it describes. The description Kaggle shows carries the members, the nested CV with its folds'
spread and the pipeline's version; Kaggle's reference is recorded in
submissions/<competition>/leaderboard.csv, where `make lb` puts the scores.
"""

from __future__ import annotations

import math

from pipeline.base.config import load_config
from pipeline.base.log import log
from pipeline.base.utils import PipelineError, format_table, make_command
from pipeline.experiments.kaggle_api import connect, kaggle_slug, upload
from pipeline.experiments.layout import Layout
from pipeline.experiments.leaderboard import SubmissionSummary, read_submissions
from pipeline.experiments.public_scores import record_upload, upload_message, upload_row
from pipeline.experiments.runner import stage_lock

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "name", "message", "partial", "overrides")


def chosen_submission(summaries: list[SubmissionSummary], name: str | None, *, partial: bool,
                      competition: str) -> SubmissionSummary:
    """NAME's submission, else the newest current one with a CV (a refit's alone has none:
    it is uploaded when named); refused when stale, or partial unless `partial`, with the
    remedy."""
    if name is not None:
        found = [s for s in summaries if s.name == name]
        if not found:
            known = ", ".join(s.name for s in summaries) or "none yet"
            raise PipelineError(f"no submission {name!r} of {competition} (there are: {known})")
        chosen = found[0]
    else:
        written = [s for s in summaries if s.csv.is_file()]
        if not written:
            raise PipelineError(f"no submission of {competition} to upload: "
                                f"`{make_command('predict ensemble', competition)}` writes one")
        # the newest current one with a CV, else any current one; with none current, the
        # newest, refused below with its remedy
        pool = ([s for s in written if s.current and not math.isnan(s.cv)]
                or [s for s in written if s.current] or written)
        chosen = max(pool, key=lambda s: s.csv.stat().st_mtime)
    if not chosen.current:
        raise PipelineError(f"{chosen.name} no longer describes its members ({chosen.why}): its "
                            f"CV would not be the uploaded file's. {rewrite(chosen, competition)}"
                            f", then `{make_command('submit', competition)}`")
    if chosen.partial and not partial:
        raise PipelineError(
            f"{chosen.name} was made from a partial set of folds: its CV covers only the rows "
            f"of those folds. Train the missing folds and `{make_command('ensemble', competition)}`"
            f", or `{make_command('submit', competition, NAME=chosen.name, PARTIAL=1)}` to "
            f"upload it as it is")
    return chosen


def rewrite(summary: SubmissionSummary, competition: str) -> str:
    """The command that writes a stale submission afresh from its members as they are now."""
    if math.isnan(summary.cv) and len(summary.members) == 1:  # the full-data refit's own
        command = make_command("refit", competition, MODEL=summary.members[0])
    else:
        command = make_command("predict ensemble", competition, MODELS=" ".join(summary.members))
    return f"`{command}` writes it afresh"


def submit(config, name: str | None, note: str = "", partial: bool = False) -> dict:
    """Upload the chosen submission and record it; the row recorded."""
    data, layout = config.data, Layout.of(config)
    slug = kaggle_slug(data)
    with stage_lock(layout.submissions_lock, layout.submissions, "uploaded"):
        summaries = read_submissions(data, config.folds, layout)
        chosen = chosen_submission(summaries, name, partial=partial, competition=data.name)
        api = connect()
        message = upload_message(chosen, data.metric, chosen.cv_std, note)
        log.info(f"uploading {chosen.csv} to {slug} ...")
        ref = upload(api, slug, chosen.csv, message)
        row = upload_row(chosen, ref=ref, message=message, cv_std=chosen.cv_std)
        record_upload(layout, row)
    log.info(format_table([[k, row[k]] for k in ("submission", "ref", "date", "description")],
                          ["uploaded", "value"]))
    log.info(f"recorded in {layout.public_leaderboard}; once Kaggle has scored it (a minute or "
             f"more), `{make_command('lb', data.name)}` fetches the score")
    return row


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    submit(config, args.name, args.message or "", args.partial)
