"""Fetch this competition's submissions and their scores back from Kaggle, beside their CV.

    make lb                             # after `make submit`, once Kaggle has scored it
    python -m pipeline lb --data aptos

Updates submissions/<competition>/leaderboard.csv (each upload's status, public and, once the
competition has ended, private score; uploads made outside the pipeline join it unnamed) and
prints it with the correlation of CV and public LB and the flags of
pipeline/experiments/public_scores.py (a public score far from its CV; a public LB that rises
while the CV does not). `make runs` and `make report` show the same table and its plot.
"""

from __future__ import annotations

from pipeline.base.config import load_config
from pipeline.base.log import log
from pipeline.base.utils import make_command, warn
from pipeline.experiments.kaggle_api import connect, kaggle_slug, scores_on_kaggle
from pipeline.experiments.layout import Layout
from pipeline.experiments.leaderboard import read_submissions
from pipeline.experiments.public_scores import (
    correlation_line,
    has_lb_scores,
    lb_flags,
    lb_summary,
    read_uploads,
    with_kaggle_scores,
    write_uploads,
)
from pipeline.experiments.runner import stage_lock
from pipeline.reporting import plots

# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    data, layout = config.data, Layout.of(config)
    slug = kaggle_slug(data)
    rows = scores_on_kaggle(connect(), slug)
    with stage_lock(layout.submissions_lock, layout.submissions, "updated"):
        known = {s.name: s for s in read_submissions(data, config.folds, layout)}
        table = with_kaggle_scores(read_uploads(layout), rows, known)
        write_uploads(layout, table)
        if has_lb_scores(table):
            plots.plot_cv_against_lb(table, data.metric, layout.public_leaderboard_plot,
                                     title=correlation_line(table, data.metric))
    for line in lb_summary(table, data.metric):
        log.info(line)
    for flag in lb_flags(table, data.metric):
        warn(flag)
    log.info(f"{len(rows)} submission(s) on Kaggle -> {layout.public_leaderboard}|png; "
             f"`{make_command('runs', data.name)}` and `{make_command('report', data.name)}` "
             f"show them beside the experiments")
