"""Messages instead of tracebacks: CSV encodings, empty tables, corrupt weights and checkpoints,
failed writes and ids too long to be file names. Each names the file, the reason and the remedy."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pipeline.base.config import load_config
from pipeline.base.utils import PipelineError, WriteError, atomic_path, write_csv_atomic
from pipeline.data.checks import check_competition
from pipeline.data.tables import DataError, load_train_table, read_table
from pipeline.inference.engine import load_checkpoint
from pipeline.models.weights import WeightsReadError, read_state_dict
from tests.conftest import REPO, make_competition

LABELS = [c for c in ("a", "b") for _ in range(3)]


def data_of(path):
    return load_config(str(path)).data


def run_check(config_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "check", "--data", str(config_path)],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# --------------------------------------------------------------------------------------------
# CSV encodings and empty tables


def test_utf16_with_a_bom_is_read(tmp_path):
    path = make_competition(tmp_path, LABELS, ids=["0001", "0002", "0003", "0004", "0005", "0006"])
    text = (tmp_path / "train.csv").read_text()
    (tmp_path / "train.csv").write_bytes(text.encode("utf-16"))  # BOM + UTF-16-LE
    table = load_train_table(data_of(path))
    assert table["id"].tolist()[:2] == ["0001", "0002"] and table["label"].tolist() == LABELS


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes("\ufeffid,label\n01,a\n".encode())
    assert read_table(csv, ["id"], "id")["id"].tolist() == ["01"]


def test_latin1_is_refused_with_the_line(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes("id,label\n01,a\n02,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"t.csv: not UTF-8 \(byte b'\\xe9' on line 3.*save it "
                                        r"as UTF-8"):
        read_table(csv, ["id"], "id")


def test_utf16_without_a_bom_is_named(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_bytes("id,label\n01,a\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"NUL bytes, as UTF-16 without a byte-order mark"):
        read_table(csv, ["id"], "id")


def test_empty_and_malformed_csvs(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("")
    with pytest.raises(DataError, match=r"t.csv: the file is empty; it needs a header line \(id\)"):
        read_table(csv, ["id"], "id")
    csv.write_text('id,label\n01,a\n02,"b\n')  # an unclosed quote
    with pytest.raises(DataError, match=r"t.csv: not a valid CSV"):
        read_table(csv, ["id"], "id")


def test_header_only_test_csv(tmp_path):
    path = make_competition(tmp_path, LABELS)
    (tmp_path / "test.csv").write_text("id\n")
    with pytest.raises(DataError, match=r"test.csv: has a header but no rows: no test ids"):
        check_competition(data_of(path), workers=1)


@pytest.mark.parametrize("case", ["header_only", "latin1", "long_id"])
def test_cli_reports_bad_tables_without_a_traceback(tmp_path, case):
    path = make_competition(tmp_path, LABELS)
    train_csv = tmp_path / "train.csv"
    if case == "header_only":
        train_csv.write_text("id,label\n")
        expected = ["train.csv: has a header but no rows"]
    elif case == "latin1":
        train_csv.write_bytes("id,label\n0000,a\n0001,\u00e9t\u00e9\n".encode("latin-1"))
        expected = ["train.csv: not UTF-8", "line 3", "save it as UTF-8"]
    else:
        frame = pd.read_csv(train_csv, dtype=str)
        frame.loc[1, "id"] = "x" * 300
        frame.to_csv(train_csv, index=False)
        expected = ["ids too long to be a file name", "x" * 300]
    result = run_check(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "all checks passed" not in result.stdout
    for text in expected:
        assert text in result.stderr


def test_long_ids_are_named_in_the_check(tmp_path):
    path = make_competition(tmp_path, LABELS)
    frame = pd.read_csv(tmp_path / "test.csv", dtype=str)
    frame.loc[0, "id"] = "y" * 260
    frame.to_csv(tmp_path / "test.csv", index=False)
    pd.DataFrame({"id": frame["id"], "label": "a"}).to_csv(tmp_path / "sample_submission.csv",
                                                           index=False)
    with pytest.raises(DataError) as err:
        check_competition(data_of(path), workers=1)
    assert f"test: ids too long to be a file name in {tmp_path / 'test'}: {'y' * 260}" in str(err.value)


# --------------------------------------------------------------------------------------------
# Corrupt weights and checkpoints


@pytest.fixture
def weights(tmp_path):
    state = {"fc.weight": torch.ones(64, 64), "fc.bias": torch.zeros(64)}
    save_file(state, tmp_path / "good.safetensors")
    torch.save(state, tmp_path / "good.pth")
    return tmp_path


@pytest.mark.parametrize("name, cut", [("good.safetensors", 1000), ("good.pth", 1000),
                                       ("good.safetensors", 0), ("good.pth", 0)])
def test_corrupt_weights_name_the_file(weights, name, cut):
    source = weights / name
    broken = weights / f"broken{source.suffix}"
    broken.write_bytes(source.read_bytes()[:cut] if cut else b"<html>404 not found</html>")
    with pytest.raises(WeightsReadError) as err:
        read_state_dict(broken)
    message = str(err.value)
    assert f"cannot read weights file {broken}" in message
    assert "corrupt or incomplete" in message and "model.pretrained=false" in message
    assert read_state_dict(source)["fc.weight"].shape == (64, 64)  # the intact file still loads


def test_pickled_objects_are_refused_with_the_remedy(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pth")
    with pytest.raises(WeightsReadError, match=r"module.pth is not a tensor file: it holds pickled "
                                               r"Python objects .*refused to unpickle.*state_dict"):
        read_state_dict(tmp_path / "module.pth")


class Payload:
    """What an attacker drops as a weights file: unpickling it would run a command."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_a_pickle_payload_is_refused_unrun_as_weights_and_as_checkpoint(tmp_path, how):
    path = tmp_path / "best.pt"
    if how == "torch.save":
        torch.save({"model": Payload()}, path)
    else:
        path.write_bytes(pickle.dumps({"model": Payload()}, protocol=int(how[-1])))
    for load in (read_state_dict, load_checkpoint):
        with pytest.raises(PipelineError, match=r"not a tensor file: .*refused to unpickle"):
            load(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PipelineError, match=rf"cannot read checkpoint {path}: .*train the fold "
                                            rf"again \(FORCE=1\)"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Failed writes


def test_a_full_disk_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "sub.csv"
    target.write_text("old\n")
    with pytest.raises(WriteError) as err:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    message = str(err.value)
    assert message.startswith(f"cannot write {target}: no space left on device; free some space")
    assert target.read_text() == "old\n"  # the old content stays
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # the temporary file is gone


def test_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'f.csv'}: permission denied; "
                                         rf"make the folder writable"):
        write_csv_atomic(pd.DataFrame({"id": ["1"]}), tmp_path / "f.csv")


def test_a_file_in_the_way_of_a_folder_is_named(tmp_path):
    (tmp_path / "runs").write_text("a file where a folder should be")
    with pytest.raises(WriteError, match=r"cannot write .*runs/x/log.csv: (file exists|not a "
                                         r"directory)"):
        write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "runs" / "x" / "log.csv")


def test_torch_write_failures_are_named(tmp_path):
    with pytest.raises(WriteError, match=r"cannot write .*best.pt: the write failed with \d+ MB "
                                         r"free"):
        with atomic_path(tmp_path / "best.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass unchanged
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("something else")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_for_real(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError, match=r"permission denied"):
            write_csv_atomic(pd.DataFrame({"a": [1]}), folder / "f.csv")
    finally:
        folder.chmod(0o700)
