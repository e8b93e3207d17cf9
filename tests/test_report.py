"""The competition report (issue: one page to look at): `make report` writes static pages that a
real browser opens from disk; every picture loads, the leaderboard is in CV order, the top
losses show the image the test made impossible to classify, nothing is fetched from outside
the folder, and a page is rebuilt only when what it shows changed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

import pipeline
from pipeline.__main__ import main as cli
from pipeline.base.config import load_config
from pipeline.experiments.layout import Layout
from pipeline.experiments.leaderboard import HEADERS, leaderboard
from pipeline.experiments.manifests import read_manifest

COLOURS = {"red": (0, 0, 230), "green": (0, 200, 0), "blue": (230, 0, 0)}  # BGR
BLANK = "blank"  # a flat blue image labelled red: it looks like every blue one, so no model
# can learn its label
PER_CLASS = 12


def colour_image(path: Path, bgr, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.clip(np.array(bgr)[None, None] + rng.normal(0, 20, (16, 16, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image.astype(np.uint8))


def colour_competition(root: Path) -> Path:
    """Three colour classes, a blank image labelled red, and a test image that is an exact copy
    of a training image (the audit's duplicate)."""
    ids, labels = [], []
    for c, (name, bgr) in enumerate(COLOURS.items()):
        for i in range(PER_CLASS):
            ids.append(f"{name}{i:02d}")
            labels.append(name)
            colour_image(root / "train" / f"{ids[-1]}.png", bgr, seed=100 * c + i)
    flat_blue = np.broadcast_to(np.array(COLOURS["blue"], np.uint8), (16, 16, 3))
    cv2.imwrite(str(root / "train" / f"{BLANK}.png"), np.ascontiguousarray(flat_blue))
    ids.append(BLANK)
    labels.append("red")
    test_ids = [f"t{i}" for i in range(6)]
    for i, image_id in enumerate(test_ids[:-1]):
        colour_image(root / "test" / f"{image_id}.png", list(COLOURS.values())[i % 3], 900 + i)
    shutil.copy(root / "train" / "green03.png", root / "test" / f"{test_ids[-1]}.png")
    pd.DataFrame({"id": ids, "label": labels}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test_ids}).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"id": test_ids, "label": "red"}).to_csv(root / "sample_submission.csv",
                                                          index=False)
    config = {"name": "colours", "root": str(root), "image_path": "{id}.png",
              "classes": list(COLOURS), "metric": "accuracy"}
    (root / "colours.yaml").write_text(yaml.safe_dump(config))
    return root / "colours.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two experiments (4 and 1 epochs), a submission, the audit, and the report."""
    tmp = tmp_path_factory.mktemp("report")
    data = str(colour_competition(tmp / "colours"))
    paths = [f"folds.dir={tmp / 'folds'}", f"runs_dir={tmp / 'runs'}",
             f"submissions_dir={tmp / 'subs'}", f"audit_dir={tmp / 'audit'}",
             f"reports_dir={tmp / 'reports'}"]
    common = [*paths, "folds.n_splits=3", "augment.image_size=16", "train.batch_size=8",
              "train.workers=0", "report.top_losses=3", "report.per_class=2"]

    def run(*argv: str) -> None:
        assert cli([argv[0], "--data", data, *argv[1:], *common]) == 0

    run.flags = ["--data", data, *common]  # a verb's flags, for a run in another process

    run("folds")
    for name, epochs in (("strong", 6), ("weak", 1)):
        for verb in ("train", "predict"):
            run(verb, "--model", "resnet20", "--name", name, f"train.epochs={epochs}",
                "tta.views=hflip")
    run("ensemble", "--models", "strong weak", "ensemble.name=both")
    run("ensemble", "--models", "strong weak", "ensemble.name=chosen", "ensemble.method=auto")
    # after training: its one duplicate group pairs a labelled image with a test image, which
    # constrains no fold, so the trained experiments stay current
    run("audit")
    run("report")
    config = load_config(data, None, common)
    return config, run


def test_the_pages_and_their_pictures_are_written_small(built):
    config, _ = built
    report = Layout.of(config).report
    assert report.index.is_file()
    for name in ("strong", "weak"):
        assert report.experiment(name).is_file()
    pictures = list(report.images.glob("*"))
    shown = sum(text.count('src="') for text in
                (p.read_text() for p in [report.index, *report.dir.glob("experiments/*.html")]))
    assert 0 < len(pictures) <= shown  # only what a page shows
    assert sum(p.stat().st_size for p in pictures) < 2_000_000


def test_no_page_refers_outside_its_folder(built):
    config, _ = built
    report = Layout.of(config).report
    for page in [report.index, *report.dir.glob("experiments/*.html")]:
        text = page.read_text()
        assert not re.search(r"(src|href)=\"(https?:|//)", text), page
        assert "@import" not in text and "url(" not in text
        for ref in re.findall(r"(?:src|href)=\"([^\"#]+)\"", text):
            assert (page.parent / ref).resolve().is_relative_to(report.dir.resolve()), ref


def test_a_page_is_rebuilt_only_when_what_it_shows_changed(built, capsys):
    config, run = built
    report = Layout.of(config).report
    run("report")
    out = capsys.readouterr().out
    assert re.search(r"strong\s+current", out) and re.search(r"index\s+current", out)
    curves = report.images / "weak.curves.png"
    curves.unlink()  # a picture of the weak page is gone: that page alone is drawn again
    run("report")
    out = capsys.readouterr().out
    assert re.search(r"weak\s+written", out) and re.search(r"strong\s+current", out)
    assert curves.is_file()


class ImageSources(HTMLParser):
    """The src of every <img> of a page, as a browser reads them (the test's own reading; the
    stage never parses its pages)."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def shown_on(page: Path) -> set[Path]:
    parser = ImageSources()
    parser.feed(page.read_text())
    return {(page.parent / src).resolve() for src in parser.sources}


def test_a_pages_manifest_lists_exactly_the_pictures_it_shows(built):
    config, _ = built
    report = Layout.of(config).report
    pages = [report.index, report.experiment("strong"), report.experiment("weak")]
    for page in pages:
        outputs = {(page.parent / name).resolve()
                   for name in read_manifest(report.manifest(page)).outputs}
        shown = shown_on(page)
        assert len(shown) > 2, page  # the figures and the tiles
        assert outputs == shown | {page.resolve()}, page
    # and the images folder holds what the pages show, nothing else
    assert {p.resolve() for p in report.images.glob("*")} == set().union(*map(shown_on, pages))


def test_a_report_setting_rebuilds_the_pages_and_an_unrelated_code_edit_does_not(
        built, capsys, tmp_path):
    config, run = built
    run("report", "report.thumbnail=96")
    out = capsys.readouterr().out
    assert re.search(r"strong\s+written", out) and re.search(r"index\s+written", out)
    run("report")  # back to the module's settings
    capsys.readouterr()
    # The same report from a copy of the package whose report code (and the modules that once
    # were fingerprinted with it) were edited: every page stays current.
    package = Path(pipeline.__file__).parent
    shutil.copytree(package, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for edited in ("stages/report.py", "reporting/plots.py", "experiments/leaderboard.py"):
        with open(tmp_path / "pipeline" / edited, "a") as source:
            source.write("\n# an edit that changes no page\n")
    script = ("import sys, pipeline; from pipeline.__main__ import main; "
              f"assert pipeline.__file__.startswith({str(tmp_path)!r}), pipeline.__file__; "
              "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "report", *run.flags],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert re.search(r"strong\s+current", out) and re.search(r"index\s+current", out), out


def test_the_experiment_page_lists_per_class_scores_and_the_differing_settings(built):
    config, _ = built
    text = Layout.of(config).report.experiment("strong").read_text()
    for heading in ("Learning curves", "Confusion matrix", "Per class", "Most confused",
                    "Top losses", "macro avg"):
        assert heading in text
    assert "train.epochs" in text and "tta.views" in text  # both differ from the defaults


# --------------------------------------------------------------------------------------------
# In a real browser


def chromium():
    """A headless Chromium through Selenium, or a skip that says what to install."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no chromium: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--allow-file-access-from-files", "--window-size=1400,1000"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def loaded_images(browser) -> list[tuple[str, int]]:
    return browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth]);")


def resources(browser) -> list[str]:
    return browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);")


def test_the_browser_shows_every_picture_and_the_leaderboard_in_cv_order(built, browser):
    config, _ = built
    report = Layout.of(config).report
    browser.get(report.index.resolve().as_uri())
    images = loaded_images(browser)
    assert images and all(width > 0 for _, width in images), images
    first_column = browser.execute_script(
        "return Array.from(document.querySelectorAll('#leaderboard-table tbody tr'))"
        ".map(r => r.cells[0].innerText);")
    expected = leaderboard(config.data, config.folds, Layout.of(config))["experiment"].tolist()
    assert first_column == expected and set(expected) == {"strong", "weak"}
    status = HEADERS.index("status")
    statuses = browser.execute_script(
        "return Array.from(document.querySelectorAll('#leaderboard-table tbody tr'))"
        f".map(r => r.cells[{status}].innerText);")
    assert statuses == ["complete", "complete"]
    assert "both" in browser.find_element("id", "submissions-table").text
    assert all(name.startswith(report.dir.resolve().as_uri()) for name in resources(browser))


def test_sorting_a_table_works_and_its_nested_tables_do_not_break_it(built, browser):
    config, _ = built
    browser.get(Layout.of(config).report.index.resolve().as_uri())
    column = browser.execute_script("""
        window.failures = [];
        window.addEventListener('error', e => window.failures.push(e.message));
        var table = document.getElementById('leaderboard-table');
        table.tHead.rows[0].cells[0].click();   // by experiment name, ascending
        document.querySelectorAll('details').forEach(d => d.open = true);
        document.querySelectorAll('details th').forEach(th => th.click());
        return Array.from(table.tBodies[0].rows).map(r => r.cells[0].innerText);""")
    assert column == ["strong", "weak"]
    assert browser.execute_script("return window.failures;") == []
    assert "every method (auto)" in browser.find_element("id", "submissions-table").text


def test_the_top_losses_show_the_impossible_image(built, browser):
    config, _ = built
    page = Layout.of(config).report.experiment("strong")
    browser.get(page.resolve().as_uri())
    images = loaded_images(browser)
    assert all(width > 0 for _, width in images), images
    overall = browser.execute_script(
        "var h = Array.from(document.querySelectorAll('h3')).find(x => x.innerText == "
        "'All classes'); return Array.from(h.nextElementSibling.querySelectorAll('.id'))"
        ".map(e => e.innerText);")
    assert BLANK in overall, overall  # among the top 3 of 37 out-of-fold images
    assert all(name.startswith(page.parent.parent.resolve().as_uri())
               for name in resources(browser))


# --------------------------------------------------------------------------------------------
# What the pages show, without a browser


def test_a_grade_heads_top_losses_are_its_grades_furthest_off():
    """A regression head's class columns are two-point distributions (0 beyond the neighbouring
    grades): its losses are how far the grade is, not -log of a probability that is 0."""
    from pipeline.base.task import Scorer
    from pipeline.ensembling.decode import grade_to_probs
    from pipeline.stages.report import losses_of

    grades = np.array([0.1, 3.9, 2.2, 1.0])
    given = ["0", "0", "2", "4"]  # off by 0.1, 3.9, 0.2 and 3.0
    frame = pd.DataFrame({"id": list("abcd"), "label": given})
    frame[[str(c) for c in range(5)]] = grade_to_probs(grades, 5)
    frame["grade"] = grades
    scorer = Scorer(tuple(str(c) for c in range(5)), "qwk", True, 1)
    losses = losses_of(frame, scorer, "regression")
    assert losses["id"].tolist() == ["b", "d", "c", "a"]
    assert losses["predicted"].tolist() == ["4", "1", "2", "0"]


def test_an_experiment_without_a_current_fold_has_no_page_and_no_link(built):
    config, run = built
    layout = Layout.of(config)
    empty = layout.experiment("empty")
    empty.dir.mkdir()
    shutil.copy(layout.experiment("weak").config, empty.config)  # trained nothing yet
    page = layout.report.experiment("empty")
    page.write_text("an old page")
    run("report")
    assert not page.exists()
    index = layout.report.index.read_text()
    assert "empty" in index and "experiments/empty.html" not in index
    shutil.rmtree(empty.dir)
    run("report")


def test_a_finding_made_from_other_images_is_marked_stale(built):
    """Last: it changes an image, so every experiment of the module's competition is stale."""
    config, run = built
    image = Path(config.data.root_path) / "train" / "red00.png"
    colour_image(image, COLOURS["red"], seed=12345)
    run("report")
    index = Layout.of(config).report.index.read_text()
    assert "stale: the images or labelled rows changed since the audit" in index
