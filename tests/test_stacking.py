"""Ensembles the way winners build them: hill-climbing selection, level-2 stackers, `auto`, all
scored nested; several experiments in one command (issue: many models in one command,
hill-climbing selection, stacking)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline.__main__ import main as cli
from pipeline.base.task import Scorer
from pipeline.base.utils import PipelineError
from pipeline.ensembling.combine import (
    Options,
    apply_combination,
    choose_views,
    combine_members,
    decode_combined,
    honest_scores,
    score_methods,
)
from pipeline.ensembling.stacking import (
    STACKER_SOLVER,
    apply_stacker,
    fit_stacker,
    hillclimb,
    stacker_features,
)
from pipeline.experiments.layout import Layout
from pipeline.experiments.manifests import read_manifest
from tests.test_ensemble import (
    biased_ordinal,
    config_of,
    member_probs,
    write_competition,
    write_run,
)
from tests.test_provenance import Competition

N, CLASSES = 600, 3


def scorer(metric="accuracy", classes=CLASSES):
    return Scorer(tuple(str(c) for c in range(classes)), metric, False, 1)


def targets_and_folds(n=N, classes=CLASSES, folds=5, seed=0):
    """Balanced targets (no class prior to learn, so chance is exactly 1/classes), random folds."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % classes), rng.permutation(np.arange(n) % folds)


def noise_members(targets, count, seed=100):
    """Members that know nothing: random probabilities, independent of the targets."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.dirichlet(np.ones(CLASSES), len(targets)) for _ in range(count)])


def test_hillclimb_picks_the_strong_members_and_leaves_the_bad_one_out():
    targets, folds = targets_and_folds()
    strong = [member_probs(targets, CLASSES, skill, seed) for skill, seed in
              ((2.5, 1), (2.2, 2), (2.0, 3))]
    bad = member_probs(targets, CLASSES, 0.0, 4)
    stack = np.stack([*strong, bad])
    weights = hillclimb(stack, targets, scorer(), rounds=50)
    assert weights[3] == 0 and weights[:3].sum() == pytest.approx(1.0)
    assert (weights[:3] > 0).sum() >= 2  # picking with replacement still mixes strong members
    combined = combine_members(stack, stack[:, :5], targets, "hillclimb", scorer=scorer(), row_folds=folds)
    best_single = max(scorer().score(targets, p) for p in strong)
    assert scorer().score(targets, combined.oof_nested) > best_single


def test_hillclimb_never_reports_its_in_sample_score_as_the_cv():
    """On members that know nothing, choosing among them fits the noise: the in-sample figure
    is above chance, the nested one (selection refitted on the other folds) is not."""
    targets, folds = targets_and_folds(n=300)
    stack = noise_members(targets, 12)
    combined = combine_members(stack, stack[:, :5], targets, "hillclimb", scorer=scorer(), row_folds=folds)
    in_sample = scorer().score(targets, combined.oof)
    nested = scorer().score(targets, combined.oof_nested)
    assert in_sample > nested + 0.02
    assert abs(nested - 1 / CLASSES) < 0.05
    assert combined.fitted and combined.nested


def test_ties_go_to_fewer_members():
    targets, _ = targets_and_folds(n=90)
    member = member_probs(targets, CLASSES, 3.0, 1)
    stack = np.stack([member, member.copy(), member.copy()])  # adding a copy changes nothing
    assert hillclimb(stack, targets, scorer(), rounds=20).tolist() == [1.0, 0.0, 0.0]


def test_a_stacker_on_noise_is_at_chance_nested_and_above_it_in_sample():
    targets, folds = targets_and_folds(n=300)
    stack = noise_members(targets, 8)
    combined = combine_members(stack, stack[:, :5], targets, "stack", scorer=scorer(), row_folds=folds)
    in_sample = scorer().score(targets, combined.oof)
    nested = scorer().score(targets, combined.oof_nested)
    assert in_sample > 1 / CLASSES + 0.05  # 24 features fitted to 300 noisy rows
    assert abs(nested - 1 / CLASSES) < 0.06
    assert any("worse than the plain mean" in n for n in combined.notes)


def test_a_stacker_learns_what_averaging_cannot():
    """A member that confuses two classes systematically: logistic regression on the
    log-probabilities undoes the confusion; the mean cannot."""
    targets, folds = targets_and_folds()
    honest = member_probs(targets, CLASSES, 1.0, 1)
    swapped = member_probs(targets, CLASSES, 3.0, 2)[:, [1, 0, 2]]  # classes 0 and 1 swapped
    stack = np.stack([honest, swapped])
    mean = combine_members(stack, stack, targets, "mean", scorer=scorer(), row_folds=folds)
    stacked = combine_members(stack, stack, targets, "stack", scorer=scorer(), row_folds=folds)
    assert scorer().score(targets, stacked.oof_nested) > scorer().score(targets, mean.oof) + 0.2


@pytest.mark.parametrize("classes", [2, 3])
def test_the_stored_stacker_predicts_as_sklearn_does(classes):
    """`infer` applies the stacker from its stored numbers: they must give sklearn's own
    predict_proba (binary has one logit, multinomial one per class)."""
    targets, _ = targets_and_folds(n=200, classes=classes)
    stack = np.stack([member_probs(targets, classes, s, seed) for s, seed in ((1.0, 1), (0.5, 2))])
    stored = json.loads(json.dumps(fit_stacker("logreg", stack, targets)))
    features = stacker_features("logreg", stack)
    sklearn = LogisticRegression(C=1.0, max_iter=2000, solver=STACKER_SOLVER).fit(features, targets)
    np.testing.assert_allclose(apply_stacker(stored, stack), sklearn.predict_proba(features),
                               atol=1e-9)


def test_ridge_stacks_expected_grades_into_two_point_grades():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, 400)
    grid = np.arange(5)

    def graded(shift, seed):  # a member whose expected grade is off by `shift`
        centre = targets + shift + np.random.default_rng(seed).normal(0, 0.6, len(targets))
        probs = np.exp(-((grid[None] - centre[:, None]) ** 2))
        return probs / probs.sum(1, keepdims=True)

    stack = np.stack([graded(-0.8, 1), graded(0.5, 2)])
    stored = fit_stacker("ridge", stack, targets)
    probs = apply_stacker(stored, stack)
    assert probs.shape == (400, 5) and np.allclose(probs.sum(1), 1)
    assert ((probs > 0).sum(1) <= 2).all()  # a grade between two neighbours
    grades = probs @ grid
    error = np.abs(grades - targets).mean()
    assert error < min(np.abs(p @ grid - targets).mean() for p in stack)


def test_auto_uses_the_method_with_the_best_nested_score():
    targets, folds = targets_and_folds()
    honest = member_probs(targets, CLASSES, 1.0, 1)
    swapped = member_probs(targets, CLASSES, 3.0, 2)[:, [1, 0, 2]]
    stack = np.stack([honest, swapped])
    combined = combine_members(stack, stack[:, :5], targets, "auto", scorer=scorer(), row_folds=folds)
    table = {row.fit.label: row.score_nested for row in combined.table}
    # rank only where the metric only ranks (ROC-AUC); this one is accuracy
    assert set(table) == {"mean", "median", "trimmed", "fitted", "hillclimb", "stack (logreg)"}
    assert combined.fit.label == max(table, key=table.get) == "stack (logreg)"
    # ordinal competitions also try the ridge stacker on expected grades
    ordinal = combine_members(stack, stack[:, :5], targets, "auto", scorer=scorer(), row_folds=folds,
                              options=Options(ordinal=True))
    assert "stack (ridge)" in {row.fit.label for row in ordinal.table}


def shrunk_member(targets, noise, seed, grades=5):
    """An ordinal member that under-predicts high grades (its grade is 0.6 x the target, plus
    noise): argmax loses the top grades, thresholds on the expected grade win them back."""
    rng = np.random.default_rng(seed)
    guess = 0.6 * targets + rng.normal(0, noise, len(targets))
    logits = -((np.arange(grades)[None, :] - guess[:, None]) ** 2) / 0.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)


def test_auto_judges_each_method_as_its_submission_is_decoded():
    """With QWK thresholds, auto's table holds what `make ensemble` of each method would print
    (decoded, nested), not the argmax score: it once picked a stacker that beat the mean by
    argmax and lost to it once both were decoded."""
    targets, folds = targets_and_folds(n=400, classes=5)
    stack = np.stack([shrunk_member(targets, noise, seed) for noise, seed in
                      ((0.5, 1), (0.7, 2), (0.9, 3))])
    qwk = Scorer(tuple("01234"), "qwk", True, 1)
    options = Options(ordinal=True, decode="thresholds")
    decoded_rows = 0
    for row in score_methods(stack, targets, folds, qwk, options=options):  # auto's table
        if row.fit.method == "fitted":  # alone, fitted weights fall back to the mean
            continue
        stacker = row.fit.stacker["kind"] if row.fit.stacker else options.stacker
        alone = combine_members(stack, stack[:, :5], targets, row.fit.method, scorer=qwk, row_folds=folds,
                                options=Options(stacker=stacker, ordinal=True, decode="thresholds"))
        printed = honest_scores(targets, alone, decode_combined("thresholds", alone, targets,
                                                                folds, scorer=qwk), qwk)
        assert row.score_nested == pytest.approx(printed["out of fold"]), row.fit.label
        decoded_rows += row.score_nested > qwk.score(targets, row.honest) + 0.01
    assert decoded_rows >= 3  # the thresholds mattered: argmax would have judged differently


def test_auto_nests_its_choice_of_method():
    """On noise members, the best of several nested scores is optimistic (choosing the best is a
    fit too); auto's CV, the method chosen on the other folds for each held fold, is at chance.
    Over four noise competitions, so one lucky draw cannot decide."""
    best_nested, auto_cv = [], []
    for seed in range(4):
        targets, folds = targets_and_folds(n=300, seed=seed)
        stack = noise_members(targets, 12, seed=100 + seed)  # a stream apart from the targets'

        combined = combine_members(stack, stack[:, :5], targets, "auto", scorer=scorer(), row_folds=folds)
        best_nested.append(max(row.score_nested for row in combined.table))
        auto_cv.append(scorer().score(targets, combined.oof_nested))
        assert any("chosen on the other folds alone" in n for n in combined.notes)
    assert np.mean(best_nested) > np.mean(auto_cv) + 0.01
    assert abs(np.mean(auto_cv) - 1 / CLASSES) < 0.03


# --------------------------------------------------------------------------------------------
# The stage: the table in the report, the recipe the bundle reads


def test_make_ensemble_auto_writes_the_table_and_the_recipe(tmp_path, capsys):
    classes = ["a", "b", "c"]
    data, overrides = write_competition(tmp_path, classes, n_train=150, n_folds=5)
    config = config_of(data, overrides)
    table = Layout.of(config).folds_csv
    targets = pd.read_csv(table, dtype=str)["label"].map(classes.index).to_numpy()
    rng = np.random.default_rng(0)
    for name, skill in (("good", 2.5), ("fair", 1.5), ("bad", 0.0)):
        oof = member_probs(targets, 3, skill, int(rng.integers(1000)))
        write_run(config, name, oof, np.full((12, 3), 1 / 3))
    assert cli(["ensemble", "--data", data, *overrides, "ensemble.method=auto",
                "ensemble.name=auto"]) == 0
    out = capsys.readouterr().out
    assert "CV nested" in out and "hillclimb" in out and "stack (logreg)" in out
    report = Layout.of(config).submission("auto").report.read_text()
    assert "## Methods (auto" in report
    details = read_manifest(Layout.of(config).submission("auto").manifest).details
    assert details["method"] in ("mean", "median", "trimmed", "rank", "fitted", "hillclimb",
                                 "stack")
    assert len(details["methods"]) == 6 and details["settings"]["method"] == "auto"
    assert (details["stacker"] is not None) == (details["method"] == "stack")


def test_auto_on_an_ordinal_competition_prints_what_each_method_would_submit(tmp_path, capsys):
    """The competitor's sequence: `make ensemble` with auto, then again with a method from its
    table: the CV the second run prints is the one auto's table showed (decoded by nested
    thresholds, not argmax), and auto's own row is the CV in its submission's name."""
    classes = ["0", "1", "2", "3", "4"]
    targets, _ = biased_ordinal(n=300, seed=5)
    data, overrides = write_competition(tmp_path, classes, n_train=300, n_folds=4, metric="qwk",
                                        ordinal=True, labels=[classes[t] for t in targets])
    config = config_of(data, overrides)
    for seed in (1, 2, 3):
        _, probs = biased_ordinal(n=300, seed=5)  # the same rows, a member's own noise:
        noisy = probs * np.random.default_rng(seed).uniform(0.5, 1.5, probs.shape)
        write_run(config, f"m{seed}", noisy / noisy.sum(1, keepdims=True), probs[:12])

    def ensemble(method):
        assert cli(["ensemble", "--data", data, *overrides, f"ensemble.method={method}",
                    f"ensemble.name={method}"]) == 0
        return read_manifest(Layout.of(config).submission(method).manifest).details

    auto = ensemble("auto")
    table = {row["method"]: row["cv"] for row in auto["methods"]}
    for method in ("mean", "hillclimb"):
        alone = ensemble(method)
        assert alone["decode"]["kind"] == "thresholds"  # what the table must have scored
        assert alone["cv"] == pytest.approx(table[method]), method
    report = Layout.of(config).submission("auto").report.read_text()
    auto_row = next(line for line in report.splitlines() if "chosen on the other folds" in line)
    assert f"{auto['cv']:.4f}" in auto_row
    capsys.readouterr()


def test_ridge_is_refused_for_classes_that_are_not_ordinal(tmp_path, capsys):
    data, overrides = write_competition(tmp_path, ["a", "b"], n_train=20, n_folds=2)
    assert cli(["ensemble", "--data", data, *overrides, "ensemble.method=stack",
                "ensemble.stacker=ridge"]) == 1
    assert "ensemble.stacker=logreg" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Several experiments in one command


def test_models_trains_each_and_a_failure_stops_unless_keep_going(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    assert comp("train", "--models", "no-such-model resnet20", model=None) == 1
    captured = capsys.readouterr()
    assert "train of no-such-model failed" in captured.err and "KEEP_GOING=1" in captured.err
    run = comp.run_dir(comp.config().run_name)
    assert not run.exists()  # stopped at the failure

    assert comp("train", "--models", "no-such-model resnet20", "--keep-going", model=None) == 1
    captured = capsys.readouterr()
    assert "train failed for no-such-model" in captured.err
    assert (run / "fold1" / "best.pt").is_file()

    assert comp("predict", "--models", "resnet20", model=None) == 0
    assert (run / "fold0" / "test_probs.csv").is_file()


# --------------------------------------------------------------------------------------------
# Too few folds to nest in: said so, never labelled out of fold


def test_with_one_fold_a_fitted_method_is_labelled_in_sample():
    targets, _ = targets_and_folds(n=300)
    one_fold = np.zeros(300, int)
    stack = noise_members(targets, 8)
    for method in ("hillclimb", "stack", "fitted"):
        combined = combine_members(stack, stack[:, :5], targets, method, scorer=scorer(), row_folds=one_fold)
        assert not combined.nested and combined.oof_nested is combined.oof
        assert combined.fitted == (combined.fit.method != "mean")  # fitted may fall back
    auto = combine_members(stack, stack[:, :5], targets, "auto", scorer=scorer(), row_folds=one_fold)
    assert {row.fit.method for row in auto.table} == {"mean", "median", "trimmed"}
    assert not auto.nested and any("one fold" in n for n in auto.notes)


def test_with_two_folds_auto_reports_the_chosen_methods_nested_score_and_says_so():
    targets, _ = targets_and_folds(n=300)
    two_folds = np.arange(300) % 2
    honest = member_probs(targets, CLASSES, 1.0, 1)
    swapped = member_probs(targets, CLASSES, 3.0, 2)[:, [1, 0, 2]]
    stack = np.stack([honest, swapped, *noise_members(targets, 4)])
    combined = combine_members(stack, stack[:, :5], targets, "auto", scorer=scorer("log_loss"),
                               row_folds=two_folds)
    chosen = next(r for r in combined.table if r.fit is combined.fit)
    assert scorer("log_loss").score(targets, combined.oof_nested) == pytest.approx(
        chosen.score_nested)
    assert combined.nested and not combined.choice_nested
    assert any("two folds" in n for n in combined.notes)


def test_a_views_choice_follows_the_metrics_direction():
    """log-loss: lower is better; the good view must win, on every fold and for the test set."""
    targets, folds = targets_and_folds(n=300)
    good = member_probs(targets, CLASSES, 3.0, 1)
    bad = noise_members(targets, 1)[0]
    choice = choose_views({"bad": (bad, bad[:5]), "good": (good, good[:5])}, targets, folds,
                          "argmax", scorer=scorer("log_loss"))
    assert choice.view == "good" and set(choice.per_fold) == {"good"}


# --------------------------------------------------------------------------------------------
# rank against a fixed reference; auto's CV as its submission scores held out (issue 26)


def test_a_rows_rank_does_not_depend_on_the_rows_beside_it():
    """Ranked within the rows passed together, a 10-row fold scored 0.60 where all 30 OOF rows
    scored 0.33, and `infer` labelled one image by the ids beside it. Against the OOF reference
    each row's output is its own, in the manifest's form as `infer` reads it."""
    targets, folds = targets_and_folds(n=300)
    stack = np.stack([member_probs(targets, CLASSES, 1.5, 1),
                      member_probs(targets, CLASSES, 0.8, 2) ** 3])  # calibrated differently
    test = noise_members(np.zeros(40), 2, seed=7)
    combined = combine_members(stack, test, targets, "rank", scorer=scorer("roc_auc"), row_folds=folds)
    recorded = json.loads(json.dumps(combined.fit.stacker))  # as the manifest and bundle hold it
    whole = apply_combination("rank", combined.weights.tolist(), recorded, test)
    assert np.allclose(whole, combined.test)
    for rows in ([7], np.arange(3), np.arange(10, 40)):
        assert np.allclose(apply_combination("rank", combined.weights, recorded, test[:, rows]),
                           whole[rows])
    held = folds == 0
    assert np.allclose(combined.fit.apply(stack[:, held]), combined.oof[held])
    # a member's order within each class is kept, so its per-class ROC-AUC is
    alone = combine_members(stack[1:], test[1:], targets, "rank", scorer=scorer("roc_auc"), row_folds=folds)
    assert scorer("roc_auc").score(targets, alone.oof) == pytest.approx(
        scorer("roc_auc").score(targets, stack[1]), abs=0.01)


def test_a_rank_ensemble_recorded_without_its_reference_is_refused_with_the_remedy():
    stack = noise_members(np.zeros(20), 2)
    with pytest.raises(PipelineError, match="run `make ensemble` again"):
        apply_combination("rank", [0.5, 0.5], None, stack)


def test_auto_of_one_member_prints_what_its_submission_scores_held_out():
    """The issue's case: one experiment, accuracy, 3 folds. auto printed 0.4333 beside a
    submission identical to the member's (0.3333): rank, ranked within each held fold, won the
    choice. Now rank is not tried for accuracy, and the CV is what the submission scores on
    held-out rows of the same kind, within the spread of the folds."""
    targets, folds = targets_and_folds(n=150, folds=3)
    held_out = np.random.default_rng(9).permutation(np.arange(3000) % CLASSES)
    member = member_probs(np.concatenate([targets, held_out]), CLASSES, 0.6, 3)
    oof, test = member[None, :150], member[None, 150:]
    qwk_free = scorer()
    combined = combine_members(oof, test, targets, "auto", scorer=qwk_free, row_folds=folds)
    printed = honest_scores(targets, combined, None, qwk_free)["out of fold"]
    truth = qwk_free.score(held_out, combined.test)
    assert "rank" not in {row.fit.method for row in combined.table}
    assert abs(printed - truth) <= np.std(combined.fold_scores)
    alone = qwk_free.score(targets, oof[0])
    assert abs(printed - alone) <= np.std(combined.fold_scores)


def test_auto_with_a_decoder_prints_what_its_submission_scores_held_out():
    """Ordinal QWK with thresholds, two members: each held fold goes through all of auto done
    on the other folds (choice, fit, thresholds), so the printed CV is that of the submission's
    procedure: within the folds' spread of the held-out QWK of the submission itself."""
    n, n_test = 300, 3000
    rng = np.random.default_rng(4)
    targets = rng.permutation(np.arange(n + n_test) % 5)
    stack = np.stack([shrunk_member(targets, noise, seed) for noise, seed in ((0.5, 1), (0.8, 2))])
    folds = rng.permutation(np.arange(n) % 5)
    qwk = Scorer(tuple("01234"), "qwk", True, 1)
    combined = combine_members(stack[:, :n], stack[:, n:], targets[:n], "auto", scorer=qwk, row_folds=folds,
                               options=Options(ordinal=True, decode="thresholds"))
    decoded = decode_combined("thresholds", combined, targets[:n], folds, scorer=qwk)
    printed = honest_scores(targets[:n], combined, decoded, qwk)["out of fold"]
    truth = qwk.score_labels(targets[n:], decoded.test_labels)
    assert combined.nested_labels is not None and len(combined.fold_scores) == 5
    assert printed == pytest.approx(qwk.score_labels(targets[:n], combined.nested_labels))
    assert abs(printed - truth) <= np.std(combined.fold_scores), (printed, truth)
