"""The ensemble stage on synthetic probability files: methods, fitted weights, thresholds, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import cohen_kappa_score

from pipeline.__main__ import main as cli
from pipeline.base.config import load_config, save_config
from pipeline.base.metrics import quadratic_weighted_kappa, score
from pipeline.base.task import Scorer
from pipeline.ensembling import combine as combine_module
from pipeline.ensembling.combine import combine, combine_members
from pipeline.ensembling.decode import (
    decode_cutoff,
    decode_thresholds,
    expected_grade,
    fit_thresholds,
)
from pipeline.ensembling.members import (
    EnsembleError,
    Member,
    average_seeds,
    candidate,
    load_member,
)
from pipeline.experiments.freshness import (
    predict_inputs,
    read_test_set,
    refit_plan,
    training_inputs,
)
from pipeline.experiments.layout import Layout
from pipeline.experiments.manifests import write_manifest
from pipeline.stages.ensemble import ensemble_runs
from pipeline.stages.folds import write_folds
from tests.conftest import read_folds_of as read_folds
from tests.conftest import write_image

TEST_IDS = [f"t{i:03d}" for i in range(12)]


def write_competition(tmp_path, classes, n_train=60, n_folds=3, name="comp", labels=None,
                      images=False, **extra):
    """A competition (train.csv, test.csv, sample submission, solution) and its folds, recorded
    with their manifest; returns (config path, overrides). No images unless `images` (tiny
    ones, for the report): the ensemble reads only probability files."""
    root = tmp_path / name
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    kind = extra.get("submission", "label")
    if kind == "label":
        sample = pd.DataFrame({"id": TEST_IDS, "label": classes[0]})
    else:
        sample = pd.DataFrame({"id": TEST_IDS, **{c: 0.5 for c in classes}})
    sample.to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": TEST_IDS}).to_csv(root / "test.csv", index=False)
    solution = rng.choice(classes, len(TEST_IDS))
    pd.DataFrame({"id": TEST_IDS, "label": solution}).to_csv(root / "solution.csv", index=False)
    mapping = {"name": name, "root": str(root), "classes": classes,
               "solution_csv": "solution.csv", **extra}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(mapping))

    labels = labels or [classes[i % len(classes)] for i in range(n_train)]
    folds = pd.DataFrame({"id": [f"{i:04d}" for i in range(n_train)], "label": labels,
                          "fold": rng.permutation(np.arange(n_train) % n_folds)})
    folds[["id", "label"]].to_csv(root / "train.csv", index=False)
    for i, image_id in enumerate(folds["id"] if images else []):
        write_image(root / "train" / image_id, seed=i, size=8)
    overrides = [f"runs_dir={tmp_path / 'runs'}", f"folds.dir={tmp_path / 'folds'}",
                 f"submissions_dir={tmp_path / 'submissions'}", f"audit_dir={tmp_path / 'audit'}",
                 f"reports_dir={tmp_path / 'reports'}"]
    write_folds(config_of(str(root / f"{name}.yaml"), overrides), folds)
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


def write_run(config, name, oof, test, folds=None, tta_folds=(), refit=None):
    """An experiment folder as train + predict (+ refit) write it, manifests included: per fold
    oof(.tta).csv, test_probs.csv, a stand-in best.pt, log.csv and config.yaml."""
    table = read_folds(config)
    classes = config.data.classes
    member = config.model_copy(update={"run_name": name})
    layout = Layout.of(member)
    exp = layout.experiment(name)
    save_config(member, exp.config)
    inputs, details = training_inputs(member, table, layout)
    _, test_fingerprint = read_test_set(member.data)
    for k in folds if folds is not None else sorted(table["fold"].unique()):
        part = exp.fold(k)
        part.dir.mkdir(parents=True)
        rows = np.flatnonzero(table["fold"].to_numpy() == k)[::-1]  # not in folds.csv order
        frame = pd.DataFrame({"id": table["id"].to_numpy()[rows],
                              "label": table["label"].to_numpy()[rows]})
        frame[classes] = oof[rows]
        frame.to_csv(part.oof, index=False)
        if k in tta_folds:
            frame.to_csv(part.oof_tta, index=False)
            part.oof.write_text(frame.assign(**{c: 1 / len(classes) for c in classes})
                                .to_csv(index=False))
        test_frame = pd.DataFrame({"id": TEST_IDS})
        test_frame[classes] = test(k) if callable(test) else test
        test_frame.to_csv(part.test_probs, index=False)
        part.best.write_bytes(f"{name} fold {k}".encode())
        pd.DataFrame({"epoch": [1], config.data.metric: [0.5], "train_loss": [0.8],
                      "valid_loss": [0.7], "lr": [0.1], "seconds": [1.0]}).to_csv(part.log, index=False)
        save_config(member, part.config)
        write_manifest(part.train_manifest, "train", inputs, [part.best, part.oof], details=details)
        valid = table[table["fold"] == k]
        outputs = [part.test_probs] + ([part.oof_tta] if k in tta_folds else [])
        write_manifest(part.predict_manifest, "predict",
                       predict_inputs(part, member.tta, test_fingerprint, valid), outputs)
    if refit is not None:
        full = exp.refit
        full.dir.mkdir()
        frame = pd.DataFrame({"id": TEST_IDS})
        frame[classes] = refit
        frame.to_csv(full.test_probs, index=False)
        full.best.write_bytes(f"{name} full".encode())
        plan = refit_plan(member, table, layout)
        write_manifest(full.train_manifest, "refit", plan.inputs, [full.best], details=plan.details)
        write_manifest(full.predict_manifest, "predict",
                       predict_inputs(full, member.tta, test_fingerprint, None), [full.test_probs])
    return exp.dir


def member_check(config, name, refit_weight=None):
    _, test_fingerprint = read_test_set(config.data)
    return candidate(config.data, Layout.of(config), name, read_folds(config), test_fingerprint=test_fingerprint,
                     refit_weight=refit_weight, partial=False)


def scorer(metric, classes=3, positive=1):
    return Scorer(tuple(str(c) for c in range(classes)), metric, False, positive)


# --------------------------------------------------------------------------------------------
# Combining


@pytest.mark.parametrize("method", ["mean", "median", "trimmed", "rank", "fitted"])
def test_identical_members_equal_each_member(method):
    targets = np.arange(50) % 4
    member = member_probs(targets, 4, skill=1.0, seed=1)
    stack = np.stack([member] * 3)
    result = combine_members(stack, stack, targets, method, scorer=scorer("accuracy"))
    alone = combine_members(stack[:1], stack[:1], targets, method, scorer=scorer("accuracy"))
    expected = member if method != "rank" else alone.oof  # rank: each member's ranks
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
        fitted = combine_members(stack, stack, targets, "fitted", scorer=scorer(metric))
        equal = combine_members(stack, stack, targets, "mean", scorer=scorer(metric))
        assert fitted.weights[0] > 0.8 and fitted.weights.sum() == pytest.approx(1.0)
        assert (fitted.weights >= 0).all()
        fitted_score, equal_score = (score(metric, targets, r.oof) for r in (fitted, equal))
        assert fitted_score >= equal_score if metric == "accuracy" else fitted_score <= equal_score


def test_fitted_weights_fall_back_to_equal_when_worse(monkeypatch):
    targets = np.arange(300) % 3
    stack = np.stack([member_probs(targets, 3, 2.5, 1), member_probs(targets, 3, 0.0, 2)])
    monkeypatch.setattr(combine_module, "fit_weights", lambda oof, t: np.array([0.0, 1.0]))
    result = combine_members(stack, stack, targets, "fitted", scorer=scorer("accuracy"))
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
    assert decoded.used and decoded.score_in_sample >= decoded.score_argmax + 0.02
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
    write_run(config, "m", oof, lambda k: fold_tests[k], tta_folds=(0, 2), refit=refit)

    check = member_check(config, "m", refit_weight=0.5)
    assert check.problems == [] and check.refit and check.folds == [0, 1, 2]
    member = load_member(check, read_folds(config), config.data.classes)
    assert member.oof_source == "oof (fold 1), oof_tta (fold 0,2)"
    assert member.oof_ids == read_folds(config)["id"].tolist()
    assert np.allclose(member.oof, oof)  # back in folds.csv order, TTA files where present
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
    with pytest.raises(EnsembleError, match=r"only0: fold\(s\) \[1, 2\] of the fold file"):
        ensemble_runs(config, ["full3", "only0"])
    outcome = ensemble_runs(config, ["full3", "only0"], partial=True)
    assert "_partial_cv" in outcome.submission.name  # scored over fold 0's 20 rows only
    assert "the CV covers 20 of 60 labelled rows" in outcome.report.read_text()


def test_oof_from_another_split_is_refused(tmp_path):
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    write_run(config, "m", member_probs(targets, 2, 1.0, 1), np.full((12, 2), 0.5))
    folds = read_folds(config)
    write_folds(config, folds.assign(fold=np.roll(folds["fold"].to_numpy(), 1)))
    with pytest.raises(EnsembleError, match=r"fold 0 is stale \(the fold assignment"):
        ensemble_runs(config, ["m"])


def test_a_hand_edited_probability_file_is_refused(tmp_path):
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    run = write_run(config, "m", member_probs(targets, 2, 1.0, 1), np.full((12, 2), 0.5))
    (run / "fold1" / "test_probs.csv").write_text("id,a,b\n")
    with pytest.raises(EnsembleError, match=r"test_probs.csv was modified"):
        ensemble_runs(config, ["m"])


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
    other = config_of(*write_competition(tmp_path / "other", ["cat", "dog", "fox"], name="another"))
    write_run(other, "other", member_probs(targets, 3, 1.0, 3), np.full((12, 3), 1 / 3))

    rc = cli(["ensemble", "--data", data_path, *overrides, "ensemble.method=fitted"])
    out = capsys.readouterr().out
    assert rc == 0
    submissions = list((tmp_path / "submissions" / "comp").glob("*.csv"))
    assert len(submissions) == 1
    name = submissions[0].stem
    assert name.startswith("resnet18+timm-resnet50_cv")
    submission = pd.read_csv(submissions[0], dtype=str)
    assert submission["id"].tolist() == TEST_IDS
    assert set(submission["label"]) <= {"cat", "dog", "fox"}

    report = (tmp_path / "submissions" / "comp" / f"{name}.md").read_text()
    assert f"make submit NAME={name} DATA={data_path}" in report
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
    assert (tmp_path / "submissions" / "comp" / f"resnet18_cv{cv:.4f}.csv").is_file()
    assert cli(["ensemble", "--data", data_path, *overrides, "ensemble.name=final"]) == 0
    assert (tmp_path / "submissions" / "comp" / "final.md").is_file()
    assert (tmp_path / "submissions" / "comp" / "final.manifest.json").is_file()


def test_cli_names_a_missing_run(tmp_path, capsys):
    data_path, overrides = write_competition(tmp_path, ["0", "1"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    write_run(config, "resnet18", member_probs(targets, 2, 2.0, 1), np.full((12, 2), 0.5))
    assert cli(["ensemble", "--data", data_path, "--models", "resnet18,resnet34", *overrides]) == 1
    err = capsys.readouterr().err
    assert "no experiment resnet34 of comp" in err and "['resnet18']" in err


def test_ordinal_thresholds_end_to_end(tmp_path, capsys):
    classes = ["0", "1", "2", "3", "4"]
    targets, probs = biased_ordinal(n=300, seed=5)
    data_path, overrides = write_competition(tmp_path, classes, n_train=300, metric="qwk",
                                             ordinal=True, labels=[classes[t] for t in targets])
    config = config_of(data_path, overrides)
    write_run(config, "m", probs, probs[:12])
    outcome = ensemble_runs(config_of(data_path, overrides, "ensemble.decode=thresholds"), ["m"],
                            overrides=["ensemble.decode=thresholds"])
    out = capsys.readouterr().out
    assert "argmax vs thresholds (nested)" in out and "ensemble + thresholds, out of fold" in out
    assert "ensemble + thresholds, in sample" in out
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


def test_nested_scores_are_below_in_sample_where_thresholds_overfit():
    """Few rows, many classes, no signal: thresholds fitted on the rows they score look useful;
    fitted on the other folds they do not. The honest figure is the nested one."""
    rng = np.random.default_rng(3)
    n, classes = 40, 5
    targets = rng.integers(0, classes, n)
    probs = rng.dirichlet(np.ones(classes), n)
    row_folds = np.arange(n) % 4
    decoded = decode_thresholds(probs, probs[:5], targets, row_folds)
    assert decoded.score_in_sample > decoded.score_nested + 0.1
    assert decoded.score_in_sample >= decoded.score_argmax


def test_fitted_weights_are_scored_out_of_fold():
    targets = np.arange(60) % 3
    good, noise = member_probs(targets, 3, 2.0, 1), member_probs(targets, 3, 0.0, 2)
    stack = np.stack([good, noise])
    row_folds = np.arange(60) % 3
    combined = combine_members(stack, stack[:, :10], targets, "fitted", scorer=scorer("log_loss"), row_folds=row_folds)
    assert combined.weights[0] > combined.weights[1]
    in_sample = score("log_loss", targets, combined.oof)
    nested = score("log_loss", targets, combined.oof_nested)
    assert nested > in_sample  # log-loss: the honest figure is the worse one
    assert not np.allclose(combined.oof, combined.oof_nested)


def test_binary_f1_cutoff_is_fitted_out_of_fold():
    rng = np.random.default_rng(0)
    targets = (rng.random(400) < 0.2).astype(int)  # rare positives
    logit = rng.normal(size=400) + 1.5 * targets - 1.0  # under-confident: 0.5 is a poor cut
    positive = 1 / (1 + np.exp(-logit))
    probs = np.stack([1 - positive, positive], axis=1)
    decoded = decode_cutoff(probs, probs[:7], targets, "binary_f1", positive=1, row_folds=np.arange(400) % 5)
    assert decoded.used and decoded.params[0] < 0.5
    assert decoded.score_nested > decoded.score_argmax
    assert decoded.score_in_sample >= decoded.score_nested
    assert decoded.test_labels.shape == (7,)


def test_a_cutoff_with_one_fold_is_judged_in_sample_instead_of_crashing():
    """PARTIAL=1 with one trained fold of a binary F1 competition: nothing to nest in."""
    rng = np.random.default_rng(1)
    targets = (rng.random(200) < 0.3).astype(int)
    positive = 1 / (1 + np.exp(-(rng.normal(size=200) + 2 * targets - 1)))
    probs = np.stack([1 - positive, positive], axis=1)
    decoded = decode_cutoff(probs, probs[:3], targets, "binary_f1", positive=1, row_folds=np.zeros(200, int))
    assert decoded.score_nested == decoded.score_in_sample
    assert decoded.test_labels.shape == (3,)


def test_binary_f1_competition_submits_cutoff_labels_with_an_honest_name(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = ["hem" if rng.random() < 0.8 else "all" for _ in range(120)]
    data_path, overrides = write_competition(tmp_path, ["hem", "all"], n_train=120,
                                             metric="binary_f1", labels=labels,
                                             positive_class="all")
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    logit = rng.normal(size=120) + 1.5 * targets - 1.0
    positive = 1 / (1 + np.exp(-logit))
    probs = np.stack([1 - positive, positive], axis=1)
    write_run(config, "m", probs, probs[:12])
    outcome = ensemble_runs(config, None)
    out = capsys.readouterr().out
    assert "argmax vs cut-off (nested)" in out  # judged out of fold, used only if it helps
    manifest = yaml.safe_load(outcome.submission.with_suffix(".manifest.json").read_text())
    assert f"_cv{manifest['details']['cv']:.4f}" in outcome.submission.name
    assert manifest["details"]["decode"]["kind"] in ("cutoff", "argmax")


def test_a_submission_whose_refit_is_gone_is_stale_not_a_traceback(tmp_path, capsys):
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    run = write_run(config, "m", member_probs(targets, 2, 1.0, 1), np.full((12, 2), 0.5),
                    refit=np.full((12, 2), 0.5))
    assert cli(["ensemble", "--data", data_path, *overrides, "ensemble.name=sub"]) == 0
    shutil.rmtree(run / "full")  # the refit the submission was made with
    capsys.readouterr()
    assert cli(["runs", "--data", data_path, *overrides]) == 0
    assert "sub (stale)" in capsys.readouterr().out
    assert cli(["bundle", "--data", data_path, *overrides, "--name", "sub"]) == 1
    err = capsys.readouterr().err
    assert "its refit, which this submission used, is missing or stale" in err
    assert "Traceback" not in err


def test_members_keep_their_own_metric_when_the_ensemble_scores_by_another(tmp_path, capsys):
    """Only where a saved experiment's files are comes from the command; its result-changing
    data settings stay its own (a moved data folder is the same experiment)."""
    data_path, overrides = write_competition(tmp_path, ["a", "b"])
    config = config_of(data_path, overrides)
    targets = read_folds(config)["target"].to_numpy()
    write_run(config, "m", member_probs(targets, 2, 1.0, 1), np.full((12, 2), 0.5))
    outcome = ensemble_runs(config_of(data_path, overrides, "data.metric=macro_f1"), ["m"])
    assert "CV macro_f1, out of fold" in outcome.report.read_text()


def seed_member(name, ids, oof, test_ids, test):
    return Member(name=name, oof_ids=list(ids), oof=oof, test_ids=list(test_ids), test=test,
                  oof_source="oof", n_folds=3, refit=False)


def test_averaged_seeds_are_aligned_by_id_over_the_ids_all_cover():
    rng = np.random.default_rng(0)
    ids, test_ids = [f"{i:05d}" for i in range(40)], TEST_IDS
    first = seed_member("a-seed0", ids, rng.dirichlet(np.ones(3), 40), test_ids,
                        rng.dirichlet(np.ones(3), 12))
    order, test_order = rng.permutation(40)[:37], rng.permutation(12)  # 3 ids missing
    truth_oof, truth_test = rng.dirichlet(np.ones(3), 40), rng.dirichlet(np.ones(3), 12)
    second = seed_member("a-seed1", [ids[i] for i in order], truth_oof[order],
                         [test_ids[i] for i in test_order], truth_test[test_order])
    other = seed_member("b", ids, first.oof, test_ids, first.test)
    averaged = average_seeds([first, second, other], ["a", "a", "b"])
    assert [m.name for m in averaged] == ["a-seed0 + a-seed1", "b"]
    mean = averaged[0]
    kept = sorted(order)  # the first member's order, less the ids the second lacks
    assert mean.oof_ids == [ids[i] for i in kept] and len(kept) == 37
    assert np.allclose(mean.oof, (first.oof[kept] + truth_oof[kept]) / 2)
    assert mean.test_ids == test_ids
    assert np.allclose(mean.test, (first.test + truth_test) / 2)
