import subprocess
import sys

import pandas as pd
import pytest

from pipeline.base.config import load_config
from pipeline.data.checks import check_competition
from pipeline.data.images import ImageReadError, read_image
from pipeline.data.tables import DataError, image_paths, load_train_table
from tests.conftest import REPO, make_competition

LABELS = [c for c in ("a", "b") for _ in range(5)]


def data_of(config_path, **overrides):
    return load_config(str(config_path), None, [f"data.{k}={v}" for k, v in overrides.items()]).data


def test_ids_stay_strings(tmp_path):
    path = make_competition(tmp_path, LABELS, ids=[f"{i:04d}" for i in range(10)])
    table = check_competition(data_of(path)).train
    assert table["id"].tolist()[:2] == ["0000", "0001"]
    assert table["target"].tolist() == [0] * 5 + [1] * 5


def test_reads_gray_and_colour_png_and_jpeg(tmp_path):
    for ext in (".png", ".jpg"):
        path = make_competition(tmp_path / ext[1:], LABELS, ext=ext)
        data = data_of(path)
        for p in image_paths(data.root_path / "train", data.image_path, ["0000", "0001"]):
            image = read_image(p)  # 0000 is grayscale, 0001 colour
            assert image.shape == (16, 16, 3) and image.dtype == "uint8"


def test_truncated_jpeg_and_missing_file_are_named(tmp_path):
    path = make_competition(tmp_path, LABELS, ext=".jpg")
    jpeg = tmp_path / "train" / "0003.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-40])
    (tmp_path / "train" / "0007.jpg").unlink()
    with pytest.raises(DataError) as err:
        check_competition(data_of(path))
    message = str(err.value)
    assert "missing images" in message and "0007" in message
    assert "unreadable images" in message and "0003" in message
    assert "drop_bad_images" in message  # the remedy
    with pytest.raises(ImageReadError, match="0003.jpg is truncated"):
        read_image(jpeg)


def test_garbage_bytes_are_unreadable(tmp_path):
    path = make_competition(tmp_path, LABELS)
    (tmp_path / "train" / "0002.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"unreadable images .*: 0002"):
        check_competition(data_of(path))


def test_a_png_cut_inside_its_header_is_unreadable_not_a_crash(tmp_path):
    """The check reads a PNG's size from its IHDR chunk: a file cut before the size ends is
    reported like any truncated image (a reviewer found it raised struct.error)."""
    path = make_competition(tmp_path, LABELS)
    png = tmp_path / "train" / "0002.png"
    png.write_bytes(png.read_bytes()[:20])  # the signature, the chunk's length and name, 4 bytes
    with pytest.raises(DataError, match=r"unreadable images .*: 0002"):
        check_competition(data_of(path))


def test_drop_bad_lists_what_was_dropped(tmp_path, capsys):
    path = make_competition(tmp_path, LABELS)
    (tmp_path / "train" / "0004.png").unlink()
    result = check_competition(data_of(path), drop_bad=True)
    assert result.dropped == {"0004": "missing"}
    assert "0004" not in result.train["id"].tolist() and len(result.train) == 9
    assert "dropped 1 bad training image(s): 0004" in capsys.readouterr().err


def test_bad_test_image_fails_even_when_dropping(tmp_path):
    path = make_competition(tmp_path, LABELS)
    (tmp_path / "test" / "t001.png").unlink()
    with pytest.raises(DataError, match=r"test: missing images .*: t001"):
        check_competition(data_of(path), drop_bad=True)


def test_unknown_label_names_value_and_line(tmp_path):
    path = make_competition(tmp_path, LABELS, classes=["a", "b"])
    frame = pd.read_csv(tmp_path / "train.csv", dtype=str)
    frame.loc[6, "label"] = "zebra"
    frame.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"labels outside the class list \['a', 'b'\]: zebra \(lines \[8\]"):
        load_train_table(data_of(path))


def test_duplicated_id(tmp_path):
    ids = [f"{i:04d}" for i in range(10)]
    ids[9] = "0002"
    path = make_competition(tmp_path, LABELS, ids=ids)
    with pytest.raises(DataError, match=r"duplicated ids: 0002"):
        load_train_table(data_of(path))


def test_id_escaping_image_folder_is_refused(tmp_path):
    path = make_competition(tmp_path, LABELS)
    frame = pd.read_csv(tmp_path / "train.csv", dtype=str)
    frame.loc[0, "id"] = "../../etc/passwd"
    frame.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"\.\./\.\./etc/passwd would point outside the image folder"):
        check_competition(data_of(path))


def test_missing_column_lists_columns(tmp_path):
    path = make_competition(tmp_path, LABELS)
    with pytest.raises(DataError, match=r"train.csv: missing column\(s\) \['diagnosis'\]; columns are \['id', 'label'\]"):
        load_train_table(data_of(path, label_column="diagnosis"))


def test_sample_submission_must_match_test_ids(tmp_path):
    path = make_competition(tmp_path, LABELS)
    sample = pd.read_csv(tmp_path / "sample_submission.csv", dtype=str)
    sample.loc[0, "id"] = "zzz"
    sample.to_csv(tmp_path / "sample_submission.csv", index=False)
    with pytest.raises(DataError, match=r"only in the sample submission: zzz; only in the test CSV: t000"):
        check_competition(data_of(path))


def test_cli_fails_before_writing_anything(tmp_path):
    path = make_competition(tmp_path / "comp", LABELS)
    (tmp_path / "comp" / "train" / "0001.png").unlink()
    folds_dir = tmp_path / "folds"
    result = subprocess.run([sys.executable, "-m", "pipeline", "folds", "--data", str(path),
                             f"folds.dir={folds_dir}", "folds.n_splits=2",
                             f"runs_dir={tmp_path / 'runs'}", f"audit_dir={tmp_path / 'audit'}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: bad data" in result.stderr and "0001" in result.stderr
    assert "Traceback" not in result.stderr
    assert not folds_dir.exists() or not any(folds_dir.iterdir())
