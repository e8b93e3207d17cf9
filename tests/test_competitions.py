"""Issue 11's competitions end to end on tiny data: folds, train, predict, ensemble, submission."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from pipeline.__main__ import main as cli
from tests.conftest import write_image
from tests.test_provenance import Competition


def chain(comp: Competition, *args: str) -> None:
    for verb in ("folds", "train", "predict"):
        assert comp(verb, *args) == 0, verb
    assert comp("ensemble", "ensemble.name=sub", *args) == 0


def test_a_binary_id_target_competition_submits_positive_probabilities(tmp_path):
    comp = Competition(tmp_path, labels=[c for c in ("benign", "malignant") for _ in range(8)],
                       metric="roc_auc")
    pd.DataFrame({"id": [f"t{i:03d}" for i in range(4)], "target": 0}).to_csv(
        comp.root / "sample_submission.csv", index=False)  # id,target: Kaggle's binary format
    chain(comp)
    submission = pd.read_csv(tmp_path / "subs" / "tiny" / "sub.csv", dtype={"id": str})
    assert list(submission.columns) == ["id", "target"]
    assert submission["target"].between(0, 1).all() and submission["target"].nunique() > 1
    manifest = json.loads((tmp_path / "subs" / "tiny" / "sub.manifest.json").read_text())
    assert manifest["details"]["submission_kind"] == "positive_probability"


def test_a_weighted_f1_competition_trains_and_ensembles_with_a_cutoff_judged_out_of_fold(
        tmp_path, capsys):
    comp = Competition(tmp_path, labels=["hem"] * 10 + ["all"] * 6, metric="weighted_f1",
                       classes=["hem", "all"])
    chain(comp)
    out = capsys.readouterr().out
    assert "argmax vs cut-off (nested)" in out
    submission = pd.read_csv(tmp_path / "subs" / "tiny" / "sub.csv", dtype=str)
    assert set(submission["label"]) <= {"hem", "all"}
    manifest = json.loads((tmp_path / "subs" / "tiny" / "sub.manifest.json").read_text())
    assert manifest["details"]["decode"]["kind"] in ("cutoff", "argmax")
    assert f"{manifest['details']['cv']:.4f}" in out


def test_a_class_folder_competition_runs_from_the_folders_alone(tmp_path):
    root = tmp_path / "cells"
    for i in range(12):
        label = ("all", "hem")[i % 2]
        write_image(root / "train" / label / f"cell{i:02d}", seed=i)
    test_ids = [f"t{i}" for i in range(3)]
    for i, image_id in enumerate(test_ids):
        write_image(root / "test" / image_id, seed=100 + i)
    pd.DataFrame({"id": test_ids, "label": "all"}).to_csv(root / "sample_submission.csv",
                                                          index=False)
    config = {"name": "cells", "root": str(root), "train_csv": None, "test_csv": None,
              "image_path": "{label}/{id}.png", "test_image_path": "{id}.png",
              "classes": ["all", "hem"], "metric": "accuracy"}
    (root / "cells.yaml").write_text(yaml.safe_dump(config))
    comp = Competition.__new__(Competition)
    comp.tmp, comp.root, comp.name, comp.data = tmp_path, root, "cells", str(root / "cells.yaml")
    comp.paths = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                  f"submissions_dir={tmp_path / 'subs'}", f"audit_dir={tmp_path / 'audit'}",
                  f"reports_dir={tmp_path / 'reports'}"]
    assert not (root / "train.csv").exists()
    chain(comp)
    folds = pd.read_csv(tmp_path / "folds" / "cells.csv", dtype=str)
    assert sorted(folds["id"]) == [f"cell{i:02d}" for i in range(12)]
    assert folds.set_index("id").loc["cell01", "label"] == "hem"
    submission = pd.read_csv(tmp_path / "subs" / "cells" / "sub.csv", dtype=str)
    assert submission["id"].tolist() == test_ids
    assert cli(["check", "--data", comp.data]) == 0
