"""Pre-flight check of a competition's CSVs and images, before any expensive work.

    python -m pipeline check --data digits        # make check

Finds missing columns, duplicated ids, labels outside the class list, ids that escape the image
folder, missing images and unreadable or truncated images, and reports each kind with the first
few offenders and the count (pipeline/data/checks.py). With `data.drop_bad_images=true` (or
`--drop-bad`), bad *training* images are left out and listed instead; a bad test image is always
an error (the submission needs every test row).
"""

from __future__ import annotations

from pipeline.base.config import DataConfig, load_config
from pipeline.base.log import log
from pipeline.base.utils import format_table
from pipeline.data.checks import CheckResult, check_competition


def print_summary(data: DataConfig, result: CheckResult) -> None:
    rows = [["train", len(result.train) + len(result.dropped), len(result.dropped)],
            ["test", len(result.test_ids), 0]]
    log.info(format_table(rows, ["split", "rows", "dropped"]))
    counts = result.train["label"].value_counts()
    log.info(format_table([[c, int(counts.get(c, 0)), f"{counts.get(c, 0) / len(result.train):.1%}"]
                           for c in data.classes], ["class", "images", "share"]))


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "drop_bad", "overrides")


def main(args) -> None:
    config = load_config(args.data, None, args.overrides)
    result = check_competition(config.data, drop_bad=args.drop_bad or None)
    how = "" if config.data.submission != "auto" else " (read off the sample's header)"
    log.info(f"{config.data.name}: all checks passed; submission: {result.submission}{how}")
    print_summary(config.data, result)
