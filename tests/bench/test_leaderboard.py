"""The static leaderboard page: structure, escaping, CSV exports, ROC and reliability figures,
and a real headless browser.

The scores and ranking are computed here by hand from a synthetic prediction frame (lifelines'
concordance index, scikit-learn's AUC, ranks by estimate), independently of the benchmark's
statistics module; so are the areas of the ROC curves (scikit-learn) and the reliability bins.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from PIL import Image
from sklearn.metrics import roc_auc_score

from oncoslide.bench.leaderboard import (
    LeaderboardData,
    entry_name,
    format_estimate,
    render_leaderboard,
)
from oncoslide.errors import ConfigError

FEATURE_SETS = ("uni", "ctp<v2>")  # "<v2>" checks that every text is escaped
MODELS = {"abmil": "mil", "linear": "linear"}
SURVIVAL, BINARY = "os", "msi, status"  # the comma checks CSV quoting of rank:<task> headers
SEEDS = (7, 2)  # the Kaplan-Meier figure uses the smallest seed, not the first listed
N_PATIENTS, N_FOLDS = 48, 4
EXCLUDED = 39  # ctp<v2> lacks features of 39 patients: 9 vs 48 patients sorts differently as text
STRENGTH = {
    ("uni", "abmil"): 3.0,
    ("uni", "linear"): 1.0,
    ("ctp<v2>", "abmil"): 2.0,
    ("ctp<v2>", "linear"): 0.3,
}
IBS = {  # unequal decimal lengths: sorting them as text would misorder them
    ("uni", "abmil"): 0.125,
    ("uni", "linear"): 0.25,
    ("ctp<v2>", "abmil"): 0.0625,
    ("ctp<v2>", "linear"): 0.5,
}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# ------------------------------------------------------------------------------ synthetic data


def _predictions() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    patients = [f"TCGA-{i:02d}" for i in range(N_PATIENTS)]
    signal = rng.normal(size=N_PATIENTS)
    event_time = rng.exponential(np.exp(-signal))
    censor_time = rng.exponential(2.0, size=N_PATIENTS)
    time_ = np.minimum(event_time, censor_time)
    event = (event_time <= censor_time).astype(float)
    label = np.where(signal + rng.normal(scale=0.8, size=N_PATIENTS) > 0, "MSI", "MSS")
    rows = []
    for (feature_set, model), strength in STRENGTH.items():
        keep = range(EXCLUDED, N_PATIENTS) if feature_set == "ctp<v2>" else range(N_PATIENTS)
        for seed in SEEDS:
            folds = np.random.default_rng(seed).permutation(N_PATIENTS) % N_FOLDS
            noise = rng.normal(size=N_PATIENTS)
            score = strength * signal + noise
            for i in keep:
                common = {
                    "cell_key": f"{feature_set}/{model}/{seed}/{folds[i]}",
                    "feature_set": feature_set,
                    "model": model,
                    "protocol": MODELS[model],
                    "seed": seed,
                    "fold": int(folds[i]),
                    "patient_id": patients[i],
                }
                rows.append(
                    {
                        **common,
                        "task": SURVIVAL,
                        "time": time_[i],
                        "event": event[i],
                        "label": None,
                        "risk": score[i],
                    }
                )
                p_msi = 1 / (1 + np.exp(-score[i]))
                rows.append(
                    {
                        **common,
                        "task": BINARY,
                        "time": np.nan,
                        "event": np.nan,
                        "label": label[i],
                        "prob_MSI": p_msi,
                        "prob_MSS": 1 - p_msi,
                    }
                )
    return pd.DataFrame(rows)


def _estimate(task: str, part: pd.DataFrame) -> float:
    """Primary metric of one entry: mean over seeds of the pooled-fold estimate."""
    values = []
    for _, seed_part in part.groupby("seed"):
        if task == SURVIVAL:
            values.append(
                concordance_index(seed_part["time"], -seed_part["risk"], seed_part["event"])
            )
        else:
            values.append(roc_auc_score(seed_part["label"] == "MSI", seed_part["prob_MSI"]))
    return float(np.mean(values))


def _scores(preds: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (task, feature_set, model), part in preds.groupby(["task", "feature_set", "model"]):
        estimate = _estimate(task, part)
        survival = task == SURVIVAL
        rows.append(
            {
                "task": task,
                "kind": "survival" if survival else "binary",
                "metric": "c_index" if survival else "auc",
                "feature_set": feature_set,
                "model": model,
                "protocol": MODELS[model],
                "estimate": estimate,
                "lower": estimate - 0.04,
                "upper": estimate + 0.03,
                "n_patients": part["patient_id"].nunique(),
                "mean:ibs": IBS[feature_set, model] if survival else np.nan,
                "mean:balanced_accuracy": np.nan if survival else estimate - 0.1,
            }
        )
    return pd.DataFrame(rows)


def _ranking(scores: pd.DataFrame) -> pd.DataFrame:
    ranks = scores.assign(rank=scores.groupby("task")["estimate"].rank(ascending=False))
    wide = ranks.pivot(index=["feature_set", "model"], columns="task", values="rank")
    per_task = wide.to_numpy()
    ranking = pd.DataFrame(
        {
            "feature_set": [f for f, _ in wide.index],
            "model": [m for _, m in wide.index],
            "protocol": [MODELS[m] for _, m in wide.index],
            "mean_rank": per_task.mean(axis=1),
            "rank_sd": per_task.std(axis=1),
            "rank_lo": per_task.min(axis=1),
            "rank_hi": per_task.max(axis=1),
            "n_tasks": per_task.shape[1],
        }
    )
    for j, task in enumerate(wide.columns):
        ranking[f"rank:{task}"] = per_task[:, j]
    return ranking


def _tasks(preds: pd.DataFrame) -> pd.DataFrame:
    survival = preds[preds["task"] == SURVIVAL].drop_duplicates("patient_id")
    split = f"{N_FOLDS}-fold patient-level CV x {len(SEEDS)} seeds"
    excluded = f"ctp<v2>: {EXCLUDED} patients without features"
    return pd.DataFrame(
        [
            [SURVIVAL, "survival", "c_index", N_PATIENTS, survival["event"].sum(), split, excluded],
            [BINARY, "binary", "auc", N_PATIENTS, np.nan, split, ""],
        ],
        columns=["task", "kind", "metric", "n_patients", "n_events", "split", "excluded"],
    )


@pytest.fixture(scope="module")
def data() -> LeaderboardData:
    preds = _predictions()
    scores = _scores(preds)
    return LeaderboardData(
        title="Pan-cancer <benchmark>",
        generated="2025-01-02 03:04 UTC",
        ranking=_ranking(scores),
        scores=scores,
        tasks=_tasks(preds),
        predictions=preds,
        notes=["Synthetic data & hand-made scores", "<script>alert(1)</script>"],
    )


@pytest.fixture(scope="module")
def page(data: LeaderboardData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_leaderboard(data, tmp_path_factory.mktemp("board") / "leaderboard.html")


# ------------------------------------------------------------------------------ a strict parser


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        """Descendants with this tag whose attributes contain these values (class: one word)."""

        def matches(node: Node) -> bool:
            for key, value in attrs.items():
                key = key.rstrip("_").replace("_", "-")
                if key == "class":
                    if value not in node.attrs.get("class", "").split():
                        return False
                elif node.attrs.get(key) != value:
                    return False
            return True

        return [n for n in self.iter() if n.tag == tag and matches(n)]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


VOID = {"meta", "link", "img", "br", "hr", "input"}


class StrictParser(HTMLParser):
    """Builds a tree and fails on any unclosed or mismatched element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


def _parse(path: Path) -> Node:
    parser = StrictParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert [n.tag for n in parser.stack] == ["#root"], "unclosed elements"
    return parser.root


def _entries(frame: pd.DataFrame) -> list[str]:
    return [entry_name(f, m) for f, m in zip(frame["feature_set"], frame["model"], strict=True)]


# ------------------------------------------------------------------------------ page contents


def test_entry_name_and_estimate_format() -> None:
    assert entry_name("uni", "abmil") == "uni · abmil"
    assert format_estimate(0.7421, 0.70, 0.7899) == "0.742 [0.70, 0.79]"
    assert format_estimate(0.7421, np.nan, 0.79) == "0.742"
    assert format_estimate(np.nan, 0.1, 0.2) == "–"


def test_page_parses_and_lists_every_entry(data: LeaderboardData, page: Path) -> None:
    root = _parse(page)
    ranking = root.find_all("table", id="ranking")[0]
    rows = ranking.find_all("tr")[1:]
    # best mean rank first
    expected = _entries(data.ranking.sort_values("mean_rank", kind="stable"))
    assert [r.attrs["data-entry"] for r in rows] == expected
    keys = [th.attrs["data-key"] for th in ranking.find_all("th")]
    assert f"rank:{SURVIVAL}" in keys and f"rank:{BINARY}" in keys and "mean_rank" in keys
    best = data.ranking.sort_values("mean_rank").iloc[0]
    spread = rows[0].children[5]
    assert spread.all_text() == (
        f"{best['mean_rank']:.2f} [{best['rank_lo']:g}, {best['rank_hi']:g}]"
    )
    assert float(spread.attrs["data-sort"]) == best["mean_rank"]

    for task, kind in ((SURVIVAL, "survival"), (BINARY, "binary")):
        (section,) = root.find_all("section", class_="task", data_task=task)
        assert section.attrs["data-kind"] == kind
        table = section.find_all("table", class_="entries")[0]
        task_scores = data.scores[data.scores["task"] == task]
        listed = [r.attrs["data-entry"] for r in table.find_all("tr")[1:]]
        assert listed == _entries(task_scores.sort_values("estimate", ascending=False))
        for row in table.find_all("tr")[1:]:
            name = row.attrs["data-entry"]
            score = task_scores[[e == name for e in _entries(task_scores)]].iloc[0]
            (cell,) = row.find_all("td", class_="estimate")
            assert cell.all_text() == format_estimate(
                score["estimate"], score["lower"], score["upper"]
            )


def test_task_sections_report_exclusions_and_metrics(data: LeaderboardData, page: Path) -> None:
    root = _parse(page)
    (survival,) = root.find_all("section", data_task=SURVIVAL)
    (binary,) = root.find_all("section", data_task=BINARY)
    assert survival.find_all("p", class_="exclusions")[0].all_text() == (
        f"Exclusions: ctp<v2>: {EXCLUDED} patients without features"
    )
    assert binary.find_all("p", class_="exclusions")[0].all_text() == "No exclusions."
    n_events = int(data.tasks.loc[data.tasks["task"] == SURVIVAL, "n_events"].iloc[0])
    assert f"{n_events} events" in survival.find_all("p", class_="task-meta")[0].all_text()
    assert "events" not in binary.find_all("p", class_="task-meta")[0].all_text()
    # secondary metrics only where the task has them
    survival_keys = [th.attrs["data-key"] for th in survival.find_all("th")]
    binary_keys = [th.attrs["data-key"] for th in binary.find_all("th")]
    assert "mean:ibs" in survival_keys and "mean:balanced_accuracy" not in survival_keys
    assert "mean:balanced_accuracy" in binary_keys and "mean:ibs" not in binary_keys


def test_kaplan_meier_of_the_best_entry_at_its_first_seed(
    data: LeaderboardData, page: Path
) -> None:
    root = _parse(page)
    (survival,) = root.find_all("section", data_task=SURVIVAL)
    (binary,) = root.find_all("section", data_task=BINARY)
    task_scores = data.scores[data.scores["task"] == SURVIVAL]
    best = _entries(task_scores)[int(np.argmax(task_scores["estimate"]))]
    (km_best,) = survival.find_all("img", class_="km-best")
    assert km_best.attrs["data-entry"] == best
    assert km_best.attrs["data-seed"] == str(min(SEEDS))
    small = survival.find_all("img", class_="km-entry")
    assert sorted(i.attrs["data-entry"] for i in small) == sorted(_entries(task_scores))
    assert binary.find_all("img", class_="km") == []
    assert "Log-rank p = " in survival.find_all("figure", class_="km-best")[0].all_text()


def _common(preds: pd.DataFrame) -> pd.DataFrame:
    """The rows of the (seed, patient) pairs every entry of the frame's task scored."""
    n_entries = preds.groupby(["feature_set", "model"]).ngroups
    size = preds.groupby(["seed", "patient_id"])["patient_id"].transform("size")
    return preds[size == n_entries]


def _fold_auc(rows: pd.DataFrame, classes: list[str]) -> float:
    """scikit-learn's AUC (binary: classes[-1]; else the mean one-vs-rest AUC over the classes
    present), within each (seed, fold) with two classes or more, averaged."""
    values = []
    for _, cell in rows.groupby(["seed", "fold"]):
        present = [c for c in classes if (cell["label"] == c).any()]
        if len(present) < 2:
            continue
        split = [classes[-1]] if len(classes) == 2 else present
        values.append(
            np.mean([roc_auc_score(cell["label"] == c, cell[f"prob_{c}"]) for c in split])
        )
    return float(np.mean(values))


def _area(points: pd.DataFrame) -> float:
    """Trapezoid area under the curve points, in their drawing order."""
    points = points.sort_values("point")
    x, y = points["fpr"].to_numpy(), points["tpr"].to_numpy()
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _hand_calibration(rows: pd.DataFrame, classes: list[str]) -> list[tuple[int, float, float]]:
    """Per bin [k/10, (k+1)/10) (the last one closed): n, mean predicted, observed frequency;
    binary: P(classes[-1]) vs the share of classes[-1]; multiclass: the top probability vs the
    share of patients whose first most probable class is theirs."""
    pairs = []
    for _, row in rows.iterrows():
        probs = [float(row[f"prob_{c}"]) for c in classes]
        if len(classes) == 2:
            pairs.append((probs[1], float(row["label"] == classes[1])))
        else:
            top = probs.index(max(probs))
            pairs.append((probs[top], float(row["label"] == classes[top])))
    out = []
    for k in range(10):
        inside = [(p, y) for p, y in pairs if k / 10 <= p < (k + 1) / 10 or (k == 9 and p == 1.0)]
        n = len(inside)
        if n:
            out.append((n, sum(p for p, _ in inside) / n, sum(y for _, y in inside) / n))
        else:
            out.append((0, math.nan, math.nan))
    return out


def _check_calibration(bins: pd.DataFrame, rows: pd.DataFrame, classes: list[str]) -> None:
    hand = _hand_calibration(rows, classes)
    bins = bins.sort_values("bin")
    assert bins["n"].tolist() == [n for n, _, _ in hand]
    np.testing.assert_allclose(bins["mean_predicted"], [m for _, m, _ in hand], atol=1e-12)
    np.testing.assert_allclose(bins["observed"], [o for _, _, o in hand], atol=1e-12)
    ece = sum(n * abs(m - o) for n, m, o in hand if n) / len(rows)
    assert bins["ece"].iloc[0] == pytest.approx(ece, abs=1e-12)


def test_classification_task_shows_roc_and_reliability_per_feature_set(
    data: LeaderboardData, page: Path
) -> None:
    root = _parse(page)
    (binary,) = root.find_all("section", data_task=BINARY)
    (survival,) = root.find_all("section", data_task=SURVIVAL)
    assert survival.find_all("img", class_="roc") == []
    rows = data.predictions[data.predictions["task"] == BINARY]
    common = _common(rows)
    (about,) = binary.find_all("p", class_="roc-about")
    assert f"{common['patient_id'].nunique()} test patients" in about.all_text()
    assert "positive class MSS" in about.all_text() and "10 equal-width bins" in about.all_text()
    (grid,) = binary.find_all("div", class_="roc-grid")
    figures = grid.find_all("figure")
    images = [f.find_all("img", class_="roc")[0] for f in figures]
    assert sorted(i.attrs["data-feature-set"] for i in images) == sorted(FEATURE_SETS)

    # the CSV links of each task, relative to the page
    links = {
        a.attrs["class"]: page.parent / unquote(a.attrs["href"])
        for a in binary.find_all("p", class_="task-files")[0].find_all("a")
    }
    assert sorted(links) == ["calibration-link", "predictions-link", "roc-link"]
    (survival_link,) = survival.find_all("p", class_="task-files")[0].find_all("a")
    assert survival_link.attrs["class"] == "predictions-link"
    roc = pd.read_csv(links["roc-link"])
    calibration = pd.read_csv(links["calibration-link"])
    assert list(roc.columns) == ["task", "feature_set", "model", "point", "fpr", "tpr"]
    for figure, image in zip(figures, images, strict=True):
        fs = image.attrs["data-feature-set"]
        aucs = json.loads(image.attrs["data-auc"])
        assert sorted(aucs) == sorted(MODELS)
        for model, auc in aucs.items():
            entry = common[(common["feature_set"] == fs) & (common["model"] == model)]
            want = _fold_auc(entry, ["MSI", "MSS"])
            points = roc[(roc["feature_set"] == fs) & (roc["model"] == model)]
            assert _area(points) == pytest.approx(want, abs=1e-9)
            assert auc == pytest.approx(want, abs=1e-9)
            bins = calibration[(calibration["feature_set"] == fs) & (calibration["model"] == model)]
            _check_calibration(bins, entry, ["MSI", "MSS"])
            caption = figure.find_all("figcaption")[0].all_text()
            assert f"{entry_name(fs, model)}: AUC {want:.3f}" in caption

    # the predictions CSV holds every prediction of the task, with the columns it uses
    exported = pd.read_csv(links["predictions-link"], dtype={"patient_id": str, "label": str})
    want = rows.dropna(axis=1, how="all")
    assert list(exported.columns[:7]) == [
        "task",
        "feature_set",
        "model",
        "protocol",
        "seed",
        "fold",
        "patient_id",
    ]
    assert "risk" not in exported.columns and "time" not in exported.columns
    pd.testing.assert_frame_equal(
        exported, want[list(exported.columns)].reset_index(drop=True), check_dtype=False
    )
    assert set(exported.columns) == set(want.columns)
    survival_rows = pd.read_csv(page.parent / unquote(survival_link.attrs["href"]))
    assert len(survival_rows) == (data.predictions["task"] == SURVIVAL).sum()
    assert "label" not in survival_rows.columns and "risk" in survival_rows.columns


def test_page_is_self_contained_and_escaped(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    root = _parse(page)
    images = root.find_all("img")
    # heat map, best KM, one small KM per entry, one ROC / reliability figure per feature set
    assert len(images) == 1 + 1 + len(STRENGTH) + len(FEATURE_SETS)
    assert len(root.find_all("img", class_="heatmap")) == 1
    for img in images:
        prefix = "data:image/png;base64,"
        assert img.attrs["src"].startswith(prefix)
        png = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"][len(prefix) :])))
        assert png.format == "PNG" and png.width > 100 and png.height > 100
    for node in root.iter():
        assert not (node.tag == "script" and "src" in node.attrs)
        assert not (node.tag == "link" and node.attrs.get("rel") != "icon")
        for key in ("src", "href"):
            value = node.attrs.get(key, "")
            assert not value.startswith(("http:", "https:", "//")), value
    assert "<v2>" not in text and "ctp&lt;v2&gt;" in text
    assert "<script>alert(1)</script>" not in text
    assert root.find_all("ul", class_="notes")[0].children[1].all_text() == (
        "<script>alert(1)</script>"
    )
    assert root.find_all("title")[0].all_text() == "Pan-cancer <benchmark>"
    assert sorted(p.name for p in page.parent.iterdir()) == [
        "curves",
        "leaderboard.csv",
        page.name,
        "predictions",
    ]


def test_csv_round_trips_and_is_linked(data: LeaderboardData, page: Path) -> None:
    csv_path = page.with_suffix(".csv")
    back = pd.read_csv(csv_path)
    pd.testing.assert_frame_equal(back, data.scores, check_dtype=False)
    (link,) = _parse(page).find_all("a", id="csv-link")
    assert (page.parent / unquote(link.attrs["href"])).resolve() == csv_path.resolve()


def test_custom_csv_path_gets_a_relative_link(data: LeaderboardData, tmp_path: Path) -> None:
    html_path = render_leaderboard(
        replace(data, predictions=data.predictions.iloc[0:0]),
        tmp_path / "site" / "board.html",
        csv_path=tmp_path / "exports" / "all scores.csv",
    )
    (link,) = _parse(html_path).find_all("a", id="csv-link")
    assert link.attrs["href"] == "../exports/all%20scores.csv"
    assert (html_path.parent / unquote(link.attrs["href"])).resolve().is_file()
    # without predictions the page says so instead of drawing curves
    root = _parse(html_path)
    assert root.find_all("img", class_="km") == []
    assert len(root.find_all("p", class_="km-missing")) == 1
    with pytest.raises(ConfigError, match=r"\.csv"):
        render_leaderboard(data, tmp_path / "b.html", csv_path=tmp_path / "b.parquet")


def test_bad_data_lists_every_problem(data: LeaderboardData) -> None:
    scores = pd.concat([data.scores, data.scores.iloc[[0]].assign(task="ghost")])
    with pytest.raises(ConfigError) as info:
        LeaderboardData(
            title="x",
            generated="now",
            ranking=data.ranking.drop(columns=["rank_sd", "n_tasks"]),
            scores=pd.concat([scores, scores.iloc[[0]]]),
            tasks=data.tasks.assign(kind=["survival", "regression"]),
            predictions=data.predictions.drop(columns="risk"),
        )
    message = str(info.value)
    for needle in (
        "ranking lacks columns: rank_sd, n_tasks",
        "scores has duplicate rows",
        "unknown kinds: regression",
        "absent from the tasks table: ghost",
        "event and risk",
    ):
        assert needle in message
    assert "5 problems" in message
    # a classification task cannot be drawn (or exported) without labels and probabilities
    with pytest.raises(ConfigError, match=r"label and prob_<class> columns"):
        replace(data, predictions=data.predictions.drop(columns=["prob_MSI", "prob_MSS"]))


# ------------------------------------------------------------------------------ from the store

UNEVEN_TASKS = (("os", "survival", "easy"), ("msi", "binary", "hard"))
_KINDS = {False: "binary", True: "multiclass"}


def _independent_estimate(kind: str, rows: pd.DataFrame) -> float:
    """Mean over (seed, fold) of lifelines' C or scikit-learn's AUC (positive class MSS)."""
    values = []
    for _, cell in rows.groupby(["seed", "fold"]):
        if kind == "survival":
            values.append(concordance_index(cell["time"], -cell["risk"], cell["event"]))
        else:
            values.append(roc_auc_score(cell["label"] == "MSS", cell["prob_MSS"]))
    return float(np.mean(values))


def _uneven_store(folder: Path, frames: dict[str, pd.DataFrame]) -> None:
    """A results folder holding the given prediction frames as finished cells."""
    from oncoslide.bench.store import CellRecord, ResultStore, cell_key

    keys, tasks = [], []
    with ResultStore.in_dir(folder) as store:
        for task, frame in frames.items():
            classes = sorted(c[len("prob_") :] for c in frame.columns if c.startswith("prob_"))
            kind = "survival" if "risk" in frame.columns else _KINDS[len(classes) > 2]
            for (fs, model, seed, fold), cell in frame.groupby(
                ["feature_set", "model", "seed", "fold"]
            ):
                config = {"task": task, "fs": fs, "model": model, "seed": seed, "fold": fold}
                key = cell_key(config)
                columns = ["patient_id", "time", "event", "label"]
                outputs = ["risk", "risk_threshold"] if kind == "survival" else []
                outputs += [f"prob_{c}" for c in classes]
                predictions = cell[[c for c in columns + outputs if c in cell.columns]]
                store.record_cell(
                    CellRecord(
                        cell_key=key,
                        task=task,
                        feature_set=str(fs),
                        model=str(model),
                        protocol="linear",
                        seed=int(seed),
                        fold=int(fold),
                        config=config,
                        metrics={},
                        predictions=predictions.reset_index(drop=True),
                        seconds=1.0,
                    )
                )
                keys.append(key)
            tasks.append(
                {
                    "task": task,
                    "kind": kind,
                    "classes": classes,
                    "metric": "c_index" if kind == "survival" else "auc",
                    "n_patients": int(frame["patient_id"].nunique()),
                    "n_events": None,
                    "split": "3-fold x 2 seeds",
                    "excluded": "part: 24 patients excluded",
                }
            )
        store.set_meta("spec", {"name": "uneven", "n_boot": 200})
        store.set_meta("tasks", tasks)
        store.set_meta("plan", keys)


def _table_values(section: Node, key: str) -> dict[str, str]:
    """Entry -> the text of the column ``key`` in a task section's entries table."""
    (table,) = section.find_all("table", class_="entries")
    headers = [th.attrs["data-key"] for th in table.find_all("th")]
    index = headers.index(key)
    rows = table.find_all("tr")[1:]
    return {r.attrs["data-entry"]: r.find_all("td")[index].all_text() for r in rows}


def test_leaderboard_ranks_and_compares_on_the_patients_common_to_all_entries(
    uneven_frame: Callable[[str, str], pd.DataFrame], tmp_path: Path
) -> None:
    from oncoslide.bench.report import build_leaderboard

    frames = {task: uneven_frame(kind, missing) for task, kind, missing in UNEVEN_TASKS}
    # a stand-in for the training part's median risk: that of the entry's other folds
    os_frame = frames["os"]
    for (fs, seed, fold), cell in os_frame.groupby(["feature_set", "seed", "fold"]):
        same = (os_frame["feature_set"] == fs) & (os_frame["seed"] == seed)
        others = os_frame.loc[same & (os_frame["fold"] != fold), "risk"]
        os_frame.loc[cell.index, "risk_threshold"] = float(np.median(others))
    _uneven_store(tmp_path / "bench", frames)
    board = build_leaderboard(tmp_path / "bench", n_boot=200)
    scores = board.data.scores.set_index(["task", "feature_set"])
    root = _parse(board.html_path)
    exported = pd.read_csv(board.csv_path).set_index(["task", "feature_set"])
    for task, kind, _ in UNEVEN_TASKS:
        frame = frames[task]
        full, part = frame[frame["feature_set"] == "full"], frame[frame["feature_set"] == "part"]
        common = full.merge(part[["seed", "patient_id"]], on=["seed", "patient_id"])
        want = {
            "full": _independent_estimate(kind, common),
            "part": _independent_estimate(kind, part),
        }
        own = _independent_estimate(kind, full)
        assert (own > want["part"]) != (want["full"] > want["part"])  # the rules disagree
        for fs in ("full", "part"):
            assert scores.loc[(task, fs), "estimate"] == pytest.approx(want[fs], abs=1e-12)
            assert exported.loc[(task, fs), "estimate"] == pytest.approx(want[fs], abs=1e-12)
        best, other = sorted(want, key=want.__getitem__, reverse=True)
        assert board.data.ranking.set_index("feature_set").loc[best, f"rank:{task}"] == 1.0
        (cmp,) = board.comparisons[board.comparisons["task"] == task].to_dict("records")
        assert cmp["entry"] == f"{other} · lin" and cmp["best"] == f"{best} · lin"
        assert cmp["diff"] == pytest.approx(want[other] - want[best], abs=1e-12)
        assert cmp["n_patients"] == 66
        # every entry shows its own test patients and the common ones it was scored on
        for table in (scores, exported):
            assert table.loc[(task, "full"), ["n_patients", "n_used"]].tolist() == [90, 66]
            assert table.loc[(task, "part"), ["n_patients", "n_used"]].tolist() == [66, 66]
        (section,) = root.find_all("section", data_task=task)
        assert _table_values(section, "n_patients") == {"full · lin": "90", "part · lin": "66"}
        assert _table_values(section, "n_used") == {"full · lin": "66", "part · lin": "66"}
        (note,) = section.find_all("p", class_="common-patients")
        assert "66 test patients" in note.all_text() and "2 entries" in note.all_text()
    # the Kaplan-Meier groups of survival entries split at the stored training thresholds
    (survival,) = root.find_all("section", data_task="os")
    caption = survival.find_all("figure", class_="km-best")[0].all_text()
    assert "training part" in caption and "test fold" not in caption


def test_leaderboard_says_when_entries_share_no_patient(
    uneven_frame: Callable[[str, str], pd.DataFrame], tmp_path: Path
) -> None:
    from oncoslide.bench.report import build_leaderboard

    frame = uneven_frame("survival", "easy")
    # "part" was only scored in seed 1, "full" only in seed 0: no common (seed, patient)
    frame = frame[(frame["feature_set"] == "full") == (frame["seed"] == 0)]
    _uneven_store(tmp_path / "bench", {"os": frame})
    board = build_leaderboard(tmp_path / "bench", n_boot=50)
    scores = board.data.scores.set_index("feature_set")
    assert scores["estimate"].isna().all() and (scores["n_used"] == 0).all()
    assert "no test patient in common" in scores.loc["full", "note"]
    assert board.comparisons.empty
    (section,) = _parse(board.html_path).find_all("section", data_task="os")
    (message,) = section.find_all("p", class_="no-common")
    assert "no test patient in common" in message.all_text()
    assert "full · lin" in message.all_text() and "part · lin" in message.all_text()
    assert any("os" in note and "no test patient" in note for note in board.data.notes)


def _multiclass_frame() -> pd.DataFrame:
    """Task ``subtype`` (classes A < B < C), 60 patients, 3 folds, seeds 0 and 1: ``full · lin``
    scores everyone, ``part · lin`` lacks 12 patients, and in seed 1 fold 0 of ``part`` class C
    is absent (fold macro means over the classes present)."""
    rng = np.random.default_rng(5)
    n, classes = 60, np.array(["A", "B", "C"])
    pid = np.array([f"s{i:03d}" for i in range(n)])
    label = classes[rng.integers(0, 3, size=n)]
    parts = []
    for seed in (0, 1):
        fold = np.random.default_rng(70 + seed).permutation(np.arange(n) % 3)
        for fs, strength in (("full", 0.6), ("part", 1.5)):
            logits = rng.normal(size=(n, 3)) + strength * (label[:, None] == classes[None, :])
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            frame = pd.DataFrame(
                {
                    "cell_key": [f"{fs}/{seed}/{k}" for k in fold],
                    "task": "subtype",
                    "feature_set": fs,
                    "model": "lin",
                    "protocol": "linear",
                    "seed": seed,
                    "fold": fold,
                    "patient_id": pid,
                    "time": np.nan,
                    "event": np.nan,
                    "label": label,
                    **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)},
                }
            )
            if fs == "part":
                drop = np.arange(n) < 12
                drop |= (seed == 1) & (fold == 0) & (label == "C")
                frame = frame.loc[~drop]
            parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def test_leaderboard_from_the_store_draws_roc_and_writes_prediction_csvs(
    uneven_frame: Callable[[str, str], pd.DataFrame], tmp_path: Path
) -> None:
    from oncoslide.bench.report import build_leaderboard
    from oncoslide.bench.store import ResultStore

    frames = {
        "os": uneven_frame("survival", "easy"),
        "msi": uneven_frame("binary", "hard"),
        "subtype": _multiclass_frame(),
    }
    frames["os"]["risk_threshold"] = 0.0
    _uneven_store(tmp_path / "bench", frames)
    board = build_leaderboard(tmp_path / "bench", n_boot=50)
    folder = board.html_path.parent
    scores = board.data.scores.set_index(["task", "feature_set"])
    with ResultStore.in_dir(tmp_path / "bench") as store:
        stored = {task: store.predictions(task=task) for task in frames}
    root = _parse(board.html_path)
    for task, classes in (("msi", ["MSI", "MSS"]), ("subtype", ["A", "B", "C"])):
        roc = pd.read_csv(folder / "curves" / f"{task}-roc.csv")
        calibration = pd.read_csv(folder / "curves" / f"{task}-calibration.csv")
        common = _common(stored[task])
        for fs in ("full", "part"):
            entry = common[common["feature_set"] == fs]
            want = _fold_auc(entry, classes)
            # the curve's area is the leaderboard's estimate, and scikit-learn's per-fold AUC
            area = _area(roc[roc["feature_set"] == fs])
            assert area == pytest.approx(scores.loc[(task, fs), "estimate"], abs=1e-9)
            assert area == pytest.approx(want, abs=1e-9)
            _check_calibration(calibration[calibration["feature_set"] == fs], entry, classes)
        (section,) = root.find_all("section", data_task=task)
        (about,) = section.find_all("p", class_="roc-about")
        text = about.all_text()
        assert f"{common['patient_id'].nunique()} test patients" in text
        assert ("positive class MSS" in text) == (task == "msi")
        assert ("macro one-vs-rest" in text) == (task == "subtype")
        assert len(section.find_all("img", class_="roc")) == 2  # one per feature set
    assert set(calibration["target"]) == {"top-label confidence"}
    # the predictions CSVs hold the store's predictions of the plan, row for row
    for task in frames:
        exported = pd.read_csv(
            folder / "predictions" / f"{task}.csv",
            dtype={"patient_id": str, "label": str, "cell_key": str},
        )
        want = stored[task].dropna(axis=1, how="all")
        assert set(exported.columns) == set(want.columns)
        pd.testing.assert_frame_equal(
            exported, want[list(exported.columns)].reset_index(drop=True), check_dtype=False
        )
    assert not (folder / "curves" / "os-roc.csv").exists()


# ------------------------------------------------------------------------------ real browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.is_file() and shutil.which(binary.name) is None:
            pytest.skip(f"{binary} is absent: install chromium and chromium-driver to run this")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    # chromedriver's name for the console-log capability is goog:loggingPrefs
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def _severe(driver: object) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _column(driver: object, key: str) -> list[str]:
    return driver.execute_script(
        """
        const th = document.querySelector(`#ranking th[data-key="${arguments[0]}"]`);
        const index = Array.from(th.parentNode.cells).indexOf(th);
        return Array.from(document.querySelectorAll("#ranking tbody tr"),
                          tr => tr.cells[index].getAttribute("data-sort"));
        """,
        key,
    )


def _click(driver: object, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def test_page_in_a_real_browser(data: LeaderboardData, page: Path, browser: object) -> None:
    driver = browser
    driver.get(page.resolve().as_uri())
    assert driver.title == "Pan-cancer <benchmark>"
    assert _severe(driver) == []

    images = driver.execute_script(
        "return Array.from(document.images, i => [i.className, i.complete, i.naturalWidth]);"
    )
    assert len(images) == 2 + len(STRENGTH) + len(FEATURE_SETS)
    assert all(complete and width > 0 for _, complete, width in images), images
    # the ROC figures show, one per feature set, and their CSV links resolve beside the page
    roc = driver.execute_script(
        "return Array.from(document.querySelectorAll('img.roc'),"
        " i => [i.dataset.featureSet, i.naturalWidth > 300]);"
    )
    assert sorted(roc) == sorted([fs, True] for fs in FEATURE_SETS)
    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('.task-files a'), a => a.href);"
    )
    assert len(hrefs) == 2 + 2  # predictions of both tasks, the curves of the binary one
    assert all(Path(unquote(h.removeprefix("file://"))).is_file() for h in hrefs), hrefs

    # numeric column, both directions (values compared as numbers)
    for key in ("rank_sd", f"rank:{BINARY}"):
        _click(driver, f'#ranking th[data-key="{key}"]')
        values = [float(v) for v in _column(driver, key)]
        assert values == sorted(values)
        _click(driver, f'#ranking th[data-key="{key}"]')
        values = [float(v) for v in _column(driver, key)]
        assert values == sorted(values, reverse=True)
    # text column
    _click(driver, '#ranking th[data-key="entry"]')
    assert _column(driver, "entry") == sorted(_entries(data.ranking))
    _click(driver, '#ranking th[data-key="entry"]')
    assert _column(driver, "entry") == sorted(_entries(data.ranking), reverse=True)
    sort_state = driver.execute_script(
        "return Array.from(document.querySelectorAll('#ranking th'),"
        " th => th.getAttribute('aria-sort'));"
    )
    assert sort_state.count("descending") == 1 and sort_state.count("none") == len(sort_state) - 1

    # numbers, not text: 9 patients sort before 48 (as text "48" < "9")
    patients = f'section[data-task="{SURVIVAL}"] th[data-key="n_patients"]'
    _click(driver, patients)
    counts = driver.execute_script(
        "const t = document.querySelector(arguments[0]).closest('table');"
        "return Array.from(t.tBodies[0].rows, r => Number(r.cells[r.cells.length - 1].textContent));",
        patients,
    )
    assert counts == sorted(counts) and counts[0] == N_PATIENTS - EXCLUDED
    # numbers of unequal lengths (0.0625 < 0.125 < 0.25 < 0.5; as digit runs 5 < 25 < 125)
    task_scores = data.scores[data.scores["task"] == SURVIVAL]
    for key in ("estimate", "mean:ibs"):
        header = f'section[data-task="{SURVIVAL}"] th[data-key="{key}"]'
        _click(driver, header)
        values = driver.execute_script(
            "const th = document.querySelector(arguments[0]);"
            "const i = Array.from(th.parentNode.cells).indexOf(th);"
            "return Array.from(th.closest('table').tBodies[0].rows,"
            " r => Number(r.cells[i].getAttribute('data-sort')));",
            header,
        )
        assert values == sorted(task_scores[key])

    # the CSV export follows the current (descending entry) order, at full precision
    _click(driver, "#download-csv")
    csv_text = driver.execute_script("return window.oncoslideLeaderboard.lastCsv;")
    exported = pd.read_csv(io.StringIO(csv_text))
    order = sorted(_entries(data.ranking), reverse=True)
    expected = data.ranking.set_index(pd.Index(_entries(data.ranking))).loc[order]
    pd.testing.assert_frame_equal(exported, expected.reset_index(drop=True), check_dtype=False)
    deadline = time.monotonic() + 10
    saved = driver.downloads / "leaderboard-ranking.csv"
    while not saved.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert saved.read_text(encoding="utf-8") == csv_text
    assert _severe(driver) == []
