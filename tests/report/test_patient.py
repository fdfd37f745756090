"""The patient page: every number on it equals a value stored with the run (recomputed here
from the run's files where the page derives it), no number appears untagged, the page is
self-contained, and it renders in headless Chromium with no console error and no request."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.errors import ConfigError
from oncoslide.report.patient import DISCLAIMER, ReportConfig, patient_report

from .conftest import ExplainedWorld

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class _Spans(HTMLParser):
    """The tagged numbers (key, text) and the visible text outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[tuple[str, str]] = []
        self.untagged: list[str] = []
        self._key: str | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("style", "title"):
            self._skip += 1
        if tag == "span" and a.get("class") == "num":
            self._key = a["data-key"]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "title"):
            self._skip -= 1
        if tag == "span":
            self._key = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._key is not None:
            self.numbers.append((self._key, data))
        else:
            self.untagged.append(data)


def assert_shown(text: str, value: float, spec: str) -> None:
    """``text`` is ``value`` rounded as ``spec`` says (".3f": 3 decimals, ".1e": scientific)."""
    decimals = int(spec[1:-1])
    if spec.endswith("e"):
        assert float(text) == pytest.approx(value, rel=0.5 * 10**-decimals + 1e-12)
    else:
        assert float(text) == pytest.approx(value, abs=0.5 * 10**-decimals + 1e-12)


@pytest.fixture(scope="module")
def page(explained_world: ExplainedWorld, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    world = explained_world
    preds = pd.read_parquet(world.run / "predictions.parquet")
    # a patient with both raising and lowering prototypes
    table = world.explained.patients
    signs = table.groupby("patient_id")["contribution"].agg(["min", "max"])
    pid = str(signs[(signs["min"] < 0) & (signs["max"] > 0)].index[0])
    assert pid in set(preds["patient_id"])
    out = tmp_path_factory.mktemp("report") / pid
    result = patient_report(world.run, world.cohort, pid, out_dir=out)
    return world, pid, result


def test_every_number_on_the_page_equals_the_stored_value(page: tuple) -> None:
    world, pid, result = page
    text = result.html.read_text()
    parser = _Spans()
    parser.feed(text)
    numbers = result.values["numbers"]
    assert len(parser.numbers) >= 15
    for key, shown in parser.numbers:
        assert key in numbers, key
        assert_shown(shown, numbers[key], result.values["formats"][key])
    # no number outside a tagged span (ids and pattern names aside)
    slides = world.cohort.slide_ids(pid)
    loose = " ".join(parser.untagged)
    for ident in [*slides, pid]:
        loose = loose.replace(ident, "")
    loose = re.sub(r"\bP\d+\b", "", loose)
    assert not re.search(r"\d", loose), re.findall(r".{30}\d.{30}", loose)

    # the stored values are the run's (recomputed here from its files)
    preds = pd.read_parquet(world.run / "predictions.parquet")
    own = preds[preds["patient_id"] == pid].iloc[0]
    assert numbers["risk"] == pytest.approx(float(own["risk"]), abs=1e-12)
    assert numbers["risk_threshold"] == pytest.approx(float(own["risk_threshold"]), abs=1e-12)
    assert numbers["fold"] == own["fold"]
    same = preds[preds["fold"] == own["fold"]]
    assert numbers["fold.n_others"] == len(same) - 1
    assert numbers["fold.n_lower"] == int((same["risk"] < own["risk"]).sum())
    boot = np.asarray(result.values["bootstrap_scores"])
    assert len(boot) == numbers["bootstrap.n"] == 200
    assert numbers["bootstrap.lower"] == pytest.approx(np.percentile(boot, 2.5))
    assert numbers["bootstrap.upper"] == pytest.approx(np.percentile(boot, 97.5))
    assert numbers["bootstrap.share_high_pct"] == pytest.approx(
        100 * (boot > own["risk_threshold"]).mean()
    )
    # the bootstrap is around the stored score (it resamples that patient's own patches)
    assert np.percentile(boot, 2.5) <= own["risk"] <= np.percentile(boot, 97.5)
    high = preds["risk"] > preds["risk_threshold"]
    group = "high" if own["risk"] > own["risk_threshold"] else "low"
    assert result.values["group"] == group
    for name, members in (("high", preds[high]), ("low", preds[~high])):
        assert numbers[f"km.{name}.n"] == len(members)
        assert numbers[f"km.{name}.events"] == int(members["event"].sum())
        median = KaplanMeierFitter().fit(members["time"], members["event"]).median_survival_time_
        if math.isfinite(median):
            assert numbers[f"km.{name}.median"] == pytest.approx(median)
        else:
            assert f"km.{name}.median" not in numbers
    p = logrank_test(
        preds[high]["time"],
        preds[~high]["time"],
        event_observed_A=preds[high]["event"],
        event_observed_B=preds[~high]["event"],
    ).p_value
    assert numbers["km.logrank_p"] == pytest.approx(p)
    rows = pd.read_csv(world.run / "explain" / "patients.csv", dtype={"patient_id": str})
    rows = rows[rows["patient_id"] == pid].set_index("prototype")
    protos = pd.read_csv(world.run / "explain" / "prototypes.csv").set_index("prototype")
    shown = {k.split(".")[1] for k in numbers if k.startswith("prototype.")}
    assert shown
    for name in shown:
        key = f"prototype.{name}"
        assert numbers[key + ".share_pct"] == pytest.approx(100 * rows.loc[name, "share"])
        assert numbers[key + ".attention_pct"] == pytest.approx(
            100 * rows.loc[name, "attention_share"]
        )
        assert numbers[key + ".abs_contribution"] == pytest.approx(
            abs(rows.loc[name, "contribution"])
        )
        assert numbers[key + ".risk_corr"] == pytest.approx(protos.loc[name, "risk_corr"])
    # the raising sentence names the patient's largest positive contribution
    top = rows["contribution"].idxmax()
    assert f"pattern {top}: it makes up" in text


def test_the_page_is_self_contained_and_says_it_is_no_diagnosis(page: tuple) -> None:
    _, _, result = page
    text = result.html.read_text()
    assert html.escape(DISCLAIMER) in text and "not a diagnosis" in text
    assert "<script" not in text.lower()
    for ref in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert ref.startswith("data:image/png;base64,"), ref[:60]
    assert not re.search(r"https?://", text)
    assert "url(" not in text  # CSS loads nothing either
    summary = (result.html.parent / "summary.txt").read_text()
    assert "risk score" in summary and "<" not in summary


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.is_file() and shutil.which(binary.name) is None:
            pytest.skip(f"{binary} is absent: install chromium and chromium-driver to run this")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_page_in_a_real_browser(page: tuple, browser: object) -> None:
    _, pid, result = page
    driver = browser
    driver.get_log("performance")  # drop what came before
    url = result.html.resolve().as_uri()
    driver.get(url)
    assert pid in driver.title
    severe = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert severe == []
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    # the page itself, and nothing but its own data: images
    assert requests and all(r == url or r.startswith("data:") for r in requests), requests
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )
    assert all(r.startswith("data:") for r in resources), resources
    images = driver.execute_script(
        "return Array.from(document.images, i => [i.complete, i.naturalWidth]);"
    )
    assert len(images) >= 2 and all(ok and w > 0 for ok, w in images), images
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('span.num'),"
        " s => [s.dataset.key, s.textContent]);"
    )
    numbers = result.values["numbers"]
    assert shown
    for key, text in shown:
        assert_shown(text, numbers[key], result.values["formats"][key])
    notice = driver.execute_script("return document.getElementById('not-a-diagnosis').innerText;")
    assert "not a diagnosis" in notice


def test_cli_report_and_refusals(page: tuple, tmp_path: Path) -> None:
    world, pid, _ = page
    runner = CliRunner()
    args = ["--cohort", str(world.sim / "cohort.csv"), "--features", str(world.sim / "features")]
    out = tmp_path / "pages"
    done = runner.invoke(
        app, ["report", str(world.run), "-p", pid, "--n-boot", "50", "--out", str(out), *args]
    )
    assert done.exit_code == 0, done.output
    assert (out / pid / "report.html").is_file()
    stored = json.loads((out / pid / "report.json").read_text())
    assert stored["settings"]["n_boot"] == 50
    unknown = runner.invoke(app, ["report", str(world.run), "-p", "nobody", *args])
    assert unknown.exit_code == 2 and "nobody" in unknown.output
    with pytest.raises(ConfigError, match="n_boot"):
        ReportConfig(n_boot=5)
    # a run without explain/ is refused by the library (the CLI runs explain first)
    bare = tmp_path / "bare"
    shutil.copytree(world.run, bare, ignore=shutil.ignore_patterns("explain", "reports"))
    with pytest.raises(ConfigError, match="oncoslide explain"):
        patient_report(bare, world.cohort, pid)
