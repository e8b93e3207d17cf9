"""The audit's findings that other stages read: its images (AuditedImages), a finding run
by the one freshness rule (run_finding), and the duplicate groups (duplicates_finding), which
`make audit` writes and `make folds` finds itself when they are missing or stale."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.config import Config, DataConfig
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.utils import write_csv_atomic
from pipeline.data.checks import Checked
from pipeline.data.duplicates import (
    DETECTOR,
    GROUP_IMAGES,
    MIRROR_QUERIES,
    duplicate_table,
    exact_pairs,
    group_of_pairs,
    near_pairs,
    read_duplicates,
    split_chains,
)
from pipeline.data.survey import Survey
from pipeline.experiments.freshness import audit_image_inputs, audited_images
from pipeline.experiments.layout import Layout
from pipeline.experiments.runner import Step, run_step
from pipeline.reporting import plots

# --------------------------------------------------------------------------------------------
# The images audited


@dataclass
class AuditedImages:
    """Every labelled and test image of the competition, as its CSVs list them (the findings'
    fingerprints are of these files), and, on first use, the ones the audit reads: checked as
    `make check` and `make folds` check them (pipeline/data/checks.py), each read once for the
    check and the survey the findings are made from (pipeline/data/survey.py). A bad image is an
    error that names it with the remedy; with data.drop_bad_images=true bad training images are
    left out and listed (a bad test image stays an error). A current audit reads no image."""

    data: DataConfig
    frame: pd.DataFrame  # part (train/test), id, label ('' for test): labelled rows first
    paths: list[Path]
    dropped: dict[str, str] = field(default_factory=dict)  # training id -> what is wrong
    # the check, shared with a caller that checks the same images (`make folds`: once for both)
    checked: Checked | None = None

    @classmethod
    def of(cls, data: DataConfig, checked: Checked | None = None) -> AuditedImages:
        return cls(data, *audited_images(data), checked=checked or Checked(data))

    def inputs(self) -> dict[str, str]:
        """The fingerprints a finding is made from: the rows and image files as listed, and the
        settings that decide which images are read."""
        return {**audit_image_inputs(self.data, self.frame, self.paths),
                "image checks": fingerprint([self.data.drop_bad_images,
                                             self.data.max_image_pixels])}

    @cached_property
    def usable(self) -> tuple[pd.DataFrame, list[Path]]:
        """(frame, paths) of the images that passed the check."""
        self.dropped = self.checked(survey=True).dropped
        keep = ~((self.frame["part"] == "train") & self.frame["id"].isin(self.dropped)).to_numpy()
        return (self.frame[keep].reset_index(drop=True),
                [path for path, kept in zip(self.paths, keep) if kept])

    @cached_property
    def survey(self) -> Survey:
        """What the check's read of each usable image told, in `usable`'s order."""
        return self.checked(survey=True).survey.of_paths(self.usable[1])


def run_finding(path: Path, manifest: Path, inputs: dict[str, str], force: bool,
                *, compute: Callable[[], list[Path]], what: str) -> None:
    """Compute a finding unless current (stale: computed again); its manifest is written last."""
    written: list[Path] = []  # compute's files, for the manifest
    run_step(Step(what, manifest, inputs, {}, lambda: written,
                  lambda: written.extend(compute()),
                  current=f"{what}: current ({path}); FORCE=1 audits again"), force)


# --------------------------------------------------------------------------------------------
# Duplicates


def find_duplicates(frame: pd.DataFrame, survey: Survey) -> pd.DataFrame:
    """Groups of copies among every audited image: exact bytes, or near copies by the
    detector of pipeline/data/duplicates.py (aligned thumbnails, the competition's own cut,
    no group by chaining alone)."""
    n = len(frame)
    exact = exact_pairs(survey.digests)
    found = split_chains(near_pairs(survey.thumbs), n)
    cuts = ", ".join(f"{view} {cut:.3f}" for view, cut in found.cuts.items())
    log.info(f"near copies: {len(found.pairs)} pair(s) above the cuts ({cuts}: aligned "
             f"correlation; how alike distinct images get: {min(n, MIRROR_QUERIES)} "
             f"mirrored images against the {n})")
    groups = group_of_pairs(n, np.concatenate([exact, found.pairs]))
    twins = np.zeros(n, bool)
    twins[exact.reshape(-1)] = True
    return duplicate_table(frame["id"], frame["part"], frame["label"], groups,
                           how=np.where(twins, "exact", "near"))


def duplicates_finding(config: Config, layout: Layout, images: AuditedImages,
                       force: bool) -> pd.DataFrame:
    """audit/<competition>/duplicates.csv|png, found again unless current (the one freshness
    rule): `make audit` and `make folds` (folds.duplicates) share it, so it costs once. The
    caller holds the audit's lock."""
    findings = layout.findings
    inputs = {**images.inputs(), "settings": fingerprint({"detector": DETECTOR})}

    def compute() -> list[Path]:
        frame, paths = images.usable
        table = find_duplicates(frame, images.survey)
        # the table, which `make folds` reads, last: a picture that fails leaves the old one
        write_duplicates_picture(table, frame, paths, config.audit.shown,
                                 path=findings.duplicates_png)
        write_csv_atomic(table, findings.duplicates)
        return [findings.duplicates, findings.duplicates_png]

    run_finding(findings.duplicates, findings.manifest(findings.duplicates), inputs, force,
                compute=compute, what="duplicates")
    return read_duplicates(findings.duplicates)


def write_duplicates_picture(table: pd.DataFrame, frame: pd.DataFrame, paths: list[Path],
                             groups: int, *, path: Path) -> None:
    """The first `groups` duplicate groups, a row each of at most GROUP_IMAGES images, the
    row's title saying how many more the group holds: bounded however large the groups."""
    where = {(p, i): file for p, i, file in zip(frame["part"], frame["id"], paths)}
    rows, titles = [], []
    for number, members in list(table.groupby("group", sort=False))[:groups]:
        rows.append([(where[(r.part, r.id)], f"{r.part} {r.id}\n{r.label}".strip())
                     for r in members.head(GROUP_IMAGES).itertuples()])
        more = len(members) - GROUP_IMAGES
        titles.append(f"group {number}\n{len(members)} images"
                      + (f"\n+{more} more" if more > 0 else ""))
    found = table["group"].nunique()
    title = "duplicate groups, one row each"
    if found > len(rows):
        title += f" (the first {len(rows)} of {found})"
    plots.write_image_rows(rows, path, title, row_titles=titles)
