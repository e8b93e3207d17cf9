"""`make submit` and `make lb` against a fake `kaggle` package: a module of that name with the
real package's behaviour (kaggle 2.x: `import kaggle` authenticates and goes on without
credentials, `kaggle.api.authenticate()` prints and exits; 1.7-1.8 exit at import), its
method names (`competition_submit`, `competition_submissions` a page at a time) and return
types (kagglesdk's own ApiCreateSubmissionResponse and ApiSubmission; with FAKE_KAGGLE_LEGACY
the camelCase `fileName`, `publicScore`, `privateScore` of kaggle 1.5-1.6), and requests' own
exceptions for what Kaggle answers. Nothing of the pipeline is replaced."""

from __future__ import annotations

import shutil
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import requests

from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.experiments.layout import Layout
from pipeline.experiments.public_scores import (
    chasing_flags,
    cv_lb_correlation,
    drift_flags,
    lb_flags,
)
from pipeline.stages.report import build_report
from tests.conftest import dry_make
from tests.test_ensemble import TEST_IDS, member_probs, write_competition, write_run

FAKE_KAGGLE = textwrap.dedent('''
    """A stand-in for the `kaggle` package: kagglesdk's own types (the package's dependency),
    or with FAKE_KAGGLE_LEGACY=1 the camelCase objects of kaggle 1.5-1.6; its server is this
    process."""
    import os
    from datetime import datetime, timedelta

    import requests
    from kagglesdk.competitions.types.competition_api_service import (
        ApiCreateSubmissionResponse, ApiSubmission)
    from kagglesdk.competitions.types.submission_status import SubmissionStatus

    LEGACY = bool(os.environ.get("FAKE_KAGGLE_LEGACY"))

    class LegacySubmission:  # kaggle 1.5-1.6's fields
        def __init__(self, ref, date, description, fileName):
            self.ref, self.date, self.description, self.fileName = ref, date, description, fileName
            self.status, self.publicScore, self.privateScore = "pending", None, None

    def submission(ref, date, description, file_name):
        if LEGACY:
            return LegacySubmission(ref, str(date), description, file_name)
        s = ApiSubmission()
        s.ref, s.date, s.description, s.file_name = ref, date, description, file_name
        return s

    class KaggleApi:
        def __init__(self):
            self.submissions, self.fail_next, self.next_ref = [], None, 1000
            self.clock = datetime(2026, 12, 1)

        def authenticate(self):
            if os.environ.get("FAKE_KAGGLE_OFFLINE"):  # 2.x checks a token with Kaggle
                raise requests.ConnectionError("Max retries exceeded with url: /api/i/security")
            if os.environ.get("KAGGLE_API_TOKEN") or os.path.exists(
                    os.path.expanduser("~/.kaggle/kaggle.json")):
                return
            print("Authentication required to call the Kaggle API.")
            exit(1)

        def _answer(self):
            if self.fail_next is not None:
                err, self.fail_next = self.fail_next, None
                raise err

        def competition_submit(self, file_name, message, competition, quiet=False,
                               sandbox=False):
            self._answer()
            self.clock += timedelta(hours=1)
            self.submissions.insert(0, submission(self.next_ref, self.clock, message,
                                                  os.path.basename(file_name)))
            self.competition, self.next_ref = competition, self.next_ref + 1
            answer = ApiCreateSubmissionResponse()
            answer.message, answer.ref = "Successfully submitted", self.next_ref - 1
            return answer

        def competition_submissions(self, competition, group=None, sort=None, page_number=-1,
                                    page_token="", page_size=20):
            self._answer()
            if LEGACY:  # no pages
                return list(self.submissions)
            first = (max(page_number, 1) - 1) * page_size
            return self.submissions[first:first + page_size]  # newest first, as Kaggle lists

        def scored(self, ref, public, private=""):  # what Kaggle does after an upload
            for s in self.submissions:
                if s.ref == ref and LEGACY:
                    s.status, s.publicScore, s.privateScore = "complete", public, private
                elif s.ref == ref:
                    s.status, s.public_score, s.private_score = (
                        SubmissionStatus.COMPLETE, public, private)

    api = KaggleApi()
    if os.environ.get("FAKE_KAGGLE_EXIT_AT_IMPORT"):  # kaggle 1.7-1.8
        api.authenticate()
    else:  # kaggle 2.x
        try:
            api.authenticate()
        except (Exception, SystemExit):
            pass
''')


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """The fake package first on the path, credentials in the environment; yields a function
    that returns the package's `api` (the same object the pipeline gets)."""
    folder = tmp_path / "fake_site" / "kaggle"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(FAKE_KAGGLE)
    monkeypatch.syspath_prepend(str(folder.parent))
    monkeypatch.delitem(sys.modules, "kaggle", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_API_TOKEN", "a-token")
    yield lambda: sys.modules["kaggle"].api
    sys.modules.pop("kaggle", None)


def competition_with_submission(tmp_path, *, kaggle="comp-on-kaggle", partial=False):
    """Two members and their ensemble's submission, by the real `make ensemble`."""
    extra = {"kaggle": kaggle} if kaggle else {}
    # images: the report shows the worst mistakes
    data_path, overrides = write_competition(tmp_path, ["cat", "dog", "fox"], images=True, **extra)
    config = load_config(data_path, None, overrides)
    targets = pd.read_csv(tmp_path / "folds" / "comp.csv")["label"].map(
        {"cat": 0, "dog": 1, "fox": 2}).to_numpy()
    test_truth = np.arange(len(TEST_IDS)) % 3
    write_run(config, "alpha", member_probs(targets, 3, 2.0, 1),
              lambda k: member_probs(test_truth, 3, 2.0, 30 + k),
              folds=[0, 1] if partial else None)
    write_run(config, "beta", member_probs(targets, 3, 1.5, 2),
              lambda k: member_probs(test_truth, 3, 1.5, 40 + k))
    assert cli(["ensemble", "--data", data_path, *overrides, *(["--partial"] if partial else [])]) == 0
    return data_path, overrides, config


def file_of(submission) -> str:
    return getattr(submission, "file_name", None) or submission.fileName


def uploads_of(config) -> pd.DataFrame:
    return pd.read_csv(Layout.of(config).public_leaderboard, dtype={"ref": str},
                       keep_default_na=False, na_values={"public": [""], "private": [""]})


@pytest.mark.parametrize("legacy", [False, True], ids=["kagglesdk", "kaggle-1.6"])
def test_submit_records_the_reference_and_lb_fetches_the_scores(tmp_path, fake_kaggle, capsys,
                                                                monkeypatch, legacy):
    if legacy:
        monkeypatch.setenv("FAKE_KAGGLE_LEGACY", "1")
    data_path, overrides, config = competition_with_submission(tmp_path)
    layout = Layout.of(config)
    [csv] = layout.submissions.glob("alpha+beta_cv*.csv")
    manifest = pd.read_json(csv.with_suffix(".manifest.json"), typ="series")
    capsys.readouterr()

    assert cli(["submit", "--data", data_path, *overrides, "--message", "first try"]) == 0
    api = fake_kaggle()
    [sent] = api.submissions
    assert api.competition == "comp-on-kaggle" and file_of(sent) == csv.name
    cv, spread = manifest["details"]["cv"], manifest["details"]["cv_fold_std"]
    assert 0 < spread < 0.5
    assert sent.description.startswith(f"first try | {csv.stem}: alpha+beta | "
                                       f"CV accuracy {cv:.4f} ± {spread:.4f} (nested) | pipeline ")
    [row] = uploads_of(config).to_dict("records")
    assert row["submission"] == csv.stem and row["ref"] == "1000" and row["status"] == "pending"
    assert row["cv"] == pytest.approx(cv) and np.isnan(row["public"])
    assert "make lb" in capsys.readouterr().out

    # Kaggle scores it; a second upload by hand (the kaggle command) joins unnamed
    api.scored(1000, "0.61234")
    api.competition_submit("by-hand.csv", "tried by hand", "comp-on-kaggle")
    assert cli(["lb", "--data", data_path, *overrides]) == 0
    table = uploads_of(config)
    assert table["ref"].tolist() == ["1000", "1001"]
    assert table.loc[0, "public"] == pytest.approx(0.61234) and table.loc[0, "status"] == "complete"
    assert table.loc[1, "submission"] == "" and table.loc[1, "description"] == "tried by hand"
    assert layout.public_leaderboard_plot.is_file()
    out = capsys.readouterr().out
    assert "0.6123" in out and "the correlation needs three" in out

    # make runs and the report show the upload beside the CV, with the plot
    assert cli(["runs", "--data", data_path, *overrides]) == 0
    assert "public LB" in capsys.readouterr().out
    index = build_report(config.model_copy(update={"reports_dir": str(tmp_path / "reports")}))
    html = index.read_text()
    assert "cv_vs_lb.png" in html and "0.6123" in html and "tried by hand" in html
    assert (index.parent / "images" / "cv_vs_lb.png").stat().st_size > 5000


def test_the_newest_current_submission_unless_named(tmp_path, fake_kaggle):
    data_path, overrides, config = competition_with_submission(tmp_path)
    assert cli(["ensemble", "--data", data_path, *overrides, "--models", "beta"]) == 0
    newest = max(Layout.of(config).submissions.glob("*.csv"), key=lambda p: p.stat().st_mtime)
    assert cli(["submit", "--data", data_path, *overrides]) == 0
    assert fake_kaggle().submissions[0].file_name == newest.name == "beta_cv" + \
        newest.stem.split("_cv")[1] + ".csv"
    [older] = [p for p in Layout.of(config).submissions.glob("alpha+*.csv")]
    assert cli(["submit", "--data", data_path, *overrides, "--name", older.stem]) == 0
    assert fake_kaggle().submissions[0].file_name == older.name
    assert uploads_of(config)["submission"].tolist() == [newest.stem, older.stem]


def test_a_stale_submission_is_refused_with_the_remedy(tmp_path, fake_kaggle, capsys):
    data_path, overrides, config = competition_with_submission(tmp_path)
    [csv] = Layout.of(config).submissions.glob("*.csv")
    # beta trained again, with other results: the submission no longer describes it
    shutil.rmtree(Layout.of(config).experiment("beta").dir)
    targets = np.arange(60) % 3
    write_run(config, "beta", member_probs(targets, 3, 0.5, 7),
              lambda k: member_probs(np.arange(len(TEST_IDS)) % 3, 3, 0.5, 70 + k))
    capsys.readouterr()
    assert cli(["submit", "--data", data_path, *overrides]) == 1
    err = capsys.readouterr().err
    assert f"{csv.stem} no longer describes its members" in err
    remedy = f"make predict ensemble MODELS='alpha beta' DATA={data_path}"
    assert remedy in err and "then `make submit" in err
    # refused before Kaggle is asked anything
    assert "kaggle" not in sys.modules and not Layout.of(config).public_leaderboard.exists()
    # the remedy, as printed (the test's folders added), then the upload
    for verb in ("predict", "ensemble"):
        assert cli([verb, "--models", "alpha beta", "--data", data_path, *overrides]) == 0
    assert cli(["submit", "--data", data_path, *overrides]) == 0
    assert fake_kaggle().submissions[0].file_name != csv.name


def test_a_partial_submission_is_refused_unless_partial(tmp_path, fake_kaggle, capsys):
    data_path, overrides, config = competition_with_submission(tmp_path, partial=True)
    [csv] = Layout.of(config).submissions.glob("*.csv")
    capsys.readouterr()
    assert cli(["submit", "--data", data_path, *overrides]) == 1
    err = capsys.readouterr().err
    assert "was made from a partial set of folds" in err
    assert f"make submit NAME={csv.stem} PARTIAL=1" in err
    assert cli(["submit", "--data", data_path, *overrides, "--name", csv.stem, "--partial"]) == 0
    assert fake_kaggle().submissions[0].file_name == csv.name


def http_error(status: int, text: str) -> requests.HTTPError:
    """What requests raises for a Kaggle answer of `status` (raise_for_status)."""
    response = requests.Response()
    response.status_code, response._content = status, text.encode()
    response.url = "https://www.kaggle.com/api/v1/competitions/submissions/submit/comp"
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize("error, said", [
    (http_error(403, "Permission 'competitions.submit' was denied"),
     "Kaggle refused (403): accept the competition's rules on "
     "https://www.kaggle.com/competitions/comp-on-kaggle/rules"),
    (http_error(400, "Submission not allowed: Your team has used its daily Submission "
                     "allowance (5) today"), "submit again after midnight UTC"),
    (http_error(404, "Not found"), "Kaggle knows no competition 'comp-on-kaggle' (404)"),
    (http_error(401, "Unauthorized"), "Kaggle refused the credentials (401): generate a token"),
    (http_error(429, "Too Many Requests"), "Kaggle asks for fewer requests (429): wait a minute"),
    (http_error(400, "Submission file size limit exceeded"), "Kaggle answered 400: Submission "
                                                             "file size limit exceeded"),
    (requests.ConnectionError("Max retries exceeded with url: /api/v1"),
     "could not reach Kaggle (ConnectionError"),
])
def test_kaggle_errors_each_get_their_message(tmp_path, fake_kaggle, capsys, error, said):
    data_path, overrides, config = competition_with_submission(tmp_path)
    import kaggle  # the fake, as the pipeline will import it

    kaggle.api.fail_next = error
    capsys.readouterr()
    assert cli(["submit", "--data", data_path, *overrides]) == 1
    assert said in capsys.readouterr().err
    assert not Layout.of(config).public_leaderboard.exists()  # nothing recorded
    kaggle.api.fail_next = error
    assert cli(["lb", "--data", data_path, *overrides]) == 1
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("at_import", [False, True], ids=["kaggle-2.x", "kaggle-1.7"])
def test_missing_credentials_say_where_to_put_them(tmp_path, fake_kaggle, monkeypatch, capsys,
                                                   at_import):
    data_path, overrides, _ = competition_with_submission(tmp_path)
    monkeypatch.delenv("KAGGLE_API_TOKEN")
    if at_import:
        monkeypatch.setenv("FAKE_KAGGLE_EXIT_AT_IMPORT", "1")
    capsys.readouterr()
    assert cli(["submit", "--data", data_path, *overrides]) == 1
    captured = capsys.readouterr()
    assert "Kaggle found no credentials: generate a token at https://www.kaggle.com/settings/api" \
        in captured.err
    assert "Authentication required" not in captured.out  # the package's page is held back
    # as the message says: a kaggle.json in ~/.kaggle
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert cli(["submit", "--data", data_path, *overrides]) == 0


def test_no_network_while_the_token_is_checked_is_no_credentials_problem(tmp_path, fake_kaggle,
                                                                        monkeypatch, capsys):
    data_path, overrides, _ = competition_with_submission(tmp_path)
    monkeypatch.setenv("FAKE_KAGGLE_OFFLINE", "1")
    capsys.readouterr()
    assert cli(["submit", "--data", data_path, *overrides]) == 1
    err = capsys.readouterr().err
    assert "could not reach Kaggle (ConnectionError" in err and "no credentials" not in err


def test_lb_reads_every_page_and_names_a_hand_upload_of_a_known_submission(tmp_path, fake_kaggle,
                                                                          capsys):
    data_path, overrides, config = competition_with_submission(tmp_path)
    [csv] = Layout.of(config).submissions.glob("*.csv")
    assert cli(["submit", "--data", data_path, *overrides]) == 0
    api = fake_kaggle()
    api.scored(1000, "0.7")
    for i in range(150):  # uploads by hand, newer than ours: ours is on the second page
        api.competition_submit(f"try{i}.csv", f"try {i}", "comp-on-kaggle")
    api.competition_submit(str(csv), "the same file, by hand", "comp-on-kaggle")
    assert cli(["lb", "--data", data_path, *overrides]) == 0
    table = uploads_of(config)
    assert len(table) == 152 and table.loc[0, "public"] == pytest.approx(0.7)
    by_hand = table[table["description"] == "the same file, by hand"].iloc[0]
    assert by_hand["submission"] == csv.stem and by_hand["cv"] == pytest.approx(table.loc[0, "cv"])


def test_a_long_note_is_shortened_never_the_facts(tmp_path, fake_kaggle):
    data_path, overrides, _ = competition_with_submission(tmp_path)
    assert cli(["submit", "--data", data_path, *overrides, "--message", "x" * 400]) == 0
    sent = fake_kaggle().submissions[0].description
    assert len(sent) <= 250 and sent.startswith("xxx") and "CV accuracy 0.9500" in sent
    assert "| pipeline 0.2.0" in sent


def test_a_competition_without_its_kaggle_name_says_where_to_set_it(tmp_path, fake_kaggle,
                                                                      capsys):
    data_path, overrides, _ = competition_with_submission(tmp_path, kaggle=None)
    capsys.readouterr()
    assert cli(["submit", "--data", data_path, *overrides]) == 1
    assert f"{data_path} does not name the competition on Kaggle: add `kaggle: <name>`" in \
        capsys.readouterr().err


def test_make_passes_name_message_and_partial():
    out = dry_make("submit", "DATA=aptos", "NAME=a+b_cv0.9", "MESSAGE=with tta", "PARTIAL=1").stdout
    assert 'pipeline submit --data aptos --name "a+b_cv0.9" --message "with tta" --partial' in out
    assert "pipeline lb --data aptos" in dry_make("lb", "DATA=aptos").stdout


def uploads(cv, public, std=0.01) -> pd.DataFrame:
    n = len(cv)
    return pd.DataFrame({"submission": [f"s{i}" for i in range(n)], "ref": [str(i) for i in range(n)],
                         "date": [f"2026-12-0{i + 1}" for i in range(n)], "description": "",
                         "cv": cv, "cv_std": std, "members": "", "status": "complete",
                         "public": public, "private": np.nan})


def test_the_public_lb_chasing_flag_fires_on_a_planted_sequence_only():
    # CV flat or falling while each upload beats the public LB: chosen by the public LB
    planted = uploads([0.850, 0.848, 0.846, 0.849], [0.800, 0.805, 0.811, 0.815])
    flags = chasing_flags(planted, "qwk")
    assert [f.split(":")[0] for f in flags] == ["s1", "s2", "s3"]
    assert "choose the final submissions by CV" in flags[0]
    # CV and LB rising together, with the noise of a real leaderboard
    consistent = uploads([0.800, 0.820, 0.815, 0.840], [0.790, 0.812, 0.801, 0.833])
    assert chasing_flags(consistent, "qwk") == [] and lb_flags(consistent, "qwk") == []
    assert cv_lb_correlation(consistent) > 0.95
    # log loss: lower is better, the same planted sequence mirrored
    assert len(chasing_flags(uploads([0.30, 0.31, 0.32], [0.40, 0.39, 0.38]), "log_loss")) == 2


def test_the_drift_flag_compares_the_gap_with_the_folds_spread():
    table = uploads([0.85, 0.85], [0.84, 0.78], std=0.02)
    [flag] = drift_flags(table)
    assert flag.startswith("s1: public LB 0.7800 is -0.0700 from its CV 0.8500, more than 2x")
    assert drift_flags(uploads([0.85], [0.78], std=np.nan)) == []  # no spread known: no flag
