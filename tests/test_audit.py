"""`make audit` on tiny made-up competitions: planted duplicates are found and kept in one fold,
a group with conflicting labels is listed, a shifted test set is told apart, flipped labels rank
among the first suspects, and a new duplicate makes the folds stale."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_digits

from bench import synthetic_fundus
from bench.duplicates import CONTENTS, KINDS, copy_of
from bench.duplicates import copy_of as near_copy
from pipeline.__main__ import main as cli
from pipeline.base.config import DataConfig
from pipeline.base.fingerprints import sha256_file
from pipeline.data import duplicates
from pipeline.data.duplicates import (
    NearPairs,
    exact_pairs,
    group_of_pairs,
    merged_groups,
    near_pairs,
    split_chains,
    thumbnail_of,
)
from pipeline.data.images import inspect_images
from pipeline.data.survey import FEATURES, Survey, survey_image
from pipeline.stages.audit import NEAR_CHANCE_SKILL, label_suspects, skill_over_chance
from tests.test_provenance import Competition

DIGITS = load_digits()
PHOTOS: dict[int, np.ndarray] = {}


def digit(index: int, size: int = 256) -> np.ndarray:
    """A distinct 256 px "fundus photo" per index (photos: what duplicates are found among)."""
    if (index, size) not in PHOTOS:
        PHOTOS[(index, size)] = synthetic_fundus(np.random.default_rng(index), size, size)
    return PHOTOS[(index, size)]


def write_comp(root: Path, train: dict[str, tuple[np.ndarray, str]],
               test: dict[str, np.ndarray]) -> str:
    for part, images in (("train", {k: v[0] for k, v in train.items()}), ("test", test)):
        (root / part).mkdir(parents=True, exist_ok=True)
        for image_id, image in images.items():
            cv2.imwrite(str(root / part / f"{image_id}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    pd.DataFrame({"id": list(train), "label": [v[1] for v in train.values()]}).to_csv(
        root / "train.csv", index=False)
    pd.DataFrame({"id": list(test)}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": list(test), "label": "0"}).to_csv(root / "sample_submission.csv",
                                                        index=False)
    classes = sorted({v[1] for v in train.values()})
    path = root / "comp.yaml"
    path.write_text(yaml.safe_dump({"name": "comp", "root": str(root), "classes": classes}))
    return str(path)


def planted(tmp_path: Path) -> tuple[str, list[str]]:
    """40 distinct photos; three of them with near copies in train (shifted, re-encoded,
    brightened), one of those groups with a conflicting label, one with a copy in test."""
    train = {f"a{i:02d}": (digit(i), str(DIGITS.target[i] % 2)) for i in range(40)}
    train["a00_shift"] = (near_copy(digit(0), "shift"), train["a00"][1])
    train["a01_jpeg"] = (near_copy(digit(1), "jpeg"), train["a01"][1])
    train["a02_bright"] = (near_copy(digit(2), "bright"), str(1 - int(train["a02"][1])))
    test = {f"t{i:02d}": digit(100 + i) for i in range(10)}
    test["t_copy"] = near_copy(digit(3), "shift")
    return write_comp(tmp_path / "comp", train, test), [f"folds.dir={tmp_path / 'folds'}",
                                                         f"runs_dir={tmp_path / 'runs'}",
                                                         f"audit_dir={tmp_path / 'audit'}",
                                                         "folds.n_splits=4"]


def test_planted_copies_are_found_grouped_and_kept_in_one_fold(tmp_path, capsys):
    data, paths = planted(tmp_path)
    assert cli(["audit", "--data", data, *paths]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "audit" / "comp" / "duplicates.csv", dtype=str)
    groups = {frozenset(g["part"] + "/" + g["id"]) for _, g in table.groupby("group")}
    assert frozenset({"train/a00", "train/a00_shift"}) in groups
    assert frozenset({"train/a01", "train/a01_jpeg"}) in groups
    assert frozenset({"train/a02", "train/a02_bright"}) in groups
    assert frozenset({"train/a03", "test/t_copy"}) in groups  # a test image with a labelled copy
    assert len(groups) == 4  # and nothing else: 40 different photos are no copies
    assert "groups with conflicting labels" in out and "test images with a labelled copy" in out
    assert (tmp_path / "audit" / "comp" / "duplicates.png").is_file()
    capsys.readouterr()
    assert cli(["folds", "--data", data, *paths]) == 0
    out, err = capsys.readouterr()
    assert "each group kept in one fold" in out
    assert "conflicting labels" in err and "a02" in err  # listed, kept as labelled
    folds = pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str).set_index("id")
    for base, copy in (("a00", "a00_shift"), ("a01", "a01_jpeg"), ("a02", "a02_bright")):
        assert folds.loc[base, "fold"] == folds.loc[copy, "fold"]


def test_conflicting_groups_can_be_dropped_or_relabelled(tmp_path, capsys):
    data, paths = planted(tmp_path)
    assert cli(["audit", "--data", data, *paths]) == 0
    assert cli(["folds", "--data", data, *paths, "folds.duplicate_conflicts=drop"]) == 0
    folds = pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str)
    assert not {"a02", "a02_bright"} & set(folds["id"]) and "a00" in set(folds["id"])
    assert cli(["folds", "--data", data, *paths, "folds.duplicate_conflicts=majority"]) == 0
    folds = pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str).set_index("id")
    assert folds.loc["a02", "label"] == folds.loc["a02_bright", "label"]


def test_a_new_copy_is_found_and_grouped_by_make_folds_itself(tmp_path, capsys):
    """No `make audit`: the folds find the copies themselves (issue 27), and a copy added
    later makes the folds stale, then grouped with its original."""
    data, paths = planted(tmp_path)
    assert cli(["folds", "--data", data, *paths]) == 0
    folds = pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str).set_index("id")
    assert folds.loc["a00", "fold"] == folds.loc["a00_shift", "fold"]
    assert folds.loc["a01", "group"] == folds.loc["a01_jpeg", "group"]
    root = tmp_path / "comp"
    cv2.imwrite(str(root / "train" / "a05_copy.png"),
                cv2.cvtColor(near_copy(digit(5), "shift"), cv2.COLOR_RGB2BGR))
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[len(table)] = ["a05_copy", table.set_index("id").loc["a05", "label"]]
    table.to_csv(root / "train.csv", index=False)
    capsys.readouterr()
    assert cli(["status", "--data", data, *paths]) == 0
    assert "stale" in capsys.readouterr().out
    assert cli(["folds", "--data", data, *paths]) == 0
    folds = pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str).set_index("id")
    assert folds.loc["a05", "group"] == folds.loc["a05_copy", "group"]
    assert cli(["audit", "--data", data, *paths]) == 0  # the duplicates: current, found once
    assert "duplicates: current" in capsys.readouterr().out


def test_a_shifted_test_set_is_told_apart(tmp_path, capsys):
    same = {f"a{i:02d}": (digit(i), str(DIGITS.target[i] % 2)) for i in range(60)}
    alike = {f"t{i:02d}": digit(200 + i) for i in range(30)}
    shifted = {f"t{i:02d}": cv2.GaussianBlur(digit(200 + i, 320), (5, 5), 2) for i in range(30)}
    aucs = []
    for name, test in (("same", alike), ("shifted", shifted)):
        data = write_comp(tmp_path / name, same, test)
        assert cli(["audit", "--data", data, f"audit_dir={tmp_path / name / 'audit'}",
                    f"runs_dir={tmp_path / name / 'runs'}"]) == 0
        shift = pd.read_csv(tmp_path / name / "audit" / "comp" / "shift.csv")
        aucs.append(shift.loc[shift["what"] == "cheap features", "auc"].item())
        test_like = pd.read_csv(tmp_path / name / "audit" / "comp" / "test_like.csv")
        assert len(test_like) == 60 and test_like["p_test"].is_monotonic_decreasing
    assert aucs[0] < 0.75 and aucs[1] > 0.95, aucs


def test_flipped_labels_rank_first_among_the_suspects():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 300)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), targets] = 0.9  # a confident, right model
    given = targets.copy()
    flipped = rng.choice(300, 15, replace=False)
    given[flipped] = (given[flipped] + 1) % 3
    oof = pd.DataFrame(probs, columns=["a", "b", "c"]).assign(
        id=[f"{i:03d}" for i in range(300)], label=np.array(["a", "b", "c"])[given])
    suspects = label_suspects(oof, ["a", "b", "c"])
    assert set(suspects["id"].head(15)) == {f"{i:03d}" for i in flipped}
    assert (suspects["given"] != suspects["predicted"]).all()


@pytest.mark.parametrize("size", [24, 32, 64, 256])
def test_each_kind_of_copy_is_found_at_each_size(size):
    """Natural-like images (bench.duplicates' textures), one copy of each kind of nine planted
    among 150: each found, paired with its own original."""
    rng = np.random.default_rng(size)
    images = CONTENTS["texture"](rng, 150, size)
    planted = {kind: len(images) + k for k, kind in enumerate(KINDS)}
    images += [copy_of(images[k], kind, seed=k) for k, kind in enumerate(KINDS)]
    thumbs = np.stack([thumbnail_of(image) for image in images])
    found = split_chains(near_pairs(thumbs), len(images))
    pairs = {tuple(p) for p in found.pairs.tolist()}
    copies = {(k, planted[kind]) for k, kind in enumerate(KINDS)}
    assert copies <= pairs, (found.cuts, copies - pairs)
    # of the 11,175 pairs of distinct images, at most two are taken for copies (2 at 64 px
    # here, short of the goal of 1 in 100,000; the suite: bench/BENCHMARKS.md)
    assert len(pairs - copies) <= 2, (found.cuts, pairs - copies)


def test_the_approximate_search_of_a_large_competition_finds_the_copies(monkeypatch):
    """Beyond EXACT_SEARCH images the candidates come from faiss's inverted-file index and the
    cut from MIRROR_QUERIES mirrored images (both lowered here, so that 1,000 images take that
    path): 30 planted copies (shifted, re-encoded, brightened) are found, and the cut and the
    false pairs are those of the exact search, give or take."""
    rng = np.random.default_rng(7)
    images = CONTENTS["texture"](rng, 1000, 32)
    kinds = ("shift", "jpeg", "bright")
    planted = {(k, len(images) + k) for k in range(30)}
    images += [copy_of(images[k], kinds[k % 3], seed=k) for k in range(30)]
    thumbs = np.stack([thumbnail_of(image) for image in images])
    exact = split_chains(near_pairs(thumbs), len(images))
    monkeypatch.setattr(duplicates, "EXACT_SEARCH", 300)
    monkeypatch.setattr(duplicates, "MIRROR_QUERIES", 300)
    approximate = split_chains(near_pairs(thumbs), len(images))
    pairs = {tuple(p) for p in approximate.pairs.tolist()}
    assert planted <= pairs, planted - pairs
    false_exact = {tuple(p) for p in exact.pairs.tolist()} - planted
    assert len(pairs - planted) <= 1.5 * len(false_exact) + 2, (pairs - planted, false_exact)
    for view, cut in approximate.cuts.items():
        assert abs(cut - exact.cuts[view]) < 0.03, (approximate.cuts, exact.cuts)


def test_one_class_of_digits_makes_no_false_group():
    """Distinct but alike: 170 handwritten zeros (scikit-learn's digits, 32 px): the cut comes
    from their own mirror images, so no pair is taken for a copy unless its 8 x 8 drawings are
    as alike as a copy's (the set holds such twins: two zeros whose 64 source pixels correlate
    at 0.98), and no group holds more than two."""
    rng = np.random.default_rng(0)
    picks = rng.choice(np.flatnonzero(DIGITS.target == 0), 170, replace=False)
    drawings = DIGITS.images[picks]
    zeros = [np.repeat(cv2.resize(np.round(d * 255 / 16).astype(np.uint8), (32, 32),
                                  interpolation=cv2.INTER_CUBIC)[..., None], 3, axis=2)
             for d in drawings]
    found = near_pairs(np.stack([thumbnail_of(image) for image in zeros]))
    for a, b in found.pairs.tolist():
        alike = np.corrcoef(drawings[a].ravel(), drawings[b].ravel())[0, 1]
        assert alike >= 0.97, (a, b, alike, found.cuts)
    groups = group_of_pairs(len(zeros), found.pairs)
    assert (groups < 0).all() or np.bincount(groups[groups >= 0]).max() <= 2


def test_a_chain_is_cut_into_stars():
    # 0 - 1 - 2 - 3 - 4 (each near the next) and a star 5 - {6, 7, 8}
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [5, 6], [5, 7], [5, 8]])
    found = split_chains(NearPairs(pairs, np.ones(len(pairs), np.float32), {}), 9)
    groups = group_of_pairs(9, found.pairs)
    assert groups[5] == groups[6] == groups[7] == groups[8]  # a star stays whole
    chain = [p for p in found.pairs.tolist() if max(p) < 5]
    assert chain == [[0, 1], [1, 2], [3, 4]]  # cut into the stars 1 - {0, 2} and 3 - 4
    assert groups[0] == groups[2] != groups[3] == groups[4]


def test_groups_connect_patients_and_copies():
    merged = merged_groups(["a", "b", "c", "d"], ["p1", "", "p1", ""], ["", "g", "", "g"])
    assert merged.tolist() == ["a", "b", "a", "b"]



def test_groups_are_connected_components_numbered_by_their_first_image():
    # 0-5-9 joined through 5 (pairs given out of order, one twice), 2-3, 7-8; 1, 4, 6 alone
    pairs = np.array([[5, 9], [3, 2], [8, 7], [0, 5], [9, 5]])
    assert group_of_pairs(10, pairs).tolist() == [0, -1, 1, 1, -1, 0, -1, 2, 2, 0]
    assert group_of_pairs(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [-1, -1, -1]


def test_the_check_reads_each_image_once_for_its_digest_thumbnail_and_features(tmp_path):
    """The check's one read of each file gives its SHA-256 (the digest every fingerprint uses),
    its thumbnail and its cheap features: two files of the same bytes are an exact pair, a
    re-encoded copy is not; a bad file is a problem, not a survey."""
    image = cv2.cvtColor(digit(0, 64), cv2.COLOR_RGB2BGR)
    paths = [tmp_path / name for name in ("a.png", "b.jpg", "c.png")]
    cv2.imwrite(str(paths[0]), image)
    cv2.imwrite(str(paths[1]), image, [cv2.IMWRITE_JPEG_QUALITY, 75])
    paths[2].write_bytes(paths[0].read_bytes())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad, seen = inspect_images([*paths, tmp_path / "bad.png", tmp_path / "gone.png"],
                               look=survey_image)
    assert {path.name: why.split(":")[0] for path, why in bad.items()} == \
        {"bad.png": "unreadable", "gone.png": "missing"}
    survey = Survey.of(seen).of_paths(paths)
    assert exact_pairs(survey.digests).tolist() == [[0, 2]]
    assert survey.digests == [sha256_file(path) for path in paths]
    assert survey.thumbs.shape == (3, 32, 32) and np.allclose(survey.thumbs[0], survey.thumbs[2])
    features = dict(zip(FEATURES, survey.features.T))
    assert features["width"].tolist() == [64, 64, 64]
    assert features["jpeg quality"].tolist() == pytest.approx([100, 75, 100], abs=1)
    assert features["file kB"][1] == pytest.approx(paths[1].stat().st_size / 1024)
    backwards = Survey.of(seen).of_paths(paths[::-1])  # rows taken in another order
    assert backwards.digests == survey.digests[::-1]
    assert np.array_equal(backwards.thumbs, survey.thumbs[::-1])


def test_the_picture_of_a_group_of_50_copies_stays_narrow(tmp_path):
    # one photo and 49 copies (labels spelt as price bins, drawn as plain text), 10 others
    train = {f"c{i:02d}": (digit(0), "$10_to_$20") for i in range(50)}
    train |= {f"a{i:02d}": (digit(i), "cost$5") for i in range(1, 11)}
    data = write_comp(tmp_path / "comp", train, {f"t{i}": digit(100 + i) for i in range(5)})
    assert cli(["audit", "--data", data, f"audit_dir={tmp_path / 'audit'}",
                f"runs_dir={tmp_path / 'runs'}"]) == 0
    table = pd.read_csv(tmp_path / "audit" / "comp" / "duplicates.csv", dtype=str)
    copies = table[table["id"].str.startswith("c")]
    assert len(copies) == 50 and copies["group"].nunique() == 1  # the 50 in one group
    picture = cv2.imread(str(tmp_path / "audit" / "comp" / "duplicates.png"))
    assert picture.shape[1] < 1200, picture.shape  # 6 images drawn (+44 more), not 50


def test_suspects_of_a_near_chance_model_come_with_a_caution(tmp_path, capsys):
    comp = Competition(tmp_path)  # 18 images, 3 classes, one epoch: a model near chance
    assert comp("folds") == 0 and comp("train") == 0
    capsys.readouterr()
    assert comp("audit", f"audit_dir={tmp_path / 'audit'}") == 0
    out, err = capsys.readouterr()
    assert "near chance" in err and "suspects are unreliable" in out


def test_a_confident_model_is_far_from_chance_and_a_random_one_near_it():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 300)
    sure = np.full((300, 3), 0.05)
    sure[np.arange(300), targets] = 0.9
    noise = rng.dirichlet(np.ones(3), 300)
    for metric in ("accuracy", "log_loss", "roc_auc", "qwk"):
        data = DataConfig(name="x", root=".", classes=["a", "b", "c"], metric=metric)
        labels = np.array(["a", "b", "c"])[targets]
        frames = [pd.DataFrame(p, columns=["a", "b", "c"]).assign(label=labels)
                  for p in (sure, noise)]
        assert skill_over_chance(frames[0], data)[2] > 0.5, metric
        assert skill_over_chance(frames[1], data)[2] < NEAR_CHANCE_SKILL, metric


def test_the_cv_says_when_it_may_not_transfer(tmp_path, capsys):
    """A test set the audit tells apart (blurred, larger files) and a duplicate group whose
    labels disagree: `make runs` and the submission's report say the CV may not transfer, with
    what to do, and the leaderboard scores the out-of-fold rows most like the test set."""
    same = {f"a{i:02d}": (digit(i), str(DIGITS.target[i] % 2)) for i in range(60)}
    same["a00_copy"] = (near_copy(digit(0), "jpeg"), str(1 - int(same["a00"][1])))
    same["a01_copy"] = (near_copy(digit(1), "bright"), str(1 - int(same["a01"][1])))
    shifted = {f"t{i:02d}": cv2.GaussianBlur(digit(200 + i, 320), (5, 5), 2) for i in range(30)}
    data = write_comp(tmp_path / "comp", same, shifted)
    paths = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
             f"audit_dir={tmp_path / 'audit'}", f"submissions_dir={tmp_path / 'subs'}",
             "folds.n_splits=2", "audit.test_like=20"]
    fast = ["augment.image_size=16", "train.batch_size=8", "train.epochs=1", "train.workers=0"]
    assert cli(["audit", "--data", data, *paths]) == 0
    for verb in ("folds", "train", "predict"):
        assert cli([verb, "--data", data, *([] if verb == "folds" else ["--model", "resnet20"]),
                    *paths, *fast]) == 0
    capsys.readouterr()
    assert cli(["runs", "--data", data, *paths]) == 0
    shown = capsys.readouterr()
    assert "oof test-like" in shown.out
    leaderboard = pd.read_csv(tmp_path / "runs" / "comp" / "leaderboard.csv")
    assert leaderboard["oof test-like"].notna().all()
    assert "tells the test images from the training images apart (AUC" in shown.err
    assert "4 labelled images (6%) sit in duplicate groups whose labels disagree" in shown.err
    assert cli(["ensemble", "--data", data, *paths]) == 0
    [report] = (tmp_path / "subs" / "comp").glob("*.md")
    assert "the CV may not transfer" in report.read_text()
    # the printed remedy names this competition, and runs as printed
    remedy = f"make folds ARGS=folds.duplicate_conflicts=drop DATA={data}"
    assert remedy in shown.err
    assert cli(["folds", "--data", data, *paths, "folds.duplicate_conflicts=drop"]) == 0
    kept = set(pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str)["id"])
    assert not {"a00", "a00_copy", "a01", "a01_copy"} & kept


def near_copy_competition(root: Path, n_bases: int = 600, seed: int = 0) -> tuple[str, pd.Series]:
    """Issue 27's case: 32 px noisy grey images (scikit-learn's digits), most of the labelled
    ones with 1-3 near copies of themselves under other ids, each copy a 1 px shift, a
    brightness step of a few levels, faint noise and a JPEG re-encoding at quality 80-95 (a
    re-uploaded photo); the test images are other digits, without copies. One image in five,
    labelled or not, carries a random label (its copies the same one), as graders' mistakes
    do: a model that memorises a copy's label scores it on the copy's twin, the gap copies
    open between CV and leaderboard. (YAML, the test labels.)"""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(DIGITS.images))

    def noisy_digit(index: int) -> np.ndarray:
        grey = cv2.resize(DIGITS.images[index] * 12.0 + 40.0, (32, 32), interpolation=cv2.INTER_LINEAR)
        grey = np.clip(grey + rng.normal(0, 25, grey.shape), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)

    def graded(index: int) -> str:
        return str(rng.integers(10) if rng.random() < 0.2 else DIGITS.target[index])

    def re_uploaded(image: np.ndarray) -> np.ndarray:
        dx, dy = rng.choice([-1, 1]), rng.choice([-1, 0, 1])
        moved = cv2.warpAffine(image, np.float32([[1, 0, dx], [0, 1, dy]]), (32, 32),
                               borderMode=cv2.BORDER_REFLECT)
        stepped = moved.astype(np.float32) + rng.integers(-8, 9) + rng.normal(0, 2, moved.shape)
        quality = int(rng.integers(80, 96))
        encoded = cv2.imencode(".jpg", np.clip(stepped, 0, 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
        return cv2.imdecode(encoded, cv2.IMREAD_COLOR)

    train = {}
    for index in order[:n_bases]:
        label, base = graded(index), noisy_digit(index)
        train[f"d{index:04d}"] = (base, label)
        copies = 0 if rng.random() < 0.15 else int(rng.integers(1, 4))
        for k in range(copies):
            train[f"d{index:04d}_{k}"] = (re_uploaded(base), label)
    test = {f"t{index:04d}": noisy_digit(index) for index in order[n_bases:]}
    truth = pd.Series({f"t{index:04d}": graded(index) for index in order[n_bases:]})
    data = write_comp(root, train, test)
    spec = yaml.safe_load(Path(data).read_text())
    spec["defaults"] = {"augment": {"image_size": 32}}  # the images' own size
    Path(data).write_text(yaml.safe_dump(spec))
    return data, truth


def held_out_accuracy(probabilities: Path, truth: pd.Series) -> float:
    """The accuracy on the test images of one fold's model (its test_probs.csv)."""
    table = pd.read_csv(probabilities, dtype={"id": str}).set_index("id")
    predicted = table.columns[table.to_numpy().argmax(axis=1)]
    return float(np.mean(predicted == truth[table.index].to_numpy()))


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [True, False])
def test_the_cv_of_a_competition_of_near_copies_is_its_held_out_score(tmp_path, grouped):
    """The default commands, no audit first (`make folds train predict ensemble`; 6 epochs in
    place of 30, for a CPU). The folds find the copies and keep each group in one fold, so the
    CV (out of fold: what one fold's model scores on images it never saw) is within 0.02 of
    what the fold models score on the test images, and not above the submission's held-out
    score; split at random (folds.duplicates=false) the copies lift the CV above both, as the
    issue measured (+0.050). Measured (2026-12-05, seed 0): grouped CV 0.690, fold models on
    the test 0.686, the submission (5 models, TTA) 0.757; at random CV 0.804, fold models
    0.727, submission 0.761. The submission's lead over the CV is the folds' ensemble, which
    out-of-fold scores cannot see (+0.07 here, from 6-epoch models trained on 20% wrong
    labels). About 1,600 labelled images in 600 groups and 1,197 test images: the scores'
    own sampling spread is near 0.015."""
    data, truth = near_copy_competition(tmp_path / "comp")
    paths = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
             f"audit_dir={tmp_path / 'audit'}", f"submissions_dir={tmp_path / 'subs'}",
             f"folds.duplicates={str(grouped).lower()}"]
    assert cli(["folds", "--data", data, *paths]) == 0
    folds = pd.read_csv(tmp_path / "folds" / "comp.csv", dtype=str)
    family = folds["id"].str.split("_").str[0]
    together = (folds.groupby(family)["fold"].nunique() == 1).mean()
    assert together >= 0.95 if grouped else together < 0.5  # copies kept together, or not
    for verb in ("train", "predict"):
        assert cli([verb, "--data", data, "--model", "resnet18", *paths, "train.epochs=6"]) == 0
    assert cli(["ensemble", "--data", data, *paths]) == 0
    [manifest] = (tmp_path / "subs" / "comp").glob("*.manifest.json")
    cv = json.loads(manifest.read_text())["details"]["cv"]
    csv = manifest.with_name(manifest.name.replace(".manifest.json", ".csv"))
    submission = pd.read_csv(csv, dtype=str).set_index("id")
    held_out = float((submission["label"] == truth[submission.index]).mean())
    fold_models = np.mean([held_out_accuracy(path, truth) for path in
                           (tmp_path / "runs" / "comp").glob("*/fold*/test_probs.csv")])
    print(f"grouped {grouped}: CV {cv:.3f}, fold models {fold_models:.3f}, held-out {held_out:.3f}")
    if grouped:
        assert abs(cv - fold_models) <= 0.02 and cv <= held_out + 0.02
    else:
        assert cv - fold_models > 0.02 and cv - held_out > 0.02
