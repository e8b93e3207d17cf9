"""Holding under misuse, as competitors and a security reviewer try it: decompression bombs, a
second process on the same experiment, a full disk, remedies that must work as printed, files a
teammate can read, tampered checkpoints, links out of the image folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from pipeline.__main__ import build_parser
from pipeline.__main__ import main as cli
from pipeline.base.config import AugmentConfig, CacheConfig
from pipeline.base.utils import data_argument
from pipeline.data.imagecache import build_cache, cache_reader, image_loader
from pipeline.data.images import ImageTooLarge
from pipeline.data.tables import DataError, train_image_paths
from pipeline.experiments.locks import LockedError, holding
from pipeline.experiments.probfiles import PredictionFileError, read_probabilities
from tests.conftest import REPO, dry_make, write_image
from tests.test_provenance import Competition

FAST = ["augment.image_size=16", "train.batch_size=4", "train.epochs=1", "train.workers=0"]


def png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header says width x height (1.2 GB decoded at 20000 x 20000) in under 1 KB:
    its few compressed rows are all a header-only check may read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width * 3 + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
                     + chunk(b"IEND", b""))
    return path


def peak_run(argv: list[str]) -> tuple[int, str, float]:
    """(exit code, stderr, peak memory in MB) of `python -m pipeline ARGV` in a fresh process.

    The peak is the process image's own high-water mark (VmHWM): getrusage's ru_maxrss of a
    child carries the peak of the process that started it (here pytest's, over a gigabyte after
    the suite), so it is read only where /proc is missing."""
    code = ("import resource, runpy, sys\n"
            f"sys.argv = ['pipeline', *{argv!r}]\n"
            "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
            "except SystemExit as done:\n    rc = done.code\n"
            "try:\n"
            "    peak = next(int(line.split()[1]) for line in open('/proc/self/status')\n"
            "                if line.startswith('VmHWM'))\n"
            "except OSError:\n"
            "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print('PEAK', peak, rc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    peak, rc = re.search(r"PEAK (\d+) (\S+)", done.stdout).groups()
    return int(rc), done.stderr, int(peak) / 1024


# --------------------------------------------------------------------------------------------
# Decompression bombs


def test_a_bomb_is_refused_from_its_header_at_header_cost(tmp_path):
    comp = Competition(tmp_path)
    png_bomb(comp.root / "train" / "0003.png")
    rc, err, peak_mb = peak_run(["check", "--data", comp.data, *comp.paths])
    assert rc == 1 and "0003" in err and "over the pixel budget" in err
    assert "20000 x 20000 px" in err and "Traceback" not in err
    # decoding it would take 1.2 GB on top of the ~0.7 GB the interpreter and torch take
    assert peak_mb < 1000, f"peak {peak_mb:.0f} MB: the image was decoded"
    assert comp("folds", "data.drop_bad_images=true") == 0  # left out, with the usual setting
    folds = pd.read_csv(tmp_path / "folds" / "tiny.csv", dtype=str)
    assert "0003" not in set(folds["id"])


def test_every_loader_refuses_a_bomb_before_decoding(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    augment = AugmentConfig(image_size=16)
    uncached = image_loader(CacheConfig(), augment, [bomb])  # training, predict, infer: no cache
    with pytest.raises(ImageTooLarge, match=r"bomb.png is 20000 x 20000 px"):
        uncached(bomb)
    reader = cache_reader(CacheConfig(enabled=True, dir=str(tmp_path / "cache")), augment)
    with pytest.raises(DataError, match=r"bomb.png.*over the pixel budget"):
        build_cache(reader, [bomb])  # `make cache`, and training with cache.enabled
    with pytest.raises(ImageTooLarge, match="over the pixel budget of 1000 Mpx"):
        image_loader(CacheConfig(), augment, [bomb], max_pixels=10**9)(
            png_bomb(tmp_path / "huge.png", 40000, 40000))


def test_the_budget_is_a_setting(tmp_path):
    comp = Competition(tmp_path)
    write_image(comp.root / "train" / "0003", seed=3, size=64)
    assert comp("check", "data.max_image_pixels=1000") == 1
    assert comp("check", "data.max_image_pixels=10000") == 0


# --------------------------------------------------------------------------------------------
# Remedies that work as printed


MAKE_FLAGS = {"MODEL": "--model", "MODELS": "--models", "FOLDS": "--folds", "NAME": "--name",
              "SEEDS": "--seeds"}


def remedies(text: str) -> list[str]:
    """The `make ...` commands a message prints, in order, each once (placeholders skipped)."""
    found = re.findall(r"`(make [^`]+)`", text)
    looks = ("make runs", "make status")  # where to look, not what to do
    return list(dict.fromkeys(c for c in found if "<" not in c and not c.startswith(looks)))


def run_make(comp: Competition, command: str) -> int:
    """A printed `make VERB... VAR=value ...` run as the Makefile runs it (its variables become
    the CLI's flags), with this competition's folders. The competition is the one its DATA=
    names, as make would take it: a remedy without DATA= acts on the demo, and fails here."""
    words = shlex.split(command)[1:]
    verbs = [w for w in words if "=" not in w]
    flags, overrides, data = [], [], "digits"  # the Makefile's default
    for name, value in (w.split("=", 1) for w in words if "=" in w):
        if name in MAKE_FLAGS:
            flags += [MAKE_FLAGS[name], value]
        elif name in ("FORCE", "PARTIAL"):
            flags.append(f"--{name.lower()}")
        elif name == "ARGS":
            overrides += value.split()
        elif name == "TTA":
            overrides.append(f"tta.views={value}")
        elif name == "DATA":
            data = value
        else:
            raise AssertionError(f"unknown make variable in {command!r}")
    assert data == comp.data, f"{command!r} does not name the competition {comp.data}"
    for verb in verbs:
        rc = cli([verb, "--data", data, *flags, *comp.paths, "folds.n_splits=2", *overrides])
        if rc != 0:
            return rc
    return 0


def follow_remedies(comp: Competition, capsys, command: list[str], rounds: int = 4) -> list[str]:
    """Run `command` (CLI argv); while it fails, run every remedy it printed (each must
    succeed) and try again. Returns the remedies that were run."""
    ran = []
    for _ in range(rounds):
        capsys.readouterr()
        if cli(command) == 0:
            return ran
        err = capsys.readouterr().err
        todo = remedies(err)
        assert todo, f"a refusal without a remedy to run:\n{err}"
        for remedy in todo:
            capsys.readouterr()
            assert run_make(comp, remedy) == 0, f"{remedy} failed:\n{capsys.readouterr().err}"
            ran.append(remedy)
    raise AssertionError(f"{command} still fails after the remedies {ran}")


def ensemble_argv(comp: Competition, *extra: str) -> list[str]:
    return ["ensemble", "--data", comp.data, *comp.paths, "folds.n_splits=2", *extra]


def test_the_remedies_of_a_plain_experiment_work(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0 and comp("train") == 0 and comp("predict") == 0
    comp.add_test_image("t999")
    ran = follow_remedies(comp, capsys, ensemble_argv(comp))
    assert any(r.startswith("make predict MODEL=resnet20-") for r in ran)


def test_the_remedies_of_a_named_experiment_work(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    assert comp("train", "--name", "foo") == 0 and comp("predict", "--name", "foo") == 0
    best = comp.run_dir("foo") / "fold0" / "best.pt"
    best.write_bytes(best.read_bytes() + b"tampered")
    capsys.readouterr()
    assert comp("predict", "--name", "foo") == 1  # refused, naming the fold, not skipped
    err = capsys.readouterr().err
    assert "fold 0: best.pt was modified" in err
    assert run_make(comp, remedies(err)[0]) == 0  # make train MODEL=foo FOLDS=0 FORCE=1
    ran = follow_remedies(comp, capsys, ensemble_argv(comp, "--models", "foo"))
    assert ran == [f"make predict MODEL=foo DATA={shlex.quote(comp.data)}"]


def test_the_remedies_of_seeded_experiments_work(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    assert comp("train", "--seeds", "0,1") == 0 and comp("predict", "--seeds", "0,1") == 0
    comp.add_test_image("t999")
    ran = follow_remedies(comp, capsys, ensemble_argv(comp))
    assert sorted(r.split("MODEL=")[1].split()[0][-5:] for r in ran) == ["seed0", "seed1"]


def test_the_remedies_of_a_pseudo_labelled_round_work(tmp_path, capsys):
    comp = Competition(tmp_path)
    comp.paths.append(f"pseudo_dir={tmp_path / 'pseudo'}")
    assert comp("folds") == 0 and comp("train") == 0 and comp("predict") == 0
    assert comp("pseudo", "pseudo.mode=soft") == 0
    second = [p.name for p in (tmp_path / "runs" / "tiny").iterdir() if "-h" in p.name]
    assert len(second) == 1  # round two's name is a hash of its settings
    comp.add_test_image("t999")
    ran = follow_remedies(comp, capsys, ensemble_argv(comp))
    assert f"make predict MODEL={second[0]} DATA={shlex.quote(comp.data)}" in ran


def test_the_remedy_of_missing_folds_works(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0 and comp("train", "--folds", "0") == 0
    ran = follow_remedies(comp, capsys, ensemble_argv(comp))
    assert any(r.startswith("make train predict MODEL=") for r in ran)


def test_an_experiments_folds_are_of_one_setting(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0 and comp("train", "--name", "foo", "--folds", "0") == 0
    capsys.readouterr()
    assert comp("train", "--name", "foo", "--folds", "1", "model.name=resnet32") == 1
    err = capsys.readouterr().err
    assert "fold 0:" in err and "resnet20" in err and "resnet32" in err
    assert not (comp.run_dir("foo") / "fold1").exists()
    assert comp("train", "--name", "foo", "--force", "model.name=resnet32") == 0


def test_status_judges_the_settings_of_its_command(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0 and comp("train", "--name", "x", "--folds", "0") == 0
    capsys.readouterr()
    assert comp("status", "--name", "x", "train.lr=0.3") == 0
    out = capsys.readouterr().out
    assert "stale" in out and "train.lr: 0.003 -> 0.3" in out


# --------------------------------------------------------------------------------------------
# One process at a time


def train_process(comp: Competition, *extra: str) -> subprocess.Popen:
    flags = [a for a in extra if a.startswith("--")]
    overrides = [a for a in extra if not a.startswith("--")]
    argv = [sys.executable, "-m", "pipeline", "train", "--data", comp.data, "--model", "resnet20",
            "--name", "r", *flags, *comp.paths, "folds.n_splits=2", *FAST, *overrides]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_second_process_stops_at_once_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    first = train_process(comp, "train.epochs=500")
    info = tmp_path / "runs" / "tiny" / ".locks" / "experiment-r.lock.json"
    deadline = time.time() + 60
    while not info.is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert info.is_file(), first.communicate()[1][-2000:]
    started = time.perf_counter()
    second = train_process(comp, "train.epochs=500")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1 and time.perf_counter() - started < 60
    assert f"runs/tiny/r is being trained by process {first.pid} since" in err
    assert json.loads(info.read_text())["pid"] == first.pid  # the refusal changed nothing
    first.send_signal(signal.SIGKILL)
    first.wait()
    capsys.readouterr()
    assert comp("train", "--name", "r", "--force", "train.epochs=1") == 0  # in this process
    err = capsys.readouterr().err
    assert f"took over the lock of process {first.pid}" in err and "no longer running" in err
    assert not info.exists()  # released at the end


# --------------------------------------------------------------------------------------------
# A full disk, and files others can read


def test_a_full_disk_in_training_names_the_file_and_what_is_left(tmp_path, capsys, monkeypatch):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    real_save, saves = torch.save, []

    def full_disk(payload, path, *args, **kwargs):
        saves.append(Path(path).name)
        # last.pt's third write (the initial weights, epoch 1, epoch 2) finds the disk full
        if len([s for s in saves if "last" in s]) == 3 and "last" in Path(path).name:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "2240 vs 2048")
        return real_save(payload, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=4096))
    capsys.readouterr()
    assert comp("train", "--name", "full", "--folds", "0", "train.epochs=3") == 1
    err = capsys.readouterr().err
    fold = comp.run_dir("full") / "fold0"
    assert f"cannot write {fold / 'last.pt'}: no space left on device" in err
    assert "still holds epoch 1: free the space and run the same command again" in err
    assert "Traceback" not in err and "inline_container" not in err
    assert [p.name for p in fold.iterdir() if p.name.startswith(".")] == []  # no temp file
    assert torch.load(fold / "last.pt", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert comp("train", "--name", "full", "--folds", "0", "train.epochs=3") == 0
    assert "resuming after epoch 1" in capsys.readouterr().out


def test_a_file_size_limit_is_a_message_not_a_traceback(tmp_path):
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    limit = 1536 * 1024  # best.pt of resnet20 fits (1.1 MB), last.pt with momentum does not

    def limited():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [sys.executable, "-m", "pipeline", "train", "--data", comp.data, "--model", "resnet20",
            "--name", "small", "--folds", "0", *comp.paths, "folds.n_splits=2", *FAST]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, preexec_fn=limited)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot write" in done.stderr and "last.pt" in done.stderr
    assert "at most 1.5 MB" in done.stderr and "ulimit -f" in done.stderr
    assert "Traceback" not in done.stderr


def test_files_are_created_with_the_umask(tmp_path):
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); "
            "from pipeline.base.utils import write_text_atomic; write_text_atomic(sys.argv[2], 'x')")
    for umask, mode in (("022", 0o644), ("027", 0o640), ("002", 0o664)):
        target = tmp_path / f"{umask}.txt"
        subprocess.run([sys.executable, "-c", code, umask, str(target)], cwd=REPO, check=True)
        assert stat.S_IMODE(target.stat().st_mode) == mode
    old = os.umask(0o022)
    try:
        comp = Competition(tmp_path / "comp")
        assert comp("folds") == 0 and comp("train", "--folds", "0") == 0
        written = [*(tmp_path / "comp" / "runs").rglob("*"),
                   *(tmp_path / "comp" / "folds").rglob("*")]
        outputs = [p for p in written if p.is_file() and ".locks" not in p.parts]
    finally:
        os.umask(old)
    assert outputs and {stat.S_IMODE(p.stat().st_mode) for p in outputs} == {0o644}


# --------------------------------------------------------------------------------------------
# The remaining cases


def test_a_link_out_of_the_image_folder_is_refused_or_left_out(tmp_path, capsys):
    comp = Competition(tmp_path)
    outside = write_image(tmp_path / "elsewhere" / "secret", seed=9)
    image = comp.root / "train" / "0002.png"
    image.unlink()
    image.symlink_to(outside)
    capsys.readouterr()
    assert comp("check") == 1
    err = capsys.readouterr().err
    assert "links that lead outside the image folder" in err and "0002" in err
    assert comp("folds", "data.drop_bad_images=true") == 0
    assert "0002" not in set(pd.read_csv(tmp_path / "folds" / "tiny.csv", dtype=str)["id"])
    linked_folder = tmp_path / "linked"  # a whole image folder that is a link is fine
    linked_folder.symlink_to(comp.root / "train")
    assert comp("check", f"data.train_images={linked_folder}", "data.drop_bad_images=true") == 0


def test_a_class_without_rows_is_warned_of(tmp_path, capsys):
    comp = Competition(tmp_path, classes=["cat", "dog", "fox", "owl"])
    capsys.readouterr()
    assert comp("check") == 0
    assert "class(es) owl of the class list have no labelled row" in capsys.readouterr().err


def test_generated_files_stay_out_of_git():
    for path in ("folds/tiny.csv", "folds/tiny.manifest.json", "folds/tiny.dropped.csv",
                 "audit/tiny/duplicates.csv", "reports/tiny/index.html", "runs/x/.locks/a"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
    assert subprocess.run(["git", "check-ignore", "-q", "folds/.gitkeep"], cwd=REPO).returncode == 1


# --------------------------------------------------------------------------------------------
# Make variables that read as their opposite


@pytest.mark.parametrize("value", ["0", "no", "false", "yes"])
def test_force_other_than_1_is_refused_before_anything_runs(value):
    # FORCE=0 used to run `train --force`: the finished folds deleted and retrained
    done = dry_make("train", "DATA=x", "MODEL=resnet20", f"FORCE={value}", "PYTHON=python")
    assert done.returncode != 0 and "--force" not in done.stdout and done.stdout == ""
    assert f"FORCE={value} is not a choice" in done.stderr and "FORCE=1" in done.stderr


def test_force_1_forces_and_no_force_does_not():
    forced = dry_make("train", "DATA=x", "MODEL=resnet20", "FORCE=1", "PYTHON=python")
    assert forced.returncode == 0 and "--force" in forced.stdout
    for plain in (dry_make("train", "DATA=x", "MODEL=resnet20", "PYTHON=python"),
                  dry_make("train", "DATA=x", "MODEL=resnet20", "FORCE=", "PYTHON=python")):
        assert plain.returncode == 0 and "pipeline train" in plain.stdout
        assert "--force" not in plain.stdout


# --------------------------------------------------------------------------------------------
# Remedies that name the part at fault (issue 26)


def test_a_refit_predicted_with_other_views_is_named_and_aligned(tmp_path, capsys):
    """`make predict TTA=flips` then `make refit`: the refit (views none) is named as the part
    that differs, and the printed `make refit ... TTA=flips` (not `make predict`) aligns it."""
    comp = Competition(tmp_path)
    assert comp("folds") == 0 and comp("train") == 0
    assert comp("predict", "tta.views=flips") == 0 and comp("refit") == 0
    capsys.readouterr()
    argv = ensemble_argv(comp, "ensemble.refit_weight=0.5")
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "fold 0: flips, fold 1: flips, the refit: none" in err
    ran = follow_remedies(comp, capsys, argv)
    assert len(ran) == 1 and ran[0].startswith("make refit MODEL=resnet20-")
    assert " TTA=flips DATA=" in ran[0]


def test_seeds_with_a_space_reach_the_cli_as_one_list():
    """`make train SEEDS="0, 1"` was split by the shell, and `1` blamed as an override."""
    made = dry_make("train", "SEEDS=0, 1", "FOLDS=0, 1", "PYTHON=python")
    assert made.returncode == 0, made.stderr
    shown = made.stdout
    argv = shlex.split(shown.strip().splitlines()[-1])[3:]  # after `python -m pipeline`
    args = build_parser("train").parse_args(argv)
    assert args.seeds == [0, 1] and args.folds == [0, 1] and not args.overrides


def test_an_edited_experiment_file_is_stale_in_runs_status_and_ensemble(tmp_path, capsys):
    """An experiment trained from a file, the file then edited: `make runs` and `make ensemble`
    called it complete while `make status` said stale. All three judge it by the file of now,
    and the printed remedy retrains it under the edited settings."""
    comp = Competition(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  name: resnet20\n")
    assert comp("folds") == 0
    assert comp("train", model=str(mine)) == 0 and comp("predict", model=str(mine)) == 0
    assert cli(ensemble_argv(comp)) == 0
    mine.write_text("model:\n  name: resnet20\ntrain:\n  weight_decay: 0.001\n")
    capsys.readouterr()
    assert comp("runs", model=None) == 0
    shown = capsys.readouterr().out
    [name] = [p.name for p in (tmp_path / "runs" / "tiny").iterdir() if p.name.startswith("mine")]
    assert "train.weight_decay: 0.05 -> 0.001" in shown
    for model in (str(mine), name):  # the file, or the experiment's name, as a remedy spells it
        assert comp("status", model=model) == 0
        assert "train.weight_decay: 0.05 -> 0.001" in capsys.readouterr().out
    ran = follow_remedies(comp, capsys, ensemble_argv(comp))
    assert ran and ran[0].startswith("make train") and f"MODEL={name}" in ran[0]
    saved = yaml.safe_load((comp.run_dir(name) / "config.yaml").read_text())
    assert saved["train"]["weight_decay"] == 0.001 and saved["experiment_file"] == str(mine)


def test_other_fold_settings_are_named_with_both_ways_out(tmp_path, capsys):
    """`make folds ARGS=folds.n_splits=2` then a command with another n_splits: the setting is
    named, and the remedies keep the folds or split again with this command's value."""
    comp = Competition(tmp_path)
    assert comp("folds") == 0
    capsys.readouterr()
    assert comp("train", "folds.n_splits=3") == 1
    err = capsys.readouterr().err
    assert "the fold settings (n_splits: 2 -> 3) changed" in err
    assert 'give this command ARGS="folds.n_splits=2"' in err
    assert f"`make folds ARGS=folds.n_splits=3 DATA={shlex.quote(comp.data)}`" in err


def test_the_audit_checks_images_as_folds_does(tmp_path, capsys):
    comp = Competition(tmp_path)
    audit = [f"audit_dir={tmp_path / 'audit'}"]
    (comp.root / "train" / "0002.png").write_bytes(b"not an image")  # unreadable (PIL refuses)
    (comp.root / "train" / "0003.png").unlink()  # missing (the exact-copy digest's crash)
    png_bomb(comp.root / "train" / "0004.png")  # 20000 x 20000 px in its header
    capsys.readouterr()
    assert comp("audit", *audit, model=None) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for image_id in ("0002", "0003", "0004"):
        assert image_id in err
    assert "drop_bad_images=true" in err
    # told to, the audit leaves bad training images out and lists them, as folds does
    assert comp("audit", *audit, "data.drop_bad_images=true", model=None) == 0
    out, err = capsys.readouterr()
    assert "dropped 3 bad training image(s): 0002, 0003, 0004" in err
    assert "bad training images left out" in out
    audited = tmp_path / "audit" / "tiny"
    assert (audited / "duplicates.csv").is_file() and (audited / "shift.csv").is_file()
    # a bad test image stays an error: the submission needs every test row
    (comp.root / "test" / "t001.png").write_bytes(b"not an image")
    assert comp("audit", *audit, "data.drop_bad_images=true", model=None) == 1
    assert "t001" in capsys.readouterr().err


def test_class_names_with_dollar_signs_are_drawn_as_plain_text(tmp_path, capsys):
    # price bins: matplotlib would read '$10_to_$20' as mathtext and fail to parse it
    labels = [c for c in ("cost$5", "$10_to_$20", "$$") for _ in range(4)]
    comp = Competition(tmp_path, labels=labels)
    assert comp("folds") == 0 and comp("train", "--folds", "0") == 0
    fold = next((tmp_path / "runs" / "tiny").glob("resnet20*/fold0"))
    assert (fold / "confusion.png").stat().st_size > 0 and (fold / "curves.png").is_file()


# --------------------------------------------------------------------------------------------
# Remedies that name the competition (issue 26, the last items)


def test_an_unknown_audit_model_lists_the_experiments_instead_of_training_it(tmp_path, capsys):
    comp = Competition(tmp_path)  # its audit_dir is tmp_path/audit, where `folds` writes too
    assert comp("folds") == 0 and comp("train", "--name", "mine", "--folds", "0") == 0
    found = tmp_path / "audit" / "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in found.iterdir()}  # the duplicate pass's
    capsys.readouterr()
    assert comp("audit", model="nosuch") == 1
    err = capsys.readouterr().err
    assert "no experiment nosuch" in err and "experiments: mine" in err
    assert "make train" not in err
    # refused first: the audit wrote nothing (no shift.csv) and redid nothing
    assert {p.name: p.stat().st_mtime_ns for p in found.iterdir()} == before


def test_probability_file_and_fold_remedies_name_the_competition(tmp_path):
    comp = Competition(tmp_path, image_path="{label}/{id}.png")
    part = tmp_path / "runs" / "tiny" / "exp1" / "fold0"
    part.mkdir(parents=True)
    pd.DataFrame({"id": ["a"], "cat": [0.5]}).to_csv(part / "test_probs.csv", index=False)
    with data_argument(comp.data):
        with pytest.raises(PredictionFileError) as missing:
            read_probabilities(part / "test_probs.csv", ["cat", "dog"])
        assert f"`make predict MODEL=exp1 DATA={shlex.quote(comp.data)}`" in str(missing.value)
        with pytest.raises(DataError) as gone:
            train_image_paths(comp.config().data, ["nosuch"])
        assert f"`make folds DATA={shlex.quote(comp.data)}`" in str(gone.value)


def test_a_lock_held_by_training_is_reported_as_training_to_predict(tmp_path):
    lock = tmp_path / "runs" / "tiny" / ".locks" / "exp.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\nfrom pipeline.experiments.locks import holding\n"
         f"with holding(Path({str(lock)!r}), 'runs/tiny/exp', 'trained'):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as refused:
            with holding(lock, "runs/tiny/exp", "predicted"):
                pass
        assert "runs/tiny/exp is being trained by process" in str(refused.value)
    finally:
        holder.communicate("")


def test_a_bad_test_image_is_not_offered_drop_bad_images(tmp_path, capsys):
    comp = Competition(tmp_path)
    (comp.root / "test" / "t001.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert comp("check") == 1
    err = capsys.readouterr().err
    assert "t001" in err and "submission needs every test row" in err
    assert "fix or replace" in err and "drop_bad_images=true" not in err
    (comp.root / "train" / "0002.png").write_bytes(b"not an image")  # both: each its own remedy
    assert comp("check") == 1
    err = capsys.readouterr().err
    assert "Bad training images" in err and "drop_bad_images=true" in err
    assert "Bad test images" in err


def test_an_empty_label_is_shown_as_quotes(tmp_path, capsys):
    comp = Competition(tmp_path)
    comp.set_label("0002", "")
    capsys.readouterr()
    assert comp("check") == 1
    assert '''labels outside the class list ['cat', 'dog', 'fox']: "" (lines [4]''' in \
        capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="the warning is of a machine without GPUs")
def test_several_ranks_without_a_gpu_are_warned_of(tmp_path, capsys, monkeypatch):
    comp = Competition(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `make check GPUS=2` (torchrun) sets it on rank 0
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    assert comp("check") == 0
    assert "2 processes (GPUS=2) on a machine without a GPU" in capsys.readouterr().err


def test_the_printed_iconv_converts_the_latin1_file_from_anywhere(tmp_path, capsys):
    comp = Competition(tmp_path, labels=[c for c in ("café", "dog", "fox") for _ in range(6)])
    train_csv = comp.root / "train.csv"
    train_csv.write_bytes(train_csv.read_text(encoding="utf-8").encode("latin-1"))
    capsys.readouterr()
    assert comp("check") == 1
    command = re.search(r"`(iconv [^`]+)`", capsys.readouterr().err).group(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["bash", "-c", command], cwd=elsewhere, check=True)
    assert comp("check") == 0
    assert "café" in train_csv.read_text(encoding="utf-8")


def test_infers_pixel_budget_error_starts_its_own_line(tmp_path, capsys):
    comp = Competition(tmp_path)
    comp.paths.append(f"bundles_dir={tmp_path / 'bundles'}")
    assert comp("folds") == 0 and comp("train") == 0 and comp("predict") == 0
    assert comp("ensemble", "ensemble.name=sub") == 0 and comp("bundle", model=None) == 0
    png_bomb(comp.root / "test" / "t002.png")
    capsys.readouterr()
    assert cli(["infer", "--bundle", str(tmp_path / "bundles" / "tiny" / "sub.zip"),
                "--images", str(comp.root / "test"), "--ids", str(comp.root / "test.csv"),
                "--out", str(tmp_path / "out.csv")]) == 1
    err = capsys.readouterr().err
    assert "over the pixel budget" in err
    error = next(line for line in err.splitlines() if "over the pixel budget" in line)
    assert error.startswith("error: "), err[-2000:]  # not glued behind the bar's "infer: ..."


# --------------------------------------------------------------------------------------------
# Half-finished stages (issue 26, item 8 and h)


def add_train_copy(comp: Competition, image_id: str, of: str) -> None:
    """A labelled exact copy (the same bytes) of training image `of`, with its label."""
    shutil.copy(comp.root / "train" / f"{of}.png", comp.root / "train" / f"{image_id}.png")
    table = pd.read_csv(comp.root / "train.csv", dtype=str)
    table.loc[len(table)] = [image_id, table.set_index("id").loc[of, "label"]]
    table.to_csv(comp.root / "train.csv", index=False)


def test_an_interrupted_audit_leaves_no_duplicates_for_the_folds(tmp_path, capsys):
    comp = Competition(tmp_path)
    audit = [f"audit_dir={tmp_path / 'audit'}"]
    add_train_copy(comp, "0000_copy", of="0000")
    found = tmp_path / "audit" / "tiny"
    found.mkdir(parents=True)
    (found / "duplicates.png").mkdir()  # the picture cannot be written: the audit stops there
    capsys.readouterr()
    assert comp("audit", *audit, model=None) == 1
    assert "duplicates.png" in capsys.readouterr().err
    assert not (found / "duplicates.csv").exists()  # nothing without its manifest
    # a kill between the findings and their manifest: the file is there, unvouched for
    (found / "duplicates.png").rmdir()
    assert comp("audit", *audit, model=None) == 0
    (found / "duplicates.manifest.json").unlink()
    capsys.readouterr()
    # `make folds` finds the duplicates itself: a file no manifest vouches for is found again
    assert comp("folds", *audit) == 0
    assert "each group kept in one fold" in capsys.readouterr().out
    assert (found / "duplicates.manifest.json").is_file()
    folds = pd.read_csv(tmp_path / "folds" / "tiny.csv", dtype=str).set_index("id")
    assert folds.loc["0000", "fold"] == folds.loc["0000_copy", "fold"]


def test_an_ensemble_that_cannot_write_leaves_no_half_submission(tmp_path):
    comp = Competition(tmp_path)
    assert comp("folds") == 0 and comp("train") == 0 and comp("predict") == 0
    limit = 400  # bytes: the submission's rows fit, its report does not

    def limited():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [sys.executable, "-m", "pipeline", *ensemble_argv(comp, *FAST)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, preexec_fn=limited)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot write" in done.stderr and "Traceback" not in done.stderr
    written = [p.name for p in (tmp_path / "subs" / "tiny").iterdir() if not p.name.startswith(".")]
    assert written == [], written  # no submission without its report and manifest
