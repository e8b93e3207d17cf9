"""Several processes: DDP through torchrun (gloo on this CPU) and fold-parallel runs.

The torchrun tests launch `python -m torch.distributed.run --nproc_per_node=2 -m pipeline ...` as a
subprocess, the command `make train GPUS=2` runs. Process-free checks (sampler, shards, slots,
Make commands) come first.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import RandomSampler

from pipeline.__main__ import main as cli_main
from pipeline.base.config import TTAConfig
from pipeline.base.distributed import RankOrder, per_rank_batch, shard_range
from pipeline.base.utils import PipelineError
from pipeline.data.dataset import SeededSampler
from pipeline.data.tables import image_paths, train_image_dir
from pipeline.inference.predictor import CheckpointPredictor
from pipeline.models.factory import create_model
from pipeline.stages.train import run_parallel_folds
from pipeline.training.jobs import Job, gpu_slots, run_jobs
from tests.conftest import REPO, dry_make, experiment_dir, folds_csv, train
from tests.test_train import FAST, tiny

# --------------------------------------------------------------------------------------------
# Sharing the work, without processes


def _batches(items, size, drop_last):
    items = list(items)
    stop = len(items) - len(items) % size if drop_last else len(items)
    return [items[i:i + size] for i in range(0, stop, size)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [5, 7, 12, 13, 30])
def test_ranks_batches_together_are_the_single_process_batch(world, n):
    per_rank = 2
    batch = per_rank * world
    drop_last = n > batch

    def order():  # every rank seeds its generator alike: same order on each
        generator = torch.Generator().manual_seed(5)
        return SeededSampler(RandomSampler(range(n), generator=generator), base_seed=11)

    single = _batches(order(), batch, drop_last)
    ranks = [_batches(SeededSampler(RankOrder(RandomSampler(
        range(n), generator=torch.Generator().manual_seed(5)), drop_last, r, world), 11),
        per_rank, drop_last) for r in range(world)]
    assert all(len(batches) == len(single) for batches in ranks)  # same step count: no DDP hang
    for k, expected in enumerate(single):
        together = [item for batches in ranks for item in batches[k]]
        if drop_last:  # (index, augmentation seed) pairs: same images, same augmentations
            assert sorted(together) == sorted(expected)
        else:  # one short batch: DistributedSampler pads it with repeats
            assert set(together) == set(expected)


def test_shards_cover_each_item_once_in_order():
    for n in range(0, 11):
        for world in range(1, 5):
            shards = [shard_range(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_batch_size_is_the_global_batch():
    assert per_rank_batch(64, world=4) == 16
    assert per_rank_batch(5, world=1) == 5
    with pytest.raises(PipelineError, match=r"multiple of 4, e\.g\. train\.batch_size=8"):
        per_rank_batch(6, world=4)


def test_gpu_slots(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots("3") == ["0", "1", "2"]
    assert gpu_slots("0,2") == ["0", "2"]
    assert gpu_slots("3,") == ["3"]
    for bad, message in [(None, "needs --gpus"), ("0", "GPU 0 alone"), ("x", "a count"),
                         ("1,1", "twice")]:
        with pytest.raises(PipelineError, match=message):
            gpu_slots(bad)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert gpu_slots("0,1") == ["4", "5"]
    with pytest.raises(PipelineError, match="not among the 2"):
        gpu_slots("2,")


def _make(*args):
    result = dry_make(*args, "MODEL=m")
    return result.stdout + result.stderr


def test_make_launches_torchrun_and_fold_parallel():
    torchrun = "-m torch.distributed.run --nproc_per_node="
    assert f"{torchrun}4 --standalone -m pipeline train" in _make("train", "GPUS=4")
    assert torchrun not in _make("train")
    assert "CUDA_VISIBLE_DEVICES=0,1 " in _make("train", "GPUS=0,1")
    assert f"{torchrun}2 --standalone -m pipeline predict" in _make("predict", "GPUS=0,1")
    nodes = _make("train", "GPUS=8", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.1",
                  "MASTER_PORT=29400")
    assert (f"{torchrun}8 --nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29400 "
            f"-m pipeline train") in nodes
    assert "needs MASTER_ADDR" in _make("train", "GPUS=8", "NNODES=2")
    folds = _make("train", "GPUS=0,1", "PARALLEL=folds")
    assert "-m pipeline train --parallel folds --gpus 0,1" in folds and torchrun not in folds
    assert "the one mode is PARALLEL=folds" in _make("train", "GPUS=2", "PARALLEL=ranks")


# --------------------------------------------------------------------------------------------
# Fold-parallel scheduling, with stand-in commands


def test_jobs_run_one_per_gpu_with_logs_and_failures_named(tmp_path):
    script = ("import os, sys, time; print('gpu', os.environ['CUDA_VISIBLE_DEVICES']); "
              "time.sleep(0.3); sys.exit(int(sys.argv[1]))")
    jobs = [Job(f"job {i}", [sys.executable, "-c", script, str(code)], tmp_path / f"{i}.log")
            for i, code in enumerate([0, 3, 0])]
    failed = run_jobs(jobs, ["5", "7"], poll_s=0.05)
    assert failed == {"job 1": 3}
    gpus = [(tmp_path / f"{i}.log").read_text().split()[-1] for i in range(3)]
    assert gpus[:2] == ["5", "7"] and gpus[2] in ("5", "7")  # the third waited for a free GPU


def test_parallel_folds_name_the_failed_fold(tmp_path):
    config = tiny(tmp_path, extra=["train.epochs=1"])
    failing = [sys.executable, "-c", "import sys; print('boom'); sys.exit(2)"]
    with pytest.raises(PipelineError, match=r"fold \d \(exit 2\), fold \d \(exit 2\) failed"):
        run_parallel_folds(config, None, False, "2", command=failing)
    assert "boom" in (experiment_dir(config) / "fold1" / "train.log").read_text()
    assert not (experiment_dir(config) / "summary.csv").exists()


# --------------------------------------------------------------------------------------------
# Real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "-m", "pipeline", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's own default for several ranks
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _cli(config, extra=()) -> list[str]:
    """The `python -m pipeline train/predict` arguments of `tiny(..., extra=extra)`'s config."""
    return ["--data", str(config.data.root_path / "tiny.yaml"), "--model", "resnet20",
            f"folds.dir={config.folds.dir}", f"runs_dir={config.runs_dir}",
            f"audit_dir={config.audit_dir}",
            f"folds.n_splits={config.folds.n_splits}", *FAST, *extra]


def _train_distributed(tmp_path):
    """Fold 1 trained by two ranks. 27 images: fold 1 validates on 13, so the ranks' validation
    shards differ in size (6 and 7 images); each rank trains on 3 batches of 2 per epoch."""
    labels = [c for c in ("cat", "dog", "fox") for _ in range(9)]
    config = tiny(tmp_path, labels=labels)
    result = _torchrun("train", *_cli(config), "--folds", "1")
    folds = pd.read_csv(folds_csv(config), dtype=str, keep_default_na=False)
    return config, folds[folds["fold"] == "1"], result


def test_distributed_fold_writes_oof_in_order_and_its_checkpoint_loads(tmp_path):
    config, valid, result = _train_distributed(tmp_path)
    out = experiment_dir(config) / "fold1"
    epochs = [line for line in result.stdout.splitlines() if line.startswith("fold 1 epoch")]
    assert len(epochs) == 2, result.stdout  # printed by rank 0 alone
    assert len(pd.read_csv(out / "log.csv")) == 2

    oof = pd.read_csv(out / "oof.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    assert oof["id"].tolist() == valid["id"].tolist()  # every id once, in folds order
    assert oof["label"].tolist() == valid["label"].tolist()

    # best.pt loads in one process and predicts what the two ranks gathered, row for row: the
    # shards came back in order, and both ranks validated with rank 0's BatchNorm statistics.
    predictor = CheckpointPredictor(out / "best.pt", TTAConfig(), "cpu", workers=0)
    paths = image_paths(train_image_dir(config.data), config.data.image_path, valid["id"].tolist())
    np.testing.assert_allclose(oof[["cat", "dog", "fox"]].to_numpy(),
                               predictor.predict(paths, "single").probs, atol=1e-5)


@pytest.mark.slow
def test_distributed_resume_and_tta_predict(tmp_path):
    config, valid, _ = _train_distributed(tmp_path)
    out = experiment_dir(config) / "fold1"
    # Resume: every rank loads last.pt (the run had finished; only oof.csv is missing).
    first = (out / "oof.csv").read_bytes()
    (out / "oof.csv").unlink()  # as if killed before the fold's last files were written
    (out / "train.manifest.json").unlink()
    again = _torchrun("train", *_cli(config), "--folds", "1")
    assert again.stdout.count("resuming after epoch 2") == 1
    assert (out / "oof.csv").read_bytes() == first

    # TTA prediction shards the test and validation images over the ranks; rank 0 writes.
    _torchrun("predict", *_cli(config, ["tta.views=flips"]), "--folds", "1")
    predictor = CheckpointPredictor(out / "best.pt", TTAConfig(views="flips"), "cpu", workers=0)
    for name, ids, folder in [("test_probs.csv", ["t000", "t001", "t002", "t003"], "test"),
                              ("oof_tta.csv", valid["id"].tolist(), "train")]:
        probs = pd.read_csv(out / name, dtype={"id": str}, keep_default_na=False)
        assert probs["id"].tolist() == ids
        paths = image_paths(config.data.root_path / folder, config.data.image_path, ids)
        np.testing.assert_allclose(probs[["cat", "dog", "fox"]].to_numpy(),
                                   predictor.predict(paths, name).probs, atol=1e-5)


def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    """Without BatchNorm (timm's test_convnext: LayerNorm), 2 ranks x 2 images per step with DDP's
    averaged gradient are one process on 4 images: the same weights after an epoch. SGD: its step
    is proportional to the gradient, so float differences of the all-reduce stay that small
    (Adam's step divides by the gradient's own size and would magnify them where it is ~0)."""
    labels = [c for c in ("cat", "dog", "fox") for _ in range(8)]
    model = ["model.name=timm/test_convnext", "augment.image_size=32", "train.epochs=1",
             "train.optimizer=sgd"]
    config = tiny(tmp_path, labels=labels, extra=model)
    train(config, [0], force=False)  # the reference: one process, batch 4
    reference = torch.load(experiment_dir(config) / "fold0" / "last.pt", weights_only=True)["model"]

    runs = tmp_path / "ddp_runs"
    _torchrun("train", *_cli(config, [*model, f"runs_dir={runs}"]), "--folds", "0")
    ddp = torch.load(runs / config.data.name / config.run_name / "fold0" / "last.pt", weights_only=True)["model"]

    torch.manual_seed(config.train.seed + 0)  # the fold's initial weights, as setup() makes them
    initial = create_model("timm/test_convnext", 3).state_dict()
    moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    assert moved > 1e-3  # training did change the weights, far beyond the tolerance below
    for key in reference:
        torch.testing.assert_close(ddp[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_parallel_folds_write_what_sequential_runs_write(tmp_path, capsys):
    config = tiny(tmp_path, extra=["train.epochs=1"])
    train(config, None, force=False)  # sequential reference, in this process
    reference = {k: (experiment_dir(config) / f"fold{k}" / "oof.csv").read_bytes() for k in (0, 1)}

    # The CLI in this process; the two folds run as child processes at once.
    runs = tmp_path / "parallel_runs"
    argv = ["train", "--parallel", "folds", "--gpus", "2",
            *_cli(config, ["train.epochs=1", f"runs_dir={runs}"])]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "fold 0: started on" in printed and "fold 1: started on" in printed
    for k in (0, 1):
        out = runs / config.data.name / config.run_name / f"fold{k}"
        assert (out / "oof.csv").read_bytes() == reference[k], f"fold {k}"
        assert f"fold {k} epoch   1" in (out / "train.log").read_text()  # each fold's own log
    summary = pd.read_csv(runs / config.data.name / config.run_name / "summary.csv")
    assert summary["fold"].tolist() == [0, 1]
