"""The winning recipes: a regression head, EMA, mixup/cutmix, accumulation, averaged best epochs,
pseudo-labels; each on tiny data, each checked for what it must do."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.ensembling.decode import apply_thresholds, expected_grade, grade_to_probs
from pipeline.stages.folds import make_folds
from pipeline.training.loop import Trainer
from pipeline.training.losses import SoftTargetLoss, build_mixer
from tests.conftest import experiment_dir, train
from tests.test_provenance import Competition

GRADES = [c for c in ("0", "1", "2") for _ in range(6)]


def ordinal(tmp_path, *extra, name="r"):
    comp = Competition(tmp_path, labels=GRADES, metric="qwk", ordinal=True)
    config = comp.config("train.epochs=2", *extra, name=name)
    make_folds(config)
    return comp, config


def test_a_regression_grade_is_encoded_and_decoded_exactly():
    grades = np.array([0.0, 0.4, 1.6, 2.2, 3.9, 4.0, 5.3, -1.0])
    probs = grade_to_probs(grades, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1)
    np.testing.assert_allclose(expected_grade(probs), np.clip(grades, 0, 4))
    labels = apply_thresholds(expected_grade(probs), np.array([0.5, 1.5, 2.5, 3.5]))
    assert labels.tolist() == [0, 0, 2, 2, 4, 4, 4, 0]


def test_regression_head_writes_grades_and_probabilities(tmp_path):
    _, config = ordinal(tmp_path, "model.head=regression")
    train(config, [0], force=False)
    oof = pd.read_csv(experiment_dir(config) / "fold0" / "oof.csv", dtype={"id": str, "label": str})
    assert list(oof.columns) == ["id", "label", "0", "1", "2", "grade"]
    np.testing.assert_allclose(oof[["0", "1", "2"]].sum(axis=1), 1, atol=1e-9)
    np.testing.assert_allclose(expected_grade(oof[["0", "1", "2"]].to_numpy()), oof["grade"])
    checkpoint = torch.load(experiment_dir(config) / "fold0" / "best.pt", weights_only=True)
    assert checkpoint["model"]["fc.weight"].shape[0] == 1  # one output: the grade


def test_ema_weights_are_the_ones_saved_and_differ_from_the_raw_ones(tmp_path):
    _, config = ordinal(tmp_path, "train.ema=true", "train.ema_decay=0.9", "train.epochs=1")
    train(config, [0], force=False)
    fold = experiment_dir(config) / "fold0"
    best = torch.load(fold / "best.pt", weights_only=True)["model"]
    last = torch.load(fold / "last.pt", weights_only=True)
    key = "fc.weight"
    assert torch.equal(best[key], last["ema"][key])  # best.pt holds the EMA weights
    assert not torch.equal(best[key], last["model"][key])  # last.pt keeps the raw ones


def test_mixup_targets_sum_to_one_and_mix_two_labels():
    config = load_config("digits", "resnet20", ["train.mixup=1.0"])
    mixer = build_mixer(config.train, num_classes=10)
    np.random.seed(0)
    images = torch.rand(8, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mixed, soft = mixer(images.clone(), targets)
    np.testing.assert_allclose(soft.sum(dim=1).numpy(), 1, atol=1e-6)
    assert ((soft > 0).sum(dim=1) == 2).all()  # image i mixes label i and label 7 - i
    assert torch.allclose(soft[0, 0] + soft[0, 7], torch.tensor(1.0))
    assert not torch.equal(mixed, images)


def test_soft_targets_of_one_hot_labels_are_the_weighted_cross_entropy():
    logits = torch.randn(6, 3)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    weight = torch.tensor([0.5, 1.0, 2.0])
    expected = torch.nn.functional.cross_entropy(logits, targets, weight=weight)
    got = SoftTargetLoss(weight)(logits, torch.nn.functional.one_hot(targets, 3).float())
    torch.testing.assert_close(got, expected)


def test_accumulation_and_averaged_best_epochs(tmp_path):
    _, config = ordinal(tmp_path, "train.accumulate=2", "train.average_best=2", "train.epochs=3")
    train(config, [0], force=False)
    fold = experiment_dir(config) / "fold0"
    last = torch.load(fold / "last.pt", weights_only=True)
    # 9 training images, batch 4: 2 micro-batches (drop_last), 1 optimiser step per epoch
    assert last["optimizer_steps"] == 3
    best = torch.load(fold / "best.pt", weights_only=True)
    assert len(best["averaged_epochs"]) == 2


def test_a_killed_run_with_ema_and_mixup_resumes_to_the_same_weights(tmp_path, monkeypatch):
    recipe = ["train.ema=true", "train.ema_decay=0.9", "train.mixup=0.4", "train.epochs=2"]
    _, reference = ordinal(tmp_path / "a", *recipe)
    train(reference, [0], force=False)
    _, resumed = ordinal(tmp_path / "b", *recipe)
    original = Trainer.train_epoch

    def die_at_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", die_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(resumed, [0], force=False)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    train(resumed, [0], force=False)
    for name, key in (("last.pt", "model"), ("last.pt", "ema"), ("best.pt", "model")):
        a = torch.load(experiment_dir(reference) / "fold0" / name, weights_only=True)[key]
        b = torch.load(experiment_dir(resumed) / "fold0" / name, weights_only=True)[key]
        for tensor in a:
            torch.testing.assert_close(a[tensor], b[tensor], rtol=0, atol=0, msg=f"{name} {tensor}")


def test_pseudo_labelled_images_never_reach_a_validation_fold(tmp_path, capsys):
    comp = Competition(tmp_path)
    pseudo = [f"pseudo_dir={tmp_path / 'pseudo'}"]
    assert comp("folds") == 0
    assert comp("train", "--name", "first") == 0 and comp("predict", "--name", "first") == 0
    capsys.readouterr()
    assert comp("pseudo", "--name", "first", "pseudo.mode=soft", *pseudo) == 0
    out = capsys.readouterr().out
    assert out.count("4 pseudo-labelled test images join the training part") == 2  # each fold
    second = comp.run_dir("first-pseudo")
    folds = pd.read_csv(tmp_path / "folds" / "tiny.csv", dtype=str)
    for k in (0, 1):
        oof = pd.read_csv(second / f"fold{k}" / "oof.csv", dtype=str)
        assert oof["id"].tolist() == folds.loc[folds["fold"] == str(k), "id"].tolist()
        assert not any(i.startswith("t") for i in oof["id"])  # no test image was validated on
    (pseudo_set,) = list((tmp_path / "pseudo" / "tiny").iterdir())
    fold0 = pd.read_csv(pseudo_set / "fold0.csv", dtype={"id": str})
    assert fold0["id"].tolist() == ["t000", "t001", "t002", "t003"]
    np.testing.assert_allclose(fold0[["cat", "dog", "fox"]].sum(axis=1), 1, atol=1e-6)
    # fold 0's labels come from fold 0's model alone (it never saw fold 0's labels)
    fold0_test = pd.read_csv(comp.run_dir("first") / "fold0" / "test_probs.csv", dtype={"id": str})
    np.testing.assert_allclose(fold0[["cat", "dog", "fox"]].to_numpy(),
                               fold0_test[["cat", "dog", "fox"]].to_numpy(), atol=1e-6)
    assert "without pseudo-labels" in out and "with " in out


def test_pseudo_set_is_an_input_of_round_two(tmp_path, capsys):
    comp = Competition(tmp_path)
    pseudo = [f"pseudo_dir={tmp_path / 'pseudo'}"]
    assert comp("folds") == 0
    assert comp("train", "--name", "first") == 0 and comp("predict", "--name", "first") == 0
    assert comp("pseudo", "--name", "first", *pseudo) == 0
    second = comp.run_dir("first-pseudo")
    manifest = (second / "fold0" / "train.manifest.json").read_text()
    assert '"pseudo"' in manifest
    assert cli(["train", "--data", comp.data, "--model", "resnet20", "--name", "x", *comp.paths,
                *pseudo, "folds.n_splits=2", "train.pseudo=nonexistent"]) == 1
    assert "no pseudo-label set nonexistent" in capsys.readouterr().err


def test_round_two_joins_round_one_in_the_next_ensemble(tmp_path, capsys):
    """The step after `make pseudo`: `make ensemble` takes both rounds, each current."""
    comp = Competition(tmp_path)
    pseudo = [f"pseudo_dir={tmp_path / 'pseudo'}"]
    assert comp("folds") == 0
    assert comp("train", "--name", "first") == 0 and comp("predict", "--name", "first") == 0
    assert comp("pseudo", "--name", "first", *pseudo) == 0
    capsys.readouterr()
    assert comp("ensemble", "ensemble.name=both", *pseudo) == 0
    manifest = json.loads((tmp_path / "subs" / "tiny" / "both.manifest.json").read_text())
    assert sorted(manifest["details"]["members"]) == ["first", "first-pseudo"]
    assert comp("runs", *pseudo) == 0
    assert "first-pseudo" in capsys.readouterr().out


def test_a_collapsing_run_says_so(tmp_path, capsys):
    """An imbalanced competition under a learning rate far too high predicts one class epoch
    after epoch: training says so, with the remedy, and goes on."""
    comp = Competition(tmp_path, labels=["a"] * 15 + ["b"] * 3)
    assert comp("folds") == 0
    capsys.readouterr()
    assert comp("train", "--folds", "0", "train.epochs=4", "train.optimizer=sgd", "train.lr=50",
                "train.grad_clip=1", "train.warmup_epochs=0") == 0  # clipped SGD: no NaN
    err = capsys.readouterr().err
    assert re.search(r"fold 0: predicts only class [ab] since epoch \d: lower train.lr \(now 50\) "
                     r"or raise train.warmup_epochs \(now 0\), or try train.optimizer=adamw "
                     r"train.lr=0.003 train.weight_decay=0.05",
                     err), err[-1500:]


def test_a_run_that_learns_is_not_called_collapsed(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    capsys.readouterr()
    assert comp("train", "--folds", "0", "train.epochs=3") == 0
    assert "predicts only" not in capsys.readouterr().err


def test_the_both_head_keeps_both_outputs_and_the_ensemble_chooses(tmp_path, capsys):
    comp, config = ordinal(tmp_path, "model.head=both", "train.epochs=2", name="b")
    assert comp("train", "--name", "b", "model.head=both", "train.epochs=2") == 0
    assert comp("predict", "--name", "b", "model.head=both", "train.epochs=2") == 0
    fold = experiment_dir(config) / "fold0"
    oof = pd.read_csv(fold / "oof.csv", dtype={"id": str, "label": str})
    assert list(oof.columns) == ["id", "label", "0", "1", "2", "grade"]
    np.testing.assert_allclose(oof[["0", "1", "2"]].sum(axis=1), 1, atol=1e-6)
    assert oof["grade"].between(0, 2).all()
    assert list(pd.read_csv(fold / "test_probs.csv").columns) == ["id", "0", "1", "2", "grade"]
    checkpoint = torch.load(fold / "best.pt", weights_only=True)
    assert checkpoint["model"]["fc.weight"].shape[0] == 4  # 3 class logits and the grade
    log = pd.read_csv(fold / "log.csv")
    assert {"qwk", "grade_qwk", "selection", "best"} <= set(log)
    capsys.readouterr()
    assert comp("ensemble", "--models", "b", "ensemble.name=both") == 0
    out = capsys.readouterr().out
    assert re.search(r"b submits from its (class probabilities|grade output) \(chosen on the "
                     r"other folds for \d of 2 folds; qwk out of fold: class probabilities "
                     r"\S+, grade output \S+\)", out)
    manifest = json.loads((comp.tmp / "subs" / "tiny" / "both.manifest.json").read_text())
    assert manifest["details"]["views"]["b"] in ("class probabilities", "grade output")


def test_the_view_of_a_fold_is_chosen_on_the_other_folds():
    """View A is right on folds 1 and 2, wrong on fold 0; view B the other way round. Chosen
    on the other folds, fold 0 takes A (and is scored wrong): an honest, not an in-sample,
    choice."""
    from pipeline.base.task import Scorer
    from pipeline.ensembling.combine import choose_views

    targets = np.tile([0, 1, 2], 20)
    row_folds = np.repeat([0, 1, 2], 20)
    right = np.eye(3)[targets] * 0.8 + 0.2 / 3
    wrong = np.eye(3)[(targets + 1) % 3] * 0.8 + 0.2 / 3
    a = np.where((row_folds == 0)[:, None], wrong, right)
    b = np.where((row_folds == 0)[:, None], right, wrong)
    scorer = Scorer(("0", "1", "2"), "accuracy", False, 1)
    choice = choose_views({"A": (a, a[:2]), "B": (b, b[:2])}, targets, row_folds, "argmax",
                          scorer=scorer)
    assert choice.per_fold == ["A", "A", "A"]  # fold 0 alone would have chosen B
    np.testing.assert_array_equal(choice.oof[row_folds == 0], a[row_folds == 0])
    assert (choice.oof.argmax(1) == targets).mean() == pytest.approx(2 / 3)
    assert choice.view == "A" and choice.nested == {"A": pytest.approx(2 / 3),
                                                    "B": pytest.approx(1 / 3)}


def test_a_diverged_run_is_an_error_naming_the_remedy(tmp_path, capsys):
    comp = Competition(tmp_path, labels=["a"] * 15 + ["b"] * 3)
    assert comp("folds") == 0
    capsys.readouterr()
    assert comp("train", "--folds", "0", "train.epochs=1", "train.lr=1e6",
                "train.warmup_epochs=0") == 1
    err = capsys.readouterr().err
    assert "not numbers (NaN or inf)" in err and "Lower train.lr" in err and "Traceback" not in err
