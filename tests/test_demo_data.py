import cv2
import pandas as pd

from pipeline.stages.demo_data import export_digits


def test_export_counts_and_files(digits_root):
    train = pd.read_csv(digits_root / "train.csv", dtype=str)
    test = pd.read_csv(digits_root / "test.csv", dtype=str)

    assert len(train) + len(test) == 1797
    assert 0.19 < len(test) / 1797 < 0.21
    assert set(train["label"]) == {str(d) for d in range(10)}
    assert len(list((digits_root / "train").glob("*.png"))) == len(train)
    assert len(list((digits_root / "test").glob("*.png"))) == len(test)
    image = cv2.imread(str(digits_root / "train" / f"{train['id'][0]}.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (8, 8) and image.dtype == "uint8" and image.max() > 200


def test_solution_kept_apart_from_test(digits_root):
    train = pd.read_csv(digits_root / "train.csv", dtype=str)
    test = pd.read_csv(digits_root / "test.csv", dtype=str)
    solution = pd.read_csv(digits_root / "solution.csv", dtype=str)
    sample = pd.read_csv(digits_root / "sample_submission.csv", dtype=str)

    assert list(test.columns) == ["id"]  # no labels leak into the test CSV
    assert list(solution["id"]) == list(test["id"]) == list(sample["id"])
    assert not set(train["id"]) & set(test["id"])
    assert test["id"].str.len().eq(4).all()  # zero-padded string ids
    # the sample submission carries a placeholder, not the answers
    assert (sample["label"] != solution["label"]).sum() > 0.8 * len(test)


def test_export_is_kept_unless_forced(digits_root, capsys):
    before = (digits_root / "train.csv").stat().st_mtime_ns
    export_digits(digits_root)
    assert (digits_root / "train.csv").stat().st_mtime_ns == before
    assert "already" in capsys.readouterr().out
