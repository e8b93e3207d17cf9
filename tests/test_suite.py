"""The benchmark suite's wiring (bench/suite.py --quick): every member is made with its
held-out part, every recipe runs through train, predict and ensemble, and the table has a
held-out row for each (two members in the fast suite; all six, and the audit benchmark, under
the `slow` marker: they take two minutes together)."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.audit_effects import main as audit_effects_main
from bench.suite import main as suite_main
from bench.suite_data import MEMBERS, export_suite


def test_the_members_have_held_out_parts_and_their_kinds(tmp_path):
    configs = export_suite(tmp_path, n=60)
    assert sorted(configs) == sorted(MEMBERS)
    for name, path in configs.items():
        train = pd.read_csv(path.parent / name / "train.csv", dtype=str)
        solution = pd.read_csv(path.parent / name / "solution.csv", dtype=str)
        assert len(train) == 60 and len(solution) >= 19
        assert not set(train.iloc[:, 0]) & set(solution.iloc[:, 0])  # no test row is labelled
    ordinal = pd.read_csv(tmp_path / "ordinal-look" / "train.csv", dtype=str)
    assert ordinal["label"].value_counts(normalize=True)["0"] > 0.6  # imbalanced, as retina
    binary = pd.read_csv(tmp_path / "binary" / "train.csv", dtype=str)
    assert 0.2 <= (binary["label"] == "pos").mean() <= 0.3
    many = pd.read_csv(tmp_path / "many-classes" / "train.csv", dtype=str)
    assert many["label"].nunique() == 30 and many["label"].value_counts().max() <= 30
    flipped = pd.read_csv(tmp_path / "noisy-labels" / "flipped.csv", dtype=str)
    assert len(flipped) == round(0.08 * 60) and (flipped["given"] != flipped["true"]).all()


def quick_suite_rows(tmp_path, capsys, *members: str) -> list[list[str]]:
    chosen = ["--members", ",".join(members)] if members else []
    suite_main(["--quick", "--no-record", "--recipes", "default,both", *chosen,
                "--work", str(tmp_path)])
    out = capsys.readouterr().out
    return [line.split() for line in out[out.index("Benchmark suite"):].splitlines()]


def test_the_quick_suite_runs_the_heads_on_ordinal_members_only(tmp_path, capsys):
    rows = quick_suite_rows(tmp_path, capsys, "digits", "ordinal-look")
    assert any(r[:2] == ["digits", "default"] for r in rows)
    assert any(r[:2] == ["ordinal-look", "default"] for r in rows)
    assert any(r[:2] == ["ordinal-look", "both"] for r in rows)  # the heads: ordinal members only
    assert not any(r[:2] == ["digits", "both"] for r in rows)


@pytest.mark.slow
def test_the_quick_suite_writes_a_held_out_row_for_every_member_and_recipe(tmp_path, capsys):
    rows = quick_suite_rows(tmp_path, capsys)
    for member in MEMBERS:
        assert any(r[:2] == [member, "default"] for r in rows), member
    for member in ("ordinal-amount", "ordinal-look"):
        assert any(r[:2] == [member, "both"] for r in rows), member
    assert not any(r[:2] == ["digits", "both"] for r in rows)


@pytest.mark.slow
def test_the_quick_audit_benchmark_measures_both_effects(capsys):
    audit_effects_main(["--quick", "--no-record"])
    out = capsys.readouterr().out
    assert "split at random" in out and "kept in one fold" in out
    suspects = out[out.index("Label suspects"):].splitlines()
    row = next(line.split() for line in suspects if line.split()[:1] == ["0"])
    assert len(row) == 7 and 0 <= float(row[2]) <= 1 and 0 <= float(row[3]) <= 1
