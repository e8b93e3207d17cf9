"""The sequences a competitor runs every day, end to end on tiny data: every artefact knows what
made it, and nothing stale or partial is reused silently (issue: provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.__main__ import main as cli
from pipeline.base.config import TTAConfig, load_config, training_settings, without_added_off
from pipeline.base.fingerprints import fingerprint
from pipeline.experiments.freshness import freshness
from pipeline.experiments.manifests import write_manifest
from tests.conftest import make_competition, write_image

FAST = ["augment.image_size=16", "train.batch_size=4", "train.epochs=1", "train.workers=0"]
LABELS = [c for c in ("cat", "dog", "fox") for _ in range(6)]


class Competition:
    """A tiny competition in tmp_path and the CLI calls a competitor makes on it."""

    def __init__(self, tmp_path: Path, name: str = "tiny", labels=None, **extra):
        self.tmp = tmp_path
        self.root = tmp_path / name
        self.name = name
        self.data = str(make_competition(self.root, labels or LABELS, name=name, **extra))
        self.paths = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                      f"submissions_dir={tmp_path / 'subs'}", f"audit_dir={tmp_path / 'audit'}",
                      f"reports_dir={tmp_path / 'reports'}"]

    def __call__(self, verb: str, *args: str, model: str | None = "resnet20",
                 fast: bool = True) -> int:
        overrides = [a for a in args if "=" in a and not a.startswith("--")]
        flags = [a for a in args if a not in overrides]  # --name x, --folds 0: last wins below
        argv = [verb, "--data", self.data, *(["--model", model] if model and verb not in
                                              ("folds", "ensemble", "runs", "check",
                                              "report", "bundle") else []),
                *flags, *self.paths, "folds.n_splits=2", *(FAST if fast else []), *overrides]
        return cli(argv)

    def config(self, *overrides: str, name: str | None = None):
        return load_config(self.data, "resnet20", [*self.paths, "folds.n_splits=2", *FAST,
                                                   *overrides], name=name)

    def run_dir(self, experiment: str) -> Path:
        return self.tmp / "runs" / self.name / experiment

    def submissions(self) -> list[Path]:
        return sorted((self.tmp / "subs" / self.name).glob("*.csv"))

    def set_label(self, image_id: str, label: str) -> None:
        table = pd.read_csv(self.root / "train.csv", dtype=str)
        table.loc[table["id"] == image_id, "label"] = label
        table.to_csv(self.root / "train.csv", index=False)

    def add_test_image(self, image_id: str) -> None:
        write_image(self.root / "test" / image_id, seed=777)
        for name in ("test.csv", "sample_submission.csv"):
            table = pd.read_csv(self.root / name, dtype=str)
            row = {c: (image_id if c == "id" else table[c].iloc[0]) for c in table.columns}
            pd.concat([table, pd.DataFrame([row])]).to_csv(self.root / name, index=False)


@pytest.fixture
def comp(tmp_path) -> Competition:
    return Competition(tmp_path)


def train_predict(comp: Competition, *args: str) -> None:
    assert comp("train", *args) == 0
    assert comp("predict", *args) == 0


def test_two_competitions_with_one_model_live_side_by_side(tmp_path):
    first = Competition(tmp_path, "first")
    second = Competition(tmp_path, "second", labels=[c for c in ("0", "1") for _ in range(8)],
                         metric="macro_f1")
    for comp in (first, second):
        assert comp("folds") == 0
    # the same MODEL on both: neither sees the other's folds, runs or submissions
    train_predict(first)
    train_predict(second)
    assert (tmp_path / "folds" / "first.csv").is_file() and (tmp_path / "folds" / "second.csv").is_file()
    assert first("ensemble", "ensemble.name=sub") == 0
    assert second("ensemble", "ensemble.name=sub") == 0
    one = pd.read_csv(tmp_path / "subs" / "first" / "sub.csv", dtype=str)
    two = pd.read_csv(tmp_path / "subs" / "second" / "sub.csv", dtype=str)
    assert set(one["label"]) <= {"cat", "dog", "fox"} and set(two["label"]) <= {"0", "1"}
    assert len(list((tmp_path / "runs" / "first").glob("*/fold0/best.pt"))) == 1
    assert len(list((tmp_path / "runs" / "second").glob("*/fold0/best.pt"))) == 1


def test_new_settings_are_a_new_experiment_and_the_old_one_stays(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    first = comp.config().run_name
    best = comp.run_dir(first) / "fold0" / "best.pt"
    stamp = best.stat().st_mtime_ns
    train_predict(comp, "train.lr=0.01")
    second = comp.config("train.lr=0.01").run_name
    assert second != first and second.endswith("lr0.01")
    assert best.stat().st_mtime_ns == stamp  # the first experiment untouched
    # settings that change no result (workers, device) never rename or retrain
    assert comp.config("train.workers=1", "train.device=cpu").run_name == first
    capsys.readouterr()
    assert comp("train", "train.workers=1") == 0
    assert "fold 0: current" in capsys.readouterr().out
    # both are current experiments: the default ensemble takes both
    assert comp("ensemble", "ensemble.name=both") == 0
    manifest = json.loads((comp.tmp / "subs" / "tiny" / "both.manifest.json").read_text())
    assert sorted(manifest["details"]["members"]) == sorted([first, second])


def test_a_changed_setting_under_one_name_is_refused_then_forced(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp, "--name", "mine")
    assert comp("refit", "--name", "mine") == 0
    capsys.readouterr()
    assert comp("train", "--name", "mine", "train.lr=0.3") == 1
    err = capsys.readouterr().err
    assert "train.lr: 0.003 -> 0.3" in err and "FORCE=1" in err and "NAME=" in err
    assert comp("train", "--name", "mine", "--force", "train.lr=0.3") == 0
    assert comp("predict", "--name", "mine", "train.lr=0.3") == 0
    # the refit was made with the old settings: the ensemble refuses it, naming the remedy
    capsys.readouterr()
    assert comp("ensemble", "--models", "mine", "train.lr=0.3") == 1
    err = capsys.readouterr().err
    assert "refit is stale" in err and "ensemble.refit_weight=0" in err
    assert comp("ensemble", "--models", "mine", "ensemble.refit_weight=0") == 0


def test_a_fixed_label_reaches_the_oof_file(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    comp.set_label("0000", "fox")  # was cat
    capsys.readouterr()
    assert comp("train") == 1  # the folds no longer fit train.csv
    assert f"make folds DATA={comp.data}" in capsys.readouterr().err  # as the user named it
    assert comp("folds") == 0
    assert "splitting again" in capsys.readouterr().out
    assert comp("train") == 1  # trained on the old labels: refused, not reused
    assert "FORCE=1" in capsys.readouterr().err
    assert comp("train", "--force") == 0
    run = comp.run_dir(comp.config().run_name)
    oof = pd.concat([pd.read_csv(run / f"fold{k}" / "oof.csv", dtype=str) for k in (0, 1)])
    assert oof.set_index("id").loc["0000", "label"] == "fox"


def test_added_rows_and_another_fold_count_make_every_fold_stale(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    assert comp("folds", "folds.n_splits=3") == 0
    capsys.readouterr()
    assert comp("predict", "folds.n_splits=3") == 1  # nothing current to predict from
    assert "make train" in capsys.readouterr().err
    assert comp("ensemble", "folds.n_splits=3") == 1
    assert "fold 0 is stale" in capsys.readouterr().err


def test_a_new_test_image_is_predicted_and_submitted(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    assert comp("ensemble", "ensemble.name=before") == 0
    comp.add_test_image("t999")
    capsys.readouterr()
    assert comp("ensemble", "ensemble.name=after") == 1  # predictions made on another test set
    assert "the test set" in capsys.readouterr().err
    assert comp("runs") == 0
    assert "before (stale)" in capsys.readouterr().out
    assert comp("predict") == 0
    assert "predicting again" in capsys.readouterr().out
    assert comp("ensemble", "ensemble.name=after") == 0
    after = pd.read_csv(comp.tmp / "subs" / "tiny" / "after.csv", dtype=str)
    assert "t999" in set(after["id"])


def test_a_replaced_test_image_is_predicted_again(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    write_image(comp.root / "test" / "t001", seed=4242)  # same id, new content
    capsys.readouterr()
    assert comp("predict") == 0
    assert capsys.readouterr().out.count("predicting again") == 2  # both folds


def test_force_with_a_wrong_setting_deletes_nothing(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp, "--name", "keep")
    files = sorted(p.name for p in comp.run_dir("keep").glob("fold0/*"))
    assert comp("train", "--name", "keep", "--force", "model.name=resnet2") == 1
    assert "resnet2" in capsys.readouterr().err
    assert sorted(p.name for p in comp.run_dir("keep").glob("fold0/*")) == files
    assert comp("ensemble", "--models", "keep") == 0


def test_no_partial_ensemble_unless_asked(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp, "--folds", "0")
    capsys.readouterr()
    assert comp("ensemble") == 1
    assert "PARTIAL=1" in capsys.readouterr().err
    assert comp("ensemble", "--partial") == 0
    out = capsys.readouterr().out
    assert "PARTIAL" in out
    (submission,) = comp.submissions()
    assert "_partial_cv" in submission.name
    assert "PARTIAL" in submission.with_suffix(".md").read_text()


def test_seeds_are_runs_of_their_own_averaged_as_one_member(comp, capsys):
    assert comp("folds") == 0
    assert comp("train", "--seeds", "1,2") == 0
    assert comp("predict", "--seeds", "1,2") == 0
    names = sorted(p.name for p in (comp.tmp / "runs" / "tiny").iterdir()
                   if p.is_dir() and not p.name.startswith("."))
    assert len(names) == 2 and all(n.endswith(("seed1", "seed2")) for n in names)
    assert comp("ensemble", "ensemble.name=avg") == 0
    out = capsys.readouterr().out
    assert " + " in out  # one member: the two seeds averaged
    assert comp("ensemble", "ensemble.name=sep", "ensemble.seeds=separate") == 0


def test_a_changed_class_list_after_training_is_refused(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    config = Path(comp.data)
    config.write_text(config.read_text().replace("- fox", "- fox\n- owl"))
    capsys.readouterr()
    assert comp("train") == 1
    assert "class list" in capsys.readouterr().err


def test_undefined_fold_metric_still_writes_a_best_checkpoint(tmp_path, capsys):
    # roc_auc on a fold that holds one class only: the best epoch comes from the validation loss
    comp = Competition(tmp_path, labels=["a"] * 6 + ["b"] * 2, metric="roc_auc")
    assert comp("folds", "folds.n_splits=4") == 0
    assert cli(["train", "--data", comp.data, "--model", "resnet20", "--folds", "0,1,2,3",
                *comp.paths, "folds.n_splits=4", *FAST]) == 0
    run = comp.run_dir(comp.config("folds.n_splits=4").run_name)
    assert all((run / f"fold{k}" / "best.pt").is_file() for k in range(4))


def test_an_image_that_turns_bad_after_folds_has_a_remedy_that_works(comp, capsys):
    assert comp("folds") == 0
    (comp.root / "train" / "0003.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert comp("train") == 1
    err = capsys.readouterr().err
    assert "training images" in err and "drop_bad_images=true" in err
    assert comp("folds", "data.drop_bad_images=true") == 0
    assert "1 bad image(s) left out" in capsys.readouterr().out
    assert comp("train", "data.drop_bad_images=true") == 0
    folds = pd.read_csv(comp.tmp / "folds" / "tiny.csv", dtype=str)
    assert "0003" not in set(folds["id"])


def test_resume_only_when_nothing_but_resume_safe_settings_differ(comp, capsys):
    assert comp("folds") == 0
    assert comp("train", "--name", "r", "--folds", "0") == 0
    fold = comp.run_dir("r") / "fold0"
    (fold / "train.manifest.json").unlink()  # as if killed after the last epoch's checkpoint
    last = torch.load(fold / "last.pt", weights_only=True)
    assert last["inputs"]["settings"]
    capsys.readouterr()
    assert comp("train", "--name", "r", "--folds", "0", "train.workers=1") == 0  # resumes
    assert (fold / "train.manifest.json").is_file()
    (fold / "train.manifest.json").unlink()
    assert comp("train", "--name", "r", "--folds", "0", "train.weight_decay=0.1") == 1
    assert "weight_decay" in capsys.readouterr().err


def test_freshness_names_what_changed_and_modified_outputs(tmp_path):
    out = tmp_path / "a.csv"
    out.write_text("x\n1\n")
    path = tmp_path / "stage.manifest.json"
    write_manifest(path, "stage", {"settings": fingerprint({"lr": 1})}, [out],
                   details={"settings": {"train": {"lr": 1}}})
    assert freshness(path, {"settings": fingerprint({"lr": 1})}).current
    stale = freshness(path, {"settings": fingerprint({"lr": 2})}, {"settings": {"train": {"lr": 2}}})
    assert stale.state == "stale" and "train.lr: 1 -> 2" in stale.why()
    out.write_text("x\n2\n")
    assert "a.csv was modified" in freshness(path, {"settings": fingerprint({"lr": 1})}).why()
    assert freshness(tmp_path / "none.json", {}).state == "missing"


def test_runs_table_shows_every_experiment_and_status(comp, capsys):
    assert comp("folds") == 0
    train_predict(comp)
    assert comp("train", "--folds", "0", "train.lr=0.01") == 0
    assert comp("ensemble", "--models", comp.config().run_name) == 0
    capsys.readouterr()
    assert comp("runs") == 0
    out = capsys.readouterr().out
    assert "complete" in out and "partial (1 of 2 folds)" in out
    board = pd.read_csv(comp.tmp / "runs" / "tiny" / "leaderboard.csv")
    assert len(board) == 2 and (comp.tmp / "runs" / "tiny" / "leaderboard.png").is_file()
    assert comp("status") == 0
    assert "settings=" in capsys.readouterr().out


def test_tta_chosen_at_predict_time_is_what_the_ensemble_takes(comp, capsys):
    assert comp("folds") == 0
    assert comp("train") == 0
    assert comp("predict", "tta.views=hflip") == 0  # no retraining: TTA is a predict setting
    assert comp("ensemble", "ensemble.name=flipped") == 0
    manifest = json.loads((comp.tmp / "subs" / "tiny" / "flipped.manifest.json").read_text())
    (experiment,) = manifest["details"]["members"]
    assert manifest["details"]["tta"][experiment]["views"] == "hflip"
    assert comp("predict", "--folds", "0") == 0  # fold 0 again without TTA: now they differ
    capsys.readouterr()
    assert comp("ensemble", "ensemble.name=mixed") == 1
    assert "different TTA settings" in capsys.readouterr().err


def test_settings_added_since_keep_earlier_runs_current():
    """A setting added to the schema at its off value (augment.sizes: {}, tta.image_size: None)
    is no part of a run's fingerprints: the default experiment's are what they were before
    those settings existed (commit 6224827), so no run made before them is refused as stale.
    A new setting changes these values only when it changes what a run produces."""
    config = load_config("digits", "resnet18", [])
    settings = training_settings(config.to_dict())
    settings["model"]["stem"] = "imagenet"  # as training_inputs fingerprints the stem built
    assert fingerprint(settings) == "03c7e893856a41c3"
    assert fingerprint(without_added_off("tta", TTAConfig().model_dump())) == "937845296e8bf240"
