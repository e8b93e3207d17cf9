"""`make cache`: decode, crop and shrink every image of a competition once, into the cache.

    python -m pipeline cache --data retina --model resnet18 [--force] [cache.crop_black_border=true]
    make cache MODEL=resnet18 [DATA=retina] [FORCE=1]
    make cache MODEL=resnet18 DATA=retina ARGS="cache.crop_circle=true cache.ben_graham=true"

The cache itself (where entries live, what they hold, how a stale one is never read) is
pipeline/data/imagecache.py; training and prediction build what is missing on their own when
`cache.enabled` is true, so this stage only does it ahead of time and reports the folder.

One step of the stage runner (pipeline/experiments/runner.py): it is current when the
competition's manifest in the folder records these source files (their paths, sizes and
modification times name the entries); a changed or added image makes it build what is missing
(the rest is kept, each entry being current by its name), FORCE=1 empties the folder first. An
entry deleted by hand after the build is not seen here (the manifest lists no entry: checking
35,000 of them by content each time would cost more than the build saves); the readers remake it
on first use, or FORCE=1 does now.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.base.config import DataConfig, load_config
from pipeline.base.fingerprints import fingerprint
from pipeline.base.log import log
from pipeline.base.utils import warn
from pipeline.data.imagecache import (
    BuildReport,
    CachedReader,
    build_cache,
    cache_reader,
)
from pipeline.data.tables import (
    load_test_ids,
    load_train_table,
    test_image_paths,
    train_image_paths,
)
from pipeline.experiments.freshness import read_folds_unchecked
from pipeline.experiments.layout import Layout
from pipeline.experiments.runner import Step, run_step, show_table, stage_lock
from pipeline.experiments.state import load_experiment


def competition_images(data: DataConfig, layout: Layout) -> list[Path]:
    """Every image a run reads: the labelled rows (those of the fold file when it exists, which
    leaves out images dropped as bad) and the test set."""
    if layout.folds_csv.is_file():
        ids = read_folds_unchecked(data, layout)["id"].tolist()
    else:
        ids = load_train_table(data)["id"].tolist()
    return train_image_paths(data, ids) + test_image_paths(data, load_test_ids(data))


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*/*") if p.is_file()) / 2**20


def table_row(competition: str, report: BuildReport) -> dict:
    return {"data": competition, "images": report.images, "already cached": report.present,
            "built": report.built, "seconds": f"{report.seconds:.1f}",
            "MB": f"{folder_megabytes(report.folder):.1f}", "folder": str(report.folder)}


def other_folders(reader: CachedReader) -> list[Path]:
    """Cache folders of other settings (older configs): candidates for deletion."""
    parent = reader.folder.parent
    return sorted(p for p in parent.iterdir()
                  if p.is_dir() and p != reader.folder and not p.name.startswith("."))


def cache_step(competition: str, reader: CachedReader, paths: list[Path]) -> Step:
    """Build the missing entries of `paths` in the reader's folder, recorded per competition."""
    return Step(
        "cache", reader.manifest(competition),
        {"settings": fingerprint(reader.preprocess.settings(reader.fmt)),
         "images": reader.sources_fingerprint(paths)},
        {"images": len(set(paths))}, lambda: [reader.settings_file],
        lambda: build_cache(reader, paths, desc=f"cache {competition}"),
        current=f"{reader.folder}: every image of {competition} is cached (FORCE=1 builds again)",
        redo=f"{reader.folder}: {{why}}: caching what is missing", clear=reader.folder,
        recorded=lambda report: {"built": report.built, "seconds": report.seconds})


# the command-line flags of its verb (pipeline/__main__.py FLAG_SPECS)
FLAGS = ("data", "model", "force", "overrides")


def main(args) -> None:
    config = (load_experiment(args.data, args.model, args.overrides) if args.model
              else load_config(args.data, None, args.overrides))
    reader = cache_reader(config.cache, config.augment, config.data.max_image_pixels)
    paths = competition_images(config.data, Layout.of(config))
    with stage_lock(reader.lock, reader.folder, "cached"):
        report = run_step(cache_step(config.data.name, reader, paths), args.force)
    if report is not None:
        show_table([table_row(config.data.name, report)])
        log.info("settings: " + json.dumps(reader.preprocess.settings(reader.fmt)))
    others = other_folders(reader)
    if others:
        log.info(f"{len(others)} other cache folder(s) in {reader.folder.parent} hold other settings: "
                 + ", ".join(p.name for p in others) + " (delete them when no config uses them)")
    if not config.cache.enabled:
        warn(f"cache.enabled is false for {config.run_name}: training will not read this cache; "
             f"set `cache: {{enabled: true}}` in configs/{config.run_name}.yaml or "
             f"ARGS=cache.enabled=true")
