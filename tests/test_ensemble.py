"""The ensemble stage on synthetic probability files: methods, fitted weights, thresholds, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import cohen_kappa_score

from pipeline import ensemble
from pipeline.__main__ import main as cli
from pipeline.config import load_config
from pipeline.ensemble import (EnsembleError, combine, combine_members, decode_thresholds,
                               ensemble_runs, expected_grade, fit_thresholds, load_member,
                               rank_normalise)
from pipeline.folds import read_folds
from pipeline.metrics import quadratic_weighted_kappa, score

TEST_IDS = [f"t{i:03d}" for i in range(12)]


def write_competition(tmp_path, classes, n_train=60, n_folds=3, name="comp", **extra):
    """A competition (sample submission, solution), its folds.csv; returns (config, overrides)."""
    root = tmp_path / name
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    kind = extra.get("submission", "label")
    if kind == "label":
        sample = pd.DataFrame({"id": TEST_IDS, "label": classes[0]})
    else:
        sample = pd.DataFrame({"id": TEST_IDS, **{c: 0.5 for c in classes}})
    sample.to_csv(root / "sample_submission.csv", index=False)
    solution = rng.choice(classes, len(TEST_IDS))
    pd.DataFrame({"id": TEST_IDS, "label": solution}).to_csv(root / "solution.csv", index=False)
    mapping = {"name": name, "root": str(root), "classes": classes,
               "solution_csv": "solution.csv", **extra}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(mapping))

    labels = [classes[i % len(classes)] for i in range(n_train)]
    folds = pd.DataFrame({"id": [f"{i:04d}" for i in range(n_train)], "label": labels,
                          "fold": rng.permutation(np.arange(n_train) % n_folds)})
    (tmp_path / "folds").mkdir(exist_ok=True)
    folds.to_csv(tmp_path / "folds" / "folds.csv", index=False)
    overrides = [f"runs_dir={tmp_path / 'runs'}", f"folds.dir={tmp_path / 'folds'}",
                 f"submissions_dir={tmp_path / 'submissions'}"]
    return str(root / f"{name}.yaml"), overrides


def config_of(data_path, overrides, *more):
    return load_config(data_path, None, [*overrides, *more])


def member_probs(targets, n_classes, skill, seed):
    """(N, C) probabilities whose true class gets `skill` extra logit (0: pure noise)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(targets), n_classes))
    logits[np.arange(len(targets)), targets] += skill
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def write_run(config, name, oof, test, folds=None, tta_folds=(), refit=None, competition=None):
    """A run folder like train+predict write it: per fold oof(.tta).csv, test_probs, config.yaml."""
    table = read_folds(config)
    classes = config.data.classes
    run = config.run_dir.parent / name
    for k in folds if folds is not None else sorted(table["fold"].unique()):
        fold_dir = run / f"fold{k}"
        fold_dir.mkdir(parents=True)
        rows = np.flatnonzero(table["fold"].to_numpy() == k)[::-1]  # not in folds.csv order
        frame = pd.DataFrame({"id": table["id"].to_numpy()[rows],
                              "label": table["label"].to_numpy()[rows]})
        frame[classes] = oof[rows]
        frame.to_csv(fold_dir / ("oof_tta.csv" if k in tta_folds else "oof.csv"), index=False)
        test_frame = pd.DataFrame({"id": TEST_IDS})
        test_frame[classes] = test(k) if callable(test) else test
        test_frame.to_csv(fold_dir / "test_probs.csv", index=False)
        saved = {"data": {"name": competition or config.data.name}}
        (fold_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    if refit is not None:
        (run / "full").mkdir()
        full = pd.DataFrame({"id": TEST_IDS})
        full[classes] = refit
        full.to_csv(run / "full" / "test_probs.csv", index=False)
    return run


# --------------------------------------------------------------------------------------------
# Combining


@pytest.mark.parametrize("method", ["mean", "median", "trimmed", "rank", "fitted"])
def test_identical_members_equal_each_member(method):
    targets = np.arange(50) % 4
    member = member_probs(targets, 4, skill=1.0, seed=1)
    stack = np.stack([member] * 3)
    result = combine_members(stack, stack, targets, method, "accuracy")
    expected = member if method != "rank" else rank_normalise(member) / rank_normalise(
        member).sum(axis=1, keepdims=True)
    assert np.allclose(result.oof, expected) and np.allclose(result.test, expected)
    if method == "rank":  # per-class ranks are kept: the AUC of each class is the member's
        assert score("roc_auc", targets, result.oof) == pytest.approx(
            score("roc_auc", targets, member), abs=0.02)


def test_trimmed_mean_drops_the_outlier():
    low, high = np.array([[0.8, 0.2]]), np.array([[0.0, 1.0]])
    stack = np.stack([low, low, low, low, high])
    assert np.allclose(combine(stack, "trimmed"), low)
    assert np.allclose(combine(stack, "median"), low)


def test_fitted_weights_favour_the_good_member_and_never_score_worse():
    targets = np.arange(300) % 3
    good = member_probs(targets, 3, skill=2.5, seed=1)
    noisy = member_probs(targets, 3, skill=0.2, seed=2)
    stack = np.stack([good, noisy])
    for metric in ("accuracy", "log_loss"):
        fitted = combine_members(stack, stack, targets, "fitted", metric)
        equal = combine_members(stack, stack, targets, "mean", metric)
        assert fitted.weights[0] > 0.8 and fitted.weights.sum() == pytest.approx(1.0)
        assert (fitted.weights >= 0).all()
        fitted_score, equal_score = (score(metric, targets, r.oof) for r in (fitted, equal))
        assert fitted_score >= equal_score if metric == "accuracy" else fitted_score <= equal_score


def test_fitted_weights_fall_back_to_equal_when_worse(monkeypatch):
    targets = np.arange(300) % 3
    stack = np.stack([member_probs(targets, 3, 2.5, 1), member_probs(targets, 3, 0.0, 2)])
    monkeypatch.setattr(ensemble, "fit_weights", lambda oof, t: np.array([0.0, 1.0]))
    result = combine_members(stack, stack, targets, "fitted", "accuracy")
    assert np.allclose(result.weights, [0.5, 0.5])
    assert "worse than equal weights" in result.notes[0]


# --------------------------------------------------------------------------------------------
# Ordinal thresholds


def biased_ordinal(n=600, n_classes=5, seed=0):
    """Probabilities peaked about one grade below the truth: argmax under-grades."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n_classes, n)
    centre = targets - 0.8 + rng.normal(0, 0.5, n)
    grid = np.arange(n_classes)
    logits = -((grid[None, :] - centre[:, None]) ** 2) / 0.8
    probs = np.exp(logits)
    return targets, probs / probs.sum(axis=1, keepdims=True)


def test_fast_qwk_equals_sklearn():
    rng = np.random.default_rng(3)
    targets, labels = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert quadratic_weighted_kappa(targets, labels, 5) == pytest.approx(
        cohen_kappa_score(targets, labels, weights="quadratic"))


def test_thresholds_beat_biased_argmax():
    targets, probs = biased_ordinal()
    decoded = decode_thresholds(probs, probs[:100], targets)
    assert decoded.used and decoded.qwk_thresholds >= decoded.qwk_argmax + 0.02
    assert np.all(np.diff(decoded.thresholds) >= 0)
    assert decoded.test_labels.shape == (100,)
    start = np.arange(4) + 0.5
    fitted = fit_thresholds(expected_grade(probs), targets, 5)
    assert not np.allclose(fitted, start)


# --------------------------------------------------------------------------------------------
# Reading runs


def test_member_reads_tta_first_and_joins_the_refit(tmp_path):
    data_path, overrides = write_competition(tmp_path, ["0", "1", "2"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    oof = member_probs(targets, 3, 1.0, seed=4)
    fold_tests = {k: member_probs(np.zeros(12, int), 3, 0.0, seed=10 + k) for k in range(3)}
    refit = member_probs(np.zeros(12, int), 3, 0.0, seed=20)
    run = write_run(config, "m", oof, lambda k: fold_tests[k], tta_folds=(0, 2), refit=refit)

    member = load_member(run, read_folds(config), config.data.classes, refit_weight=0.5)
    assert member.oof_source == "oof (fold 1), oof_tta (fold 0,2)"
    assert member.oof_ids == read_folds(config)["id"].tolist()
    assert np.allclose(member.oof, oof)  # back in folds.csv order
    folds_mean = np.mean(list(fold_tests.values()), axis=0)
    assert np.allclose(member.test, (folds_mean + 0.5 * refit) / 1.5)
    assert member.refit and member.n_folds == 3


def test_members_must_cover_the_same_oof_ids(tmp_path):
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    test = np.full((12, 2), 0.5)
    write_run(config, "full3", member_probs(targets, 2, 1.0, 1), test)
    write_run(config, "only0", member_probs(targets, 2, 1.0, 2), test, folds=[0])
    with pytest.raises(EnsembleError, match=r"only0 misses 40 of 60 OOF ids"):
        ensemble_runs(config, ["full3", "only0"])


def test_oof_from_another_split_is_refused(tmp_path):
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    run = write_run(config, "m", member_probs(targets, 2, 1.0, 1), np.full((12, 2), 0.5))
    folds = read_folds(config)
    folds.assign(fold=np.roll(folds["fold"].to_numpy(), 1)).drop(columns="target").to_csv(
        config.folds_csv, index=False)
    with pytest.raises(EnsembleError, match=r"folds.csv was re-split after this model was trained"):
        load_member(run, read_folds(config), config.data.classes, 1.0)


# --------------------------------------------------------------------------------------------
# The stage, end to end


def test_cli_writes_submission_and_report(tmp_path, capsys):
    data_path, overrides = write_competition(tmp_path, ["cat", "dog", "fox"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    solution = pd.read_csv(tmp_path / "comp" / "solution.csv", dtype=str)["label"]
    test_truth = solution.map({"cat": 0, "dog": 1, "fox": 2}).to_numpy()
    write_run(config, "resnet18", member_probs(targets, 3, 2.0, 1),
              lambda k: member_probs(test_truth, 3, 2.0, 30 + k), tta_folds=(0, 1, 2))
    write_run(config, "timm-resnet50", member_probs(targets, 3, 1.0, 2),
              lambda k: member_probs(test_truth, 3, 1.0, 40 + k),
              refit=member_probs(test_truth, 3, 1.0, 50))
    write_run(config, "other", member_probs(targets, 3, 1.0, 3), np.full((12, 3), 1 / 3),
              competition="another-competition")  # not ensembled: another competition

    rc = cli(["ensemble", "--data", data_path, *overrides, "ensemble.method=fitted"])
    out = capsys.readouterr().out
    assert rc == 0
    submissions = list((tmp_path / "submissions").glob("*.csv"))
    assert len(submissions) == 1
    name = submissions[0].stem
    assert name.startswith("resnet18+timm-resnet50_cv")
    submission = pd.read_csv(submissions[0], dtype=str)
    assert submission["id"].tolist() == TEST_IDS
    assert set(submission["label"]) <= {"cat", "dog", "fox"}

    report = (tmp_path / "submissions" / f"{name}.md").read_text()
    cv = name.split("_cv")[1]
    upload = f'-c comp -f {submissions[0]} -m "resnet18+timm-resnet50 cv={cv}"'
    assert f"kaggle competitions submit {upload}" in report
    assert "oof_tta" in report and "fitted" in report and "other" not in report
    assert "test accuracy vs solution.csv: " in out
    for member in ("resnet18", "timm-resnet50", "ensemble (fitted)"):
        assert member in out and member in report


def test_cli_single_model_name_and_named_submission(tmp_path, capsys):
    data_path, overrides = write_competition(tmp_path, ["0", "1"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    write_run(config, "resnet18", member_probs(targets, 2, 2.0, 1), np.full((12, 2), 0.5))
    cv = score("accuracy", targets, member_probs(targets, 2, 2.0, 1))
    assert cli(["ensemble", "--data", data_path, "--models", "resnet18", *overrides]) == 0
    assert (tmp_path / "submissions" / f"resnet18_cv{cv:.4f}.csv").is_file()
    assert cli(["ensemble", "--data", data_path, *overrides, "ensemble.name=final"]) == 0
    assert (tmp_path / "submissions" / "final.md").is_file()


def test_cli_names_a_missing_run(tmp_path, capsys):
    data_path, overrides = write_competition(tmp_path, ["0", "1"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    write_run(config, "resnet18", member_probs(targets, 2, 2.0, 1), np.full((12, 2), 0.5))
    assert cli(["ensemble", "--data", data_path, "--models", "resnet18,resnet34", *overrides]) == 1
    err = capsys.readouterr().err
    assert "resnet34 has no fold*/test_probs.csv" in err and "['resnet18']" in err


def test_ordinal_thresholds_end_to_end(tmp_path, capsys):
    classes = ["0", "1", "2", "3", "4"]
    data_path, overrides = write_competition(tmp_path, classes, n_train=300, metric="qwk",
                                             ordinal=True)
    config = config_of(data_path, overrides)
    folds = read_folds(config)
    targets, probs = biased_ordinal(n=300, seed=5)
    folds["label"] = [classes[t] for t in targets]
    folds.drop(columns="target").to_csv(config.folds_csv, index=False)
    write_run(config, "m", probs, probs[:12])
    outcome = ensemble_runs(config_of(data_path, overrides, "ensemble.decode=thresholds"), ["m"])
    out = capsys.readouterr().out
    assert "OOF QWK argmax vs thresholds" in out and "ensemble + thresholds" in out
    argmax_qwk = quadratic_weighted_kappa(targets, probs.argmax(1), 5)
    assert outcome.cv_score >= argmax_qwk


def test_thresholds_need_an_ordinal_competition(tmp_path):
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides, "ensemble.decode=thresholds")
    with pytest.raises(EnsembleError, match=r"needs ordinal classes"):
        ensemble_runs(config)


def test_probabilities_submission_from_rank_ensemble(tmp_path, capsys):
    data_path, overrides = write_competition(tmp_path, ["HEM", "ALL"], submission="probabilities",
                                             metric="roc_auc")
    config = config_of(data_path, overrides, "ensemble.method=rank")
    targets = read_folds(config)["target"].to_numpy()
    for seed, name in ((1, "a"), (2, "b")):
        write_run(config, name, member_probs(targets, 2, 1.5, seed),
                  member_probs(np.zeros(12, int), 2, 0.0, seed))
    outcome = ensemble_runs(config)
    frame = pd.read_csv(outcome.submission, dtype={"id": str})
    assert list(frame.columns) == ["id", "HEM", "ALL"]
    assert np.allclose(frame[["HEM", "ALL"]].sum(axis=1), 1.0)
    assert "rank outputs are scores, not probabilities" in capsys.readouterr().out
