"""Offline inference bundles for code competitions: `make bundle` packs the ensemble behind a
submission; `python -m pipeline infer`, with nothing but the bundle and its wheel installed,
writes the same submission; a bad bundle is refused with what is wrong (issue: an offline
inference bundle)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

import pipeline
from pipeline.__main__ import main as cli
from pipeline.base.fingerprints import sha256_file
from tests.conftest import REPO
from tests.test_provenance import Competition

TTA = "tta.views=hflip"  # set at training: config.yaml holds it, so the bundle must carry it


def make(tmp: Path, name: str = "tiny", **extra) -> Competition:
    comp = Competition(tmp, name, **extra)
    comp.paths.append(f"bundles_dir={tmp / 'bundles'}")
    return comp


def unpack(archive: Path, folder: Path) -> Path:
    """The zip unpacked, as Kaggle unpacks an uploaded dataset."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(folder)
    return folder


def infer(comp: Competition, bundle: Path, out: Path, *extra: str) -> int:
    return cli(["infer", "--bundle", str(bundle), "--images", str(comp.root / "test"),
                "--ids", str(comp.root / "test.csv"), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny 3-class competition (label submission): 2 folds x 1 epoch of resnet20 at 16 px
    with hflip TTA, a full-data refit, the ensemble, and its bundle."""
    tmp = tmp_path_factory.mktemp("bundle")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        comp = make(tmp)
        assert comp("folds") == 0
        for verb in ("train", "predict", "refit"):
            assert comp(verb, TTA) == 0
        assert comp("ensemble", "ensemble.name=sub") == 0
        assert comp("bundle", model=None) == 0
    return comp, tmp / "bundles" / "tiny" / "sub.zip", tmp / "subs" / "tiny" / "sub.csv"


def test_the_bundle_holds_the_ensemble_and_the_package(made):
    comp, archive, _ = made
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("bundle.json"))
        recipe = json.loads(zf.read("ensemble.json"))
        requirements = zf.read("requirements.txt").decode()
        readme = zf.read("README.md").decode()
    experiment = comp.config(TTA).run_name
    for part in ("fold0", "fold1", "full"):
        assert {f"members/{experiment}/{part}.safetensors",
                f"members/{experiment}/{part}.json"} <= names
    assert set(manifest["files"]) == names - {"bundle.json"}
    assert manifest["pipeline_version"] == pipeline.__version__ and manifest["submission"] == "sub"
    assert recipe["experiments"][experiment]["tta"]["views"] == "hflip"
    assert recipe["experiments"][experiment]["refit_weight"] == 1.0
    assert recipe["classes"] == ["cat", "dog", "fox"] and recipe["submission_kind"] == "label"
    assert "torch==" in requirements and "timm==" in requirements and "pytest" not in requirements
    assert "pip install --no-index --no-deps /kaggle/input/<dataset>/pipeline-*.whl" in readme
    assert any(n.startswith(f"pipeline-{pipeline.__version__}-") and n.endswith(".whl") for n in names)


def test_infer_from_the_installed_wheel_alone_reproduces_the_submission(made, tmp_path):
    comp, archive, submission = made
    folder = unpack(archive, tmp_path / "dataset")
    target = tmp_path / "site"
    wheel = next(folder.glob("pipeline-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    outside = tmp_path / "notebook"  # no checkout, no configs/ here
    outside.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1",
           "HOME": str(outside)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "infer", "--bundle", str(folder),
         "--images", str(comp.root / "test"), "--ids", str(comp.root / "test.csv"),
         "--out", "submission.csv"], check=False, cwd=outside, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"({target / 'pipeline'})" in done.stdout  # the wheel's copy, not the checkout's
    assert "per 1,000 images" in done.stdout
    got = pd.read_csv(outside / "submission.csv", dtype=str)
    want = pd.read_csv(submission, dtype=str)
    pd.testing.assert_frame_equal(got, want)


def test_a_probability_ensemble_is_reproduced_to_1e4(tmp_path, capsys):
    """Binary, ROC-AUC: a positive_probability submission of two experiments with fitted weights,
    from the zip itself. --time-limit falls back to fewer views, says so, and then differs: the
    comparison would see a dropped view. The second experiment predicts above its training
    size (tta.image_size): the bundle reads its images at that size, the first's at 16 px."""
    comp = make(tmp_path, labels=[c for c in ("0", "1") for _ in range(8)], metric="roc_auc")
    assert comp("folds") == 0
    for lr, size in (("0.05", []), ("0.01", ["tta.image_size=24"])):
        for verb in ("train", "predict"):
            assert comp(verb, TTA, f"train.lr={lr}", *size) == 0
    assert comp("ensemble", "ensemble.name=pair", "ensemble.method=fitted") == 0
    assert comp("bundle", "--name", "pair", model=None) == 0
    archive = tmp_path / "bundles" / "tiny" / "pair.zip"
    assert infer(comp, archive, tmp_path / "out.csv") == 0
    got = pd.read_csv(tmp_path / "out.csv", dtype={"id": str})
    want = pd.read_csv(tmp_path / "subs" / "tiny" / "pair.csv", dtype={"id": str})
    assert list(got.columns) == list(want.columns) == ["id", "label"]
    assert got["id"].tolist() == want["id"].tolist()
    np.testing.assert_allclose(got["label"], want["label"], rtol=0, atol=1e-4)

    capsys.readouterr()
    assert infer(comp, archive, tmp_path / "fast.csv", "--time-limit", "0.001") == 0
    assert "falling back to TTA none" in capsys.readouterr().out
    fast = pd.read_csv(tmp_path / "fast.csv", dtype={"id": str})
    assert np.abs(fast["label"] - want["label"]).max() > 1e-4

    # a level-2 stacker on the same two experiments: infer applies its stored parameters
    assert comp("ensemble", "ensemble.name=stacked", "ensemble.method=stack") == 0
    assert comp("bundle", "--name", "stacked", model=None) == 0
    stacked = tmp_path / "bundles" / "tiny" / "stacked.zip"
    with zipfile.ZipFile(stacked) as zf:
        assert json.loads(zf.read("ensemble.json"))["stacker"]["kind"] == "logreg"
    assert infer(comp, stacked, tmp_path / "stacked.csv") == 0
    got = pd.read_csv(tmp_path / "stacked.csv", dtype={"id": str})
    want = pd.read_csv(tmp_path / "subs" / "tiny" / "stacked.csv", dtype={"id": str})
    assert got["id"].tolist() == want["id"].tolist()
    np.testing.assert_allclose(got["label"], want["label"], rtol=0, atol=1e-4)
    assert np.abs(got["label"] - pd.read_csv(tmp_path / "out.csv")["label"]).max() > 1e-3


def test_a_stale_submission_is_not_bundled(made, capsys):
    comp = made[0]
    manifest = comp.run_dir(comp.config(TTA).run_name) / "fold0" / "predict.manifest.json"
    kept = manifest.read_bytes()
    manifest.unlink()  # fold 0's predictions no longer on record: the submission is not current
    try:
        capsys.readouterr()
        assert comp("bundle", "--name", "sub", model=None) == 1
    finally:
        manifest.write_bytes(kept)
    err = capsys.readouterr().err
    assert "submission sub is not current" in err and "fold 0" in err and "make ensemble" in err


# --------------------------------------------------------------------------------------------
# Bad bundles: a message naming the problem, exit 1


@pytest.fixture
def folder(made, tmp_path) -> Path:
    return unpack(made[1], tmp_path / "dataset")


def restamp(folder: Path, name: str) -> None:
    """Record a file's new SHA-256 in bundle.json, as a (faulty) bundler would have."""
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / "bundle.json").write_text(json.dumps(manifest))


def refused(comp: Competition, folder: Path, tmp_path: Path, capsys) -> str:
    capsys.readouterr()
    assert infer(comp, folder, tmp_path / "out.csv") == 1
    assert not (tmp_path / "out.csv").exists()
    return capsys.readouterr().err


def member(folder: Path, part: str) -> Path:
    return next((folder / "members").glob(f"*/{part}.safetensors"))


def test_a_missing_member_file_is_named(made, folder, tmp_path, capsys):
    member(folder, "fold1").unlink()
    err = refused(made[0], folder, tmp_path, capsys)
    assert "missing" in err and "fold1.safetensors" in err and "zip" in err


def test_a_changed_checkpoint_fails_its_fingerprint(made, folder, tmp_path, capsys):
    path = member(folder, "fold0")
    weights = load_file(str(path))
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = weights[first] + 1
    save_file(weights, str(path))
    err = refused(made[0], folder, tmp_path, capsys)
    assert "fold0.safetensors" in err and "fingerprint (SHA-256)" in err


def test_a_class_list_that_does_not_fit_the_sample_is_named(made, folder, tmp_path, capsys):
    pd.DataFrame({"id": ["t000"], "cat": [0.3], "dog": [0.3], "wolf": [0.4]}).to_csv(
        folder / "sample_submission.csv", index=False)
    restamp(folder, "sample_submission.csv")
    err = refused(made[0], folder, tmp_path, capsys)
    assert "does not fit" in err and "wolf" in err and "['cat', 'dog', 'fox']" in err


def test_another_package_version_is_refused_with_the_remedy(made, folder, tmp_path, capsys):
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["pipeline_version"] = "0.0.9"
    (folder / "bundle.json").write_text(json.dumps(manifest))
    err = refused(made[0], folder, tmp_path, capsys)
    assert "made by pipeline 0.0.9" in err and f"installed pipeline is {pipeline.__version__}" in err
    assert "--force-reinstall" in err and ".whl" in err


def test_a_folder_without_a_bundle_is_refused(made, tmp_path, capsys):
    shutil.rmtree(tmp_path / "empty", ignore_errors=True)
    (tmp_path / "empty").mkdir()
    err = refused(made[0], tmp_path / "empty", tmp_path, capsys)
    assert "no bundle.json" in err


def test_an_error_in_a_zip_names_the_zip_and_its_member(made, tmp_path, capsys):
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(made[1]) as source, zipfile.ZipFile(broken, "w") as out:
        names = [n for n in source.namelist() if not n.endswith("fold1.safetensors")]
        for name in names:
            out.writestr(name, source.read(name))
    gone = next(n for n in source.namelist() if n.endswith("fold1.safetensors"))
    err = refused(made[0], broken, tmp_path, capsys)
    assert f"bundle {broken} is incomplete" in err and gone in err
    assert "bundle-" not in err  # not the temporary folder it was unpacked to, deleted since
    manifest = json.loads(zipfile.ZipFile(made[1]).read("bundle.json"))
    member = next(n for n in manifest["files"] if n.endswith("fold0.json"))
    with zipfile.ZipFile(made[1]) as source, zipfile.ZipFile(broken, "w") as out:
        for name in source.namelist():
            data = b"{}" if name == member else source.read(name)
            if name == "bundle.json":
                (tmp_path / "empty.json").write_bytes(b"{}")
                manifest["files"][member] = sha256_file(tmp_path / "empty.json")
                data = json.dumps(manifest).encode()
            out.writestr(name, data)
    err = refused(made[0], broken, tmp_path, capsys)
    assert f"{broken} member members/" in err and "bundle-" not in err
