"""`make auto`: the portfolio chosen from the data, and the budget that decides how many of its
members train (the run itself is under the `slow` marker: it trains several experiments)."""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import save_file

from pipeline.__main__ import main as cli
from pipeline.auto import (
    LAST_SHARE,
    MIN_EPOCHS,
    PREDICT_SHARE,
    SHARE,
    Clock,
    current_views,
    fold_estimate,
    folds_to_train,
    member_config,
    member_state,
    new_share,
    predicted_with_choice,
    resolved_member,
    run_member,
    start_member,
    with_share,
    with_weights_or_scratch,
)
from pipeline.base.config import load_config, save_config
from pipeline.base.task import Scorer
from pipeline.experiments.budgets import budget_key, write_budget
from pipeline.experiments.layout import Layout
from pipeline.experiments.state import oof_scores
from pipeline.models.factory import create_model
from pipeline.training.experiment import train_folds
from pipeline.training.portfolio import Member, portfolio, typical_side
from tests.conftest import dry_make, make_competition, write_image
from tests.test_tune import learnable_competition


def test_the_portfolio_follows_the_images(tmp_path):
    labels = [c for c in ("0", "1", "2") for _ in range(4)]
    small = load_config(str(make_competition(tmp_path / "small", labels)), None, [])
    assert typical_side(small.data) == 16
    members = portfolio(small, typical_side(small.data))
    another = f"auto-resnet18-seed{small.train.seed + 1}"  # one past the competition's seed
    assert [m.name for m in members] == ["auto-resnet20", "auto-resnet18", another,
                                         "auto-resnet56"]
    assert "model.stem=auto" in members[1].args
    assert all("augment.image_size=16" in m.args for m in members)
    assert not any(a.startswith("tta.") for m in members for a in m.args)  # auto tries them
    assert not any("model.pretrained=true" in m.args for m in members)
    ordinal = load_config(str(make_competition(tmp_path / "ordinal", labels, ordinal=True,
                                               metric="qwk")), None, [])
    assert "model.head=both" in portfolio(ordinal, 16)[2].args
    large = portfolio(small, 300)  # photos: ImageNet weights at 224 px
    assert all("model.pretrained=true" in m.args and "augment.image_size=224" in m.args
               for m in large)


def test_members_without_weights_at_hand_train_from_scratch_and_say_so(tmp_path, monkeypatch,
                                                                       caplog, capsys):
    """Offline (a notebook without internet), with resnet18's weights in weights/ and none of
    resnet50's or resnet34's: the resnet18 members keep their weights, the others train from
    scratch under names of their own, and the warning names the command that fetches them."""
    caches = {"HF_HOME": "hf", "HF_HUB_CACHE": "hf/hub", "TORCH_HOME": "torch"}
    for variable, folder in caches.items():  # empty: the machine's own caches cannot help
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "weights").mkdir()
    save_file(create_model("resnet18", 1000).state_dict(),
              str(tmp_path / "weights" / "resnet18.safetensors"))
    data = str(make_competition(tmp_path / "photos", [c for c in "ab" for _ in range(4)]))
    overrides = [f"model.weights_dir={tmp_path / 'weights'}", f"folds.dir={tmp_path / 'folds'}",
                 f"runs_dir={tmp_path / 'runs'}", f"audit_dir={tmp_path / 'audit'}",
                 "folds.n_splits=2"]
    members = portfolio(load_config(data, None, overrides), 300)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        chosen = with_weights_or_scratch(data, members, overrides)
    seed = f"auto-resnet18-seed{load_config(data, None, []).train.seed + 1}"
    assert [m.name for m in chosen] == ["auto-resnet18", "auto-resnet50-scratch", seed,
                                        "auto-resnet34-scratch"]
    pretrained = {m.name: member_config(data, m, overrides).model.pretrained for m in chosen}
    assert pretrained == {"auto-resnet18": True, "auto-resnet50-scratch": False, seed: True,
                          "auto-resnet34-scratch": False}
    warned = caplog.text
    assert "no ImageNet weights for resnet50 here (no download: HF_HUB_OFFLINE is set)" in warned
    assert f"`make weights MODEL=resnet34` where the download works fills {tmp_path}/weights/" \
        in warned
    assert "for resnet18" not in warned
    # a member an earlier call started goes on as it started, with weights at hand or not
    layout = Layout.of(load_config(data, None, overrides))
    for name, model, args in [("auto-resnet34", "resnet34", members[3].args),
                              (f"{seed}-scratch", "resnet18",
                               [*members[2].args, "model.pretrained=false"])]:
        config = member_config(data, Member(name, model, args), overrides)
        save_config(config, layout.experiment(name).config)
    again = [m.name for m in with_weights_or_scratch(data, members, overrides)]
    assert again == ["auto-resnet18", "auto-resnet50-scratch", f"{seed}-scratch",
                     "auto-resnet34"]
    # and `make auto` itself takes them: the table names the members it would train
    sized = str(make_competition(tmp_path / "sized", [c for c in "ab" for _ in range(4)],
                                 name="sized", defaults={"augment": {"image_size": 96}}))
    assert cli(["auto", "--data", sized, "--budget", "0.001", *overrides]) == 1
    out = capsys.readouterr().out
    assert "auto-resnet50-scratch" in out and "auto-resnet34-scratch" in out


def test_the_competitions_own_size_is_kept(tmp_path):
    labels = [c for c in ("0", "1") for _ in range(4)]
    data = make_competition(tmp_path / "comp", labels, defaults={"augment": {"image_size": 48}})
    config = load_config(str(data), None, [])
    assert all("augment.image_size=48" in m.args for m in portfolio(config, 16))


def test_a_budget_that_fits_no_member_says_so_and_trains_nothing(tmp_path, capsys):
    data, overrides = learnable_competition(tmp_path)
    capsys.readouterr()
    assert cli(["auto", "--data", data, "--budget", "0.001", *overrides]) == 1
    out, err = capsys.readouterr()
    assert "auto-resnet20" in out and "not started" in out and "needs about" in out
    assert " s left" in out  # seconds, not "0.0 min"
    assert "no member finished within BUDGET=0.001" in err and "make auto BUDGET=0.002" in err
    assert cli(["auto", "--data", data, "--budget", "2 hours", *overrides]) == 1
    assert "BUDGET=2 hours: '2 hours' is no duration" in capsys.readouterr().err
    assert not list((tmp_path / "runs" / "comp").glob("auto-*/fold0/best.pt"))


def test_each_member_gets_its_share_of_the_time_left_and_keeps_it(tmp_path):
    """Half of what is left for each member but the last (all of it), over its folds and its
    predictions, rounded down, as its train.time_budget; a member started before keeps its
    recorded share, which still matches its record (its epochs apply); fixed epochs are left
    alone."""
    data, overrides = learnable_competition(tmp_path)
    overrides = [o for o in overrides if not o.startswith("train.epochs=")]
    member = Member("auto-a", "resnet20", [])
    config, share_state = resolved_member(data, member, overrides)
    assert share_state == "new" and config.train.time_budget is None
    clock = Clock(budget=690.0, started=time.perf_counter())
    exact = 690 * SHARE / config.folds.n_splits / (1 + PREDICT_SHARE) / 60
    half = new_share(config, clock, last=False)
    assert exact * 0.99 < half <= exact
    last = 2 * LAST_SHARE * exact
    assert last * 0.99 < new_share(config, clock, last=True) <= last
    assert new_share(config, Clock(budget=0.5, started=time.perf_counter()), last=True) is None
    shared = with_share(config, data, member, overrides, share=half)
    assert shared.run_name == "auto-a" and shared.train.time_budget == half
    write_budget(Layout.of(config).experiment("auto-a"),
                 {"time_budget": half, "epochs": 7, "seconds_per_epoch": 0.5,
                  "settings": budget_key(shared)})
    again, share_state = resolved_member(data, member, overrides)
    assert share_state == "kept" and again.train.time_budget == half and again.train.epochs == 7
    fixed, share_state = resolved_member(data, Member("auto-b", "resnet20", ["train.epochs=2"]),
                                         overrides)
    assert share_state == "fixed" and fixed.train.time_budget is None and fixed.train.epochs == 2


def test_a_member_whose_share_fits_too_few_epochs_does_not_start_nor_hold_back(tmp_path):
    """resnet56 at 64 px: an epoch of 40 images takes about a second here, its share of two
    seconds over three folds about half of one, under MIN_EPOCHS; a cheaper member after it may
    still start."""
    data, overrides = learnable_competition(tmp_path)
    overrides = [o for o in overrides if not o.startswith(("train.epochs=", "model.name="))]
    member = Member("auto-deep", "resnet56", ["augment.image_size=64"])
    what, holds_back = start_member(data, member, overrides, last=True, after=None,
                                    clock=Clock(budget=2.0, started=time.perf_counter()))
    assert what.startswith("not started: an epoch takes about") and "a fold) fits 0" in what
    assert f"under {MIN_EPOCHS}" in what
    assert holds_back is False
    assert not list((tmp_path / "runs" / "comp").glob("auto-deep/fold*/best.pt"))


def test_no_time_left_starts_nothing_and_says_so(tmp_path, capsys):
    data, overrides = learnable_competition(tmp_path)
    overrides = [o for o in overrides if not o.startswith("train.epochs=")]
    capsys.readouterr()
    assert cli(["auto", "--data", data, "--budget", "0.01", *overrides]) == 1
    out = capsys.readouterr().out
    assert "auto-resnet20         not started  -        no time left" in out
    assert "after auto-resnet20: no time left" in out
    assert not list((tmp_path / "runs" / "comp").glob("auto-*/fold0/best.pt"))


@pytest.mark.slow
def test_members_under_shares_finish_and_a_second_call_keeps_their_shares(tmp_path, capsys):
    """Two resnet20 members with no epochs given: each trains under its share (epochs from
    the probe, recorded), both finish within the budget; a second call with another budget
    finds both current (their shares kept) and ensembles them again."""
    data, overrides = learnable_competition(tmp_path)
    overrides = [o for o in overrides if not o.startswith(("model.name=", "train.epochs="))]
    overrides += [f"submissions_dir={tmp_path / 'subs'}", f"reports_dir={tmp_path / 'reports'}"]
    plan = tmp_path / "portfolio.yaml"
    plan.write_text(yaml.safe_dump([{"name": "auto-a", "model": "resnet20"},
                                    {"name": "auto-b", "model": "resnet20",
                                     "args": ["train.seed=1"]}]))
    args = ["auto", "--data", data, "--portfolio", str(plan), *overrides]
    capsys.readouterr()
    started = time.perf_counter()
    assert cli([*args[:3], "--budget", "2.5", *args[3:]]) == 0
    assert time.perf_counter() - started < 2.5 * 60 * 1.2
    out = capsys.readouterr().out
    layout = Layout.of(load_config(data, None, overrides))
    shares = {}
    for name in ("auto-a", "auto-b"):
        exp = layout.experiment(name)
        record = yaml.safe_load(exp.budget.read_text())
        shares[name] = record["time_budget"]
        assert record["epochs"] >= 2, out
        assert all(exp.fold(k).train_manifest.is_file() for k in range(3)), out
    assert shares["auto-a"] <= 2.5 * 60 * 0.95 * SHARE / 3 / (1 + PREDICT_SHARE) / 60
    assert cli([*args[:3], "--budget", "0.3", *args[3:]]) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == 2, out
    for name, share in shares.items():
        assert yaml.safe_load(layout.experiment(name).budget.read_text())["time_budget"] == share


def two_class_competition(tmp_path, images: list[np.ndarray], rows: list[dict],
                          classes: list[str], **settings) -> tuple[str, list[str]]:
    """A log-loss competition of these 16 px training images and rows (id, label, ...), two
    test images, two folds (`settings`: more of the competition's YAML)."""
    root = tmp_path / "comp"
    (root / "train").mkdir(parents=True, exist_ok=True)
    for image, row in zip(images, rows):
        assert cv2.imwrite(str(root / "train" / f"{row['id']}.png"), image)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    for i in range(2):
        write_image(root / "test" / f"t{i}", seed=i)
    pd.DataFrame({"id": ["t0", "t1"]}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": ["t0", "t1"], **{c: 0.5 for c in classes}}).to_csv(
        root / "sample_submission.csv", index=False)
    (root / "comp.yaml").write_text(yaml.safe_dump({
        "name": "comp", "root": str(root), "classes": classes, "metric": "log_loss",
        **settings}))
    overrides = [f"folds.dir={tmp_path / 'folds'}", f"runs_dir={tmp_path / 'runs'}",
                 f"audit_dir={tmp_path / 'audit'}", "augment.image_size=16", "train.workers=0",
                 "train.batch_size=8", "train.epochs=10", "folds.n_splits=2",
                 f"submissions_dir={tmp_path / 'subs'}"]
    assert cli(["folds", "--data", str(root / "comp.yaml"), *overrides]) == 0
    return str(root / "comp.yaml"), overrides


def mirrored_competition(tmp_path) -> tuple[str, list[str]]:
    """Two classes told apart by which half of the image is bright: a mirrored image is the
    other class, so flips as TTA average each prediction with its opposite."""
    rng = np.random.default_rng(0)
    images, rows = [], []
    for i in range(40):
        label = ("left", "right")[i % 2]
        image = np.clip(rng.normal(60, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        image[:, slice(0, 8) if label == "left" else slice(8, 16)] += 120
        images.append(image)
        rows.append({"id": f"{i:03d}", "label": label})
    return two_class_competition(tmp_path, images, rows, ["left", "right"])


def trained_and_chosen(data: str, overrides: list[str], caplog):
    """Member auto-a (resnet20) trained on every fold, then predicted as auto predicts it:
    flips tried, kept only when better out of fold."""
    config = member_config(data, Member("auto-a", "resnet20", []), overrides)
    layout = Layout.of(config)
    train_folds(config, layout, None, force=False)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        predicted_with_choice(config, layout)
    return config, layout


def test_flips_that_score_worse_out_of_fold_are_not_kept_and_the_choice_stands(tmp_path,
                                                                               caplog):
    data, overrides = mirrored_competition(tmp_path)
    config, layout = trained_and_chosen(data, overrides, caplog)
    said = caplog.text
    assert "flips TTA scores log_loss" in said and "predicted again without TTA" in said, said
    exp = layout.experiment("auto-a")
    plain, _ = oof_scores(exp, [0, 1], Scorer.of(config.data))
    assert plain < 0.5 * np.log(2)  # it learned left from right: the flips undo that
    assert current_views(config, layout) == "none"
    assert len(member_state(config, layout).predicted_folds) == 2  # what the ensemble reads
    made = [exp.fold(k).predict_manifest.stat().st_mtime_ns for k in (0, 1)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        predicted_with_choice(config, layout)  # a second call: the choice stands, no predictions
    assert "flips" not in caplog.text
    assert [exp.fold(k).predict_manifest.stat().st_mtime_ns for k in (0, 1)] == made
    # TTA the user sets is not auto's to choose: predicted as set, no comparison
    chosen = member_config(data, Member("auto-a", "resnet20", ["tta.views=vflip"]), overrides)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        predicted_with_choice(chosen, layout)
    assert "flips TTA" not in caplog.text and current_views(chosen, layout) == "vflip"


def sided_competition(tmp_path) -> tuple[str, list[str]]:
    """Dark or light told by one half of the image, the other half a bright or dark distractor;
    each fold one side (the group column): a fold's model learns the other side, so a mirror
    shows it what it learned and flips as TTA help out of fold."""
    rng = np.random.default_rng(0)
    images, rows = [], []
    for i in range(40):
        label, side = ("dark", "light")[i % 2], ("left", "right")[(i // 2) % 2]
        image = np.empty((16, 16, 3))
        signal, distractor = (slice(0, 8), slice(8, 16))[::1 if side == "left" else -1]
        image[:, signal] = 40 if label == "dark" else 215
        image[:, distractor] = rng.choice([40, 215])
        images.append(np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8))
        rows.append({"id": f"{i:03d}", "label": label, "side": side})
    return two_class_competition(tmp_path, images, rows, ["dark", "light"], group_column="side")


def test_flips_that_score_better_out_of_fold_are_kept_and_later_commands_keep_them(tmp_path,
                                                                                   caplog):
    data, overrides = sided_competition(tmp_path)
    config, layout = trained_and_chosen(data, overrides, caplog)
    assert "auto: auto-a: flips TTA kept, out-of-fold log_loss" in caplog.text, caplog.text
    exp = layout.experiment("auto-a")
    plain, with_flips = oof_scores(exp, [0, 1], Scorer.of(config.data))
    assert with_flips < plain
    assert current_views(config, layout) == "flips"
    assert yaml.safe_load(exp.config.read_text())["tta"]["views"] == "flips"
    made = [exp.fold(k).predict_manifest.stat().st_mtime_ns for k in (0, 1)]
    # the member's own settings say flips now: `make predict` and `make ensemble` of it agree
    assert cli(["predict", "--data", data, "--model", "auto-a", *overrides]) == 0
    assert [exp.fold(k).predict_manifest.stat().st_mtime_ns for k in (0, 1)] == made
    assert cli(["ensemble", "--data", data, "--models", "auto-a", *overrides]) == 0
    [manifest] = (tmp_path / "subs" / "comp").glob("auto-a_cv*.json")
    assert yaml.safe_load(manifest.read_text())["details"]["cv"] == pytest.approx(with_flips)


def test_too_few_epochs_in_a_share_are_refused_and_a_budget_the_user_set_is_not(tmp_path):
    """A recorded pace that fits 3 epochs in the share: auto's own share refuses the member
    (under MIN_EPOCHS); the same budget set by the user trains those 3."""
    data, overrides = learnable_competition(tmp_path)
    overrides = [o for o in overrides if not o.startswith("train.epochs=")]
    config = member_config(data, Member("auto-a", "resnet20", ["train.time_budget=0.5"]),
                           overrides)
    layout = Layout.of(config)
    write_budget(layout.experiment("auto-a"),
                 {"time_budget": 0.5, "epochs": 3, "seconds_per_epoch": 0.5 * 60 * 0.9 / 3.5,
                  "settings": budget_key(config)})
    _, _, cannot = fold_estimate(config, layout, shared=True)
    assert cannot is not None and "fits 3 epoch(s), under 5" in cannot
    per_fold, _, cannot = fold_estimate(config, layout, shared=False)
    assert cannot is None and per_fold == pytest.approx(0.5 * 60 * (1 + PREDICT_SHARE))


def test_a_started_member_stops_between_folds_unless_nothing_would_finish(tmp_path, caplog):
    """No time left after its first fold: with a member finished before, it stops there; with
    none, it trains on over the budget and says so (an empty result wastes all of it)."""
    data, overrides = learnable_competition(tmp_path)
    config = member_config(data, Member("auto-a", "resnet20", ["train.epochs=1"]), overrides)
    layout = Layout.of(config)
    spent = Clock(budget=0.0, started=time.perf_counter(), finished=1)
    what = run_member(config, layout, [0, 1, 2], clock=spent, per_fold=1.0, epoch=None)
    assert what.startswith("stopped after 1 of 3 fold(s): the next needs about"), what
    assert folds_to_train(config, layout) == [1, 2]
    first = Clock(budget=0.0, started=time.perf_counter())
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        what = run_member(config, layout, [1, 2], clock=first, per_fold=1.0, epoch=None)
    assert what == "trained" and folds_to_train(config, layout) == []
    assert "trains on over the budget: without it no member would finish" in caplog.text


def test_make_auto_passes_the_budget_and_the_portfolio():
    out = dry_make("auto", "DATA=aptos", "BUDGET=2h", "PORTFOLIO=p.yaml", "EPOCHS=3").stdout
    assert "pipeline auto --data aptos --budget 2h --portfolio p.yaml" in out
    assert "train.epochs=3" in out and "time_budget" not in out


@pytest.mark.slow
def test_a_budget_that_fits_two_members_stops_there_and_a_second_call_goes_on(tmp_path,
                                                                                 capsys):
    """Two cheap members (1 epoch of resnet20 at 16 px, about 5 s each here) and one that
    needs far longer (resnet56 at 48 px, 8 epochs: about a minute and a half): 40 s fit the
    first two and not the third; a second call with 5 minutes skips the two and trains the
    third."""
    data, overrides = learnable_competition(tmp_path)
    overrides = [o for o in overrides if not o.startswith(("model.name=", "train.epochs="))]
    overrides += [f"submissions_dir={tmp_path / 'subs'}", f"reports_dir={tmp_path / 'reports'}"]
    members = [{"name": "auto-a", "model": "resnet20", "args": ["train.epochs=1"]},
               {"name": "auto-b", "model": "resnet20", "args": ["train.epochs=1", "train.seed=1"]},
               {"name": "auto-c", "model": "resnet56",
                "args": ["augment.image_size=48", "train.epochs=8"]}]
    plan = tmp_path / "portfolio.yaml"
    plan.write_text(yaml.safe_dump(members))
    for i in range(3):  # the test images the submission needs
        write_image(tmp_path / "comp" / "test" / f"t{i}", seed=i)
    args = ["auto", "--data", data, "--portfolio", str(plan), *overrides]
    capsys.readouterr()
    assert cli([*args[:3], "--budget", "0.67", *args[3:]]) == 0
    out = capsys.readouterr().out
    layout = Layout.of(load_config(data, None, overrides))
    trained = {m["name"]: (layout.experiment(m["name"]).fold(2).train_manifest.is_file())
               for m in members}
    assert trained == {"auto-a": True, "auto-b": True, "auto-c": False}, out
    assert "not started" in out and "needs about" in out
    [manifest] = layout.submissions.glob("*.manifest.json")
    details = yaml.safe_load(manifest.read_text())["details"]
    assert details["members"] == ["auto-a", "auto-b"] and details["settings"]["method"] == "auto"
    assert cli([*args[:3], "--budget", "5", *args[3:]]) == 0
    out = capsys.readouterr().out
    assert layout.experiment("auto-c").fold(2).train_manifest.is_file()
    assert "done before" in out
    newest = max(layout.submissions.glob("*.manifest.json"), key=lambda p: p.stat().st_mtime)
    assert yaml.safe_load(newest.read_text())["details"]["members"] == ["auto-a", "auto-b",
                                                                         "auto-c"]
    submission = newest.with_name(newest.name.replace(".manifest.json", ".csv"))
    assert pd.read_csv(submission).shape[0] == 3
