import subprocess
import sys

import pandas as pd

from tests.conftest import REPO


def test_demo_chain_end_to_end(tmp_path):
    """The README's first command, shrunk: every stage runs and the submission is scored."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--model", "resnet20",
         f"data.root={tmp_path / 'digits'}", f"folds.dir={tmp_path / 'folds'}",
         f"runs_dir={tmp_path / 'runs'}", f"submissions_dir={tmp_path / 'subs'}",
         f"reports_dir={tmp_path / 'reports'}", f"audit_dir={tmp_path / 'audit'}",
         f"pseudo_dir={tmp_path / 'pseudo'}", f"bundles_dir={tmp_path / 'bundles'}",
         "folds.n_splits=2", "train.epochs=1", "train.max_batches=3", "augment.image_size=16",
         "tta.views=hflip", "--name", "demo-r20"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "demo finished: demo-r20 on digits" in out
    assert "held-out test, ensemble" in out
    submissions = sorted((tmp_path / "subs" / "digits").glob("demo-r20_cv*.csv"))
    assert len(submissions) == 1
    submission = pd.read_csv(submissions[0], dtype=str)
    sample = pd.read_csv(tmp_path / "digits" / "sample_submission.csv", dtype=str)
    assert submission["id"].tolist() == sample["id"].tolist()
    assert (tmp_path / "subs" / "digits" / "demo-r20_refit.csv").is_file()
    run = tmp_path / "runs" / "digits" / "demo-r20"
    assert (run / "full" / "test_probs.csv").is_file() and (run / "summary.md").is_file()
    assert "unvalidated" in out  # the refit joined the ensemble without a fold to score it
    report = tmp_path / "reports" / "digits"  # the demo ends by writing its report, there
    assert (report / "index.html").is_file()
    assert (report / "experiments" / "demo-r20.html").is_file()

    # run again: every stage is current and skipped, nothing retrained
    stamp = (run / "fold0" / "best.pt").stat().st_mtime_ns
    again = subprocess.run(result.args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fold 0: current" in again.stdout and "refit is current" in again.stdout
    assert (run / "fold0" / "best.pt").stat().st_mtime_ns == stamp
