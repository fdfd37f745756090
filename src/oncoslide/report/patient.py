"""One self-contained HTML page per patient (the ReXplain idea): the out-of-fold prediction and
its uncertainty, the patient's place among the cohort's Kaplan-Meier risk groups, the attention
heatmap on the slide, the tissue prototypes that moved the score, and a plain-language summary.

Every number on the page is a value stored with the run or computed here and stored beside the
page (``report.json``), and every number is written through :class:`_Numbers`, which tags it
with its key: a test reads the page in a browser and checks each tagged number against the
stored value. The summary's sentences are fixed templates filled with those numbers (no
free text, no language model).

Uncertainty is a *patch bootstrap*: the patient's patches resampled with replacement
(``n_boot`` times) and scored by the model of the fold that held the patient out; the page
gives the 2.5-97.5 percentile interval and the share of resamples above the fold's risk-group
threshold. It measures how much the score depends on which patches were sampled from the
slide, not the uncertainty of the model's training (another seed's split would add that).
"""

from __future__ import annotations

import base64
import html
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oncoslide._io import atomic_path, write_json, write_text
from oncoslide.cohort.bags import load_bag
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError, OncoslideError
from oncoslide.features.cache import FeatureCache
from oncoslide.report.attention import attention_heatmaps, held_out_fold, load_fold_model, read_run
from oncoslide.report.patient_template import PAGE
from oncoslide.report.plots import risk_groups
from oncoslide.report.prototypes import bag_score, read_explanation

REPORTS_DIR = "reports"
DISCLAIMER = (
    "This page was made automatically by a research model from the patient's slide images. "
    "It is not a diagnosis and must not be used on its own to decide on care: please discuss "
    "it with the care team."
)
_GROUP_COLOURS = {"high": "#c0392b", "low": "#2471a3"}


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Settings of :func:`patient_report`: which seed's fold models, patch-bootstrap resamples,
    prototypes shown, heatmap size (px, longer side)."""

    seed: int = 0
    n_boot: int = 200
    level: float = 95.0
    n_prototypes: int = 3
    heatmap_side: int = 1024

    def __post_init__(self) -> None:
        problems = []
        if self.n_boot < 20:
            problems.append(f"n_boot must be at least 20, got {self.n_boot}")
        if not 50 <= self.level < 100:
            problems.append(f"level must be in [50, 100), got {self.level}")
        if self.n_prototypes < 1:
            problems.append("n_prototypes must be at least 1")
        if self.heatmap_side < 64:
            problems.append("heatmap_side must be at least 64 px")
        if problems:
            raise ConfigError("invalid report settings: " + "; ".join(problems))


@dataclass
class PatientReport:
    """What :func:`patient_report` wrote."""

    html: Path
    values_path: Path
    values: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class _Numbers:
    """Every number on the page: formatted, tagged with its key, and kept for report.json."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.formats: dict[str, str] = {}

    def __call__(self, key: str, value: float, digits: int = 3, style: str = "f") -> str:
        """``style`` "f": ``digits`` decimals; "e": scientific with ``digits`` decimals."""
        value = float(value)
        if key in self.values and self.values[key] != value:
            raise ValueError(f"number {key} shown with two values")
        self.values[key] = value
        self.formats[key] = f".{digits}{style}"
        text = format(value, self.formats[key])
        return f'<span class="num" data-key="{html.escape(key)}">{text}</span>'


# ------------------------------------------------------------------------------ values


def _patient_prediction(run: Path, patient_id: str, seed: int) -> tuple[pd.Series, pd.DataFrame]:
    path = run / "predictions.parquet"
    if not path.exists():
        raise ConfigError(f"{run} has no predictions.parquet: the run has not finished")
    preds = pd.read_parquet(path)
    preds["patient_id"] = preds["patient_id"].astype(str)
    preds = preds[preds["seed"] == seed].reset_index(drop=True)
    if "risk" not in preds.columns:
        raise ConfigError("the patient report is for survival runs (predictions have no risk)")
    own = preds[preds["patient_id"] == str(patient_id)]
    if own.empty:
        raise ConfigError(f"patient {patient_id!r} has no out-of-fold prediction in seed {seed}")
    return own.iloc[0], preds


def _km_groups(preds: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], float]:
    groups = risk_groups(preds.loc[:, ["patient_id", "fold", "time", "event", "risk",
                                       *(["risk_threshold"] if "risk_threshold" in preds else [])]])  # fmt: skip
    stats: dict[str, dict[str, Any]] = {}
    for name in ("high", "low"):
        data = groups[groups["group"] == name]
        if data.empty:
            continue
        km = KaplanMeierFitter().fit(data["time"].to_numpy(float), data["event"].to_numpy(float))
        median = float(km.median_survival_time_)
        stats[name] = {
            "n": len(data),
            "events": int(data["event"].sum()),
            "median": median if math.isfinite(median) else None,
            "fitter": km,
        }
    p = math.nan
    if len(stats) == 2:
        hi, lo = groups[groups["group"] == "high"], groups[groups["group"] == "low"]
        p = float(
            logrank_test(
                hi["time"], lo["time"], event_observed_A=hi["event"], event_observed_B=lo["event"]
            ).p_value
        )
    return groups, stats, p


def _km_png(stats: dict[str, dict[str, Any]], own_group: str) -> str:
    """Kaplan-Meier curves of the groups, the patient's group drawn bold, as base64 PNG."""
    import io

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, s in stats.items():
        km: KaplanMeierFitter = s["fitter"]
        surv = km.survival_function_.iloc[:, 0]
        own = name == own_group
        ax.step(
            surv.index.to_numpy(float),
            surv.to_numpy(float),
            where="post",
            color=_GROUP_COLOURS[name],
            linewidth=3.0 if own else 1.2,
            alpha=1.0 if own else 0.55,
            label=f"{name}-risk group" + (" (this patient)" if own else ""),
        )
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.set_xlabel("time since diagnosis (the cohort table's unit)")
    ax.set_ylabel("share of patients without the event")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _patch_bootstrap(
    run: Path, cohort: Cohort, patient_id: str, seed: int, fold: int, settings: ReportConfig
) -> tuple[float, np.ndarray]:
    """The held-out fold model's score on the whole bag and on ``n_boot`` resampled bags."""
    fm = load_fold_model(run, cohort, seed=seed, fold=fold)
    cache = FeatureCache()
    try:
        bag = load_bag(cohort, patient_id, cache)
        features, coords = np.asarray(bag.features), np.asarray(bag.coords)
        slides = np.asarray(bag.slide_index)
    finally:
        cache.close()
    # a stable stream per (seed, patient): the same page every time
    rng = np.random.default_rng([seed, zlib.crc32(str(patient_id).encode())])
    n = len(features)
    full = bag_score(fm, features, coords, slides)
    scores = np.empty(settings.n_boot)
    for b in range(settings.n_boot):
        idx = np.sort(rng.integers(0, n, size=n))
        scores[b] = bag_score(fm, features[idx], coords[idx], slides[idx])
    return full, scores


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _gradient(cmap: str = "turbo", stops: int = 9) -> str:
    colours = colormaps[cmap](np.linspace(0, 1, stops))[:, :3]
    parts = [
        f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {100 * i / (stops - 1):.0f}%"
        for i, (r, g, b) in enumerate(colours)
    ]
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


# ------------------------------------------------------------------------------ the page


def patient_report(
    run_dir: str | Path,
    cohort: Cohort,
    patient_id: str,
    *,
    settings: ReportConfig | None = None,
    out_dir: str | Path | None = None,
    slides_dir: str | Path | None = None,
) -> PatientReport:
    """Write ``report.html`` and ``report.json`` for one patient of a survival run
    (default folder ``RUN/reports/<patient>/``). Needs ``oncoslide explain`` to have run
    (its ``explain/`` tables give the prototypes).

    Raises:
        ConfigError: not a finished survival run, the patient not in it, or no explain/.
    """
    settings = settings or ReportConfig()
    run = Path(run_dir)
    pid = str(patient_id)
    out = Path(out_dir) if out_dir is not None else run / REPORTS_DIR / pid
    config, splits = read_run(run)
    if not config.is_survival:
        raise ConfigError(
            f"the patient report is for survival runs; this run's task is {config.task!r}"
        )
    seed = settings.seed
    fold = held_out_fold(splits, pid, seed)
    own, preds = _patient_prediction(run, pid, seed)
    explanation = read_explanation(run)
    if int(explanation["settings"]["seed"]) != seed:
        raise ConfigError(
            f"explain/ was made for seed {explanation['settings']['seed']}, not {seed}: run "
            f"`oncoslide explain --seed {seed}` or report that seed"
        )
    notes: list[str] = []
    num = _Numbers()

    # -- prediction and uncertainty ---------------------------------------------------------
    risk = float(own["risk"])
    threshold = float(own["risk_threshold"]) if "risk_threshold" in own.index else math.nan
    full, boot = _patch_bootstrap(run, cohort, pid, seed, fold, settings)
    if abs(full - risk) > 1e-4:
        notes.append(f"the fold model scores {full:.6g} now, the run stored {risk:.6g}")
    tail = (100 - settings.level) / 2
    lower, upper = np.percentile(boot, [tail, 100 - tail])
    groups, km, logrank_p = _km_groups(preds)
    own_row = groups[groups["patient_id"] == pid].iloc[0]
    group = str(own_row["group"])
    threshold = float(own_row["threshold"])
    share_high = float((boot > threshold).mean()) * 100
    same_fold = preds[preds["fold"] == fold]
    n_others = len(same_fold) - 1
    n_lower = int((same_fold["risk"] < risk).sum())

    # -- prototypes --------------------------------------------------------------------------
    table = explanation["patients"]
    mine = table[table["patient_id"] == pid].sort_values("contribution", ascending=False)
    protos = explanation["prototypes"].set_index("prototype")
    reps = explanation["representatives"]
    folder: Path = explanation["folder"]

    # -- the page ----------------------------------------------------------------------------
    e = html.escape
    d = 3  # decimals of scores
    risk_s = num("risk", risk, d)
    lower_s, upper_s = num("bootstrap.lower", lower, d), num("bootstrap.upper", upper, d)
    level_s = num("bootstrap.level", settings.level, 0)
    nboot_s = num("bootstrap.n", settings.n_boot, 0)
    high_s = num("bootstrap.share_high_pct", share_high, 0)
    thr_s = num("risk_threshold", threshold, d)
    # runs written before risk_threshold existed: the fold's test median (risk_groups says so)
    trained = str(own_row["threshold_source"]) == "train"
    middle_of = "was trained on" if trained else "scored without having learned from them"
    sentences = [
        f"The model ({e(config.model)}) gave this patient a risk score of {risk_s}. "
        "Higher scores mean a shorter expected time to the event among the patients the model "
        "learned from; the score has no unit of its own.",
        f"When the score is recomputed on {nboot_s} random resamples of the patient's own "
        f"tissue patches, {level_s}% of the results lie between {lower_s} and {upper_s}.",
        (
            f"The score is {'above' if group == 'high' else 'at or below'} {thr_s}, the middle "
            f"score of the patients this model {middle_of}, so the patient is in the "
            f"<b>{'higher' if group == 'high' else 'lower'}-risk group</b>; {high_s}% of the "
            "resampled scores fall in the higher-risk group."
        ),
        f"Of the {num('fold.n_others', n_others, 0)} other patients this same model scored "
        f"without having learned from them, {num('fold.n_lower', n_lower, 0)} had a lower score.",
    ]
    stats = km.get(group)
    if stats is not None:
        follow = (
            f"half of them were still free of it at {num(f'km.{group}.median', stats['median'], 0)}"
            " time units"
            if stats["median"] is not None
            else "more than half of them were still free of it at the end of follow-up"
        )
        sentences.append(
            f"In the whole cohort, {num(f'km.{group}.n', stats['n'], 0)} patients were in the "
            f"{'higher' if group == 'high' else 'lower'}-risk group; "
            f"{num(f'km.{group}.events', stats['events'], 0)} of them had the recorded event, and "
            f"{follow}."
        )
    raising = mine[mine["contribution"] > 0]
    lowering = mine[mine["contribution"] < 0].sort_values("contribution")
    for rows, verb, direction in ((raising, "raised", "lower"), (lowering, "lowered", "higher")):
        if rows.empty:
            continue
        r = rows.iloc[0]
        name = str(r["prototype"])
        key = f"prototype.{name}"
        sentences.append(
            f"The tissue pattern that {verb} the score most is pattern {e(name)}: it makes up "
            f"{num(key + '.share_pct', 100 * r['share'], 0)}% of the patient's tissue patches and "
            f"received {num(key + '.attention_pct', 100 * r['attention_share'], 0)}% of the "
            "model's attention; without it the score would be "
            f"{num(key + '.abs_contribution', abs(r['contribution']), d)} {direction}."
        )
    summary = "\n".join(f"<p>{s}</p>" for s in sentences)

    cards = "\n".join(
        f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div></div>'
        for label, value in (
            ("out-of-fold risk score", risk_s),
            (f"{level_s}% patch-bootstrap interval", f"{lower_s} to {upper_s}"),
            ("risk group (fold threshold " + thr_s + ")", f"{group}"),
            ("fold that held the patient out", num("fold", fold, 0)),
        )
    )
    uncertainty = (
        f"Uncertainty: patch bootstrap. The patient's patches were resampled with replacement "
        f"{nboot_s} times and each resample was scored by the model of the fold that did not "
        "train on the patient; the interval holds the middle "
        f"{level_s}% of those scores. It shows how much the score depends on which tissue "
        "was sampled, not how much it would change with another training run."
    )

    # KM section
    km_rows = []
    for name in ("high", "low"):
        if name not in km:
            continue
        s = km[name]
        median = (
            num(f"km.{name}.median", s["median"], 0) if s["median"] is not None else "not reached"
        )
        cls = ' class="own"' if name == group else ""
        km_rows.append(
            f"<tr{cls}><td>{name}{' (this patient)' if name == group else ''}</td>"
            f'<td class="n">{num(f"km.{name}.n", s["n"], 0)}</td>'
            f'<td class="n">{num(f"km.{name}.events", s["events"], 0)}</td>'
            f'<td class="n">{median}</td></tr>'
        )
    small = logrank_p < 1e-3  # scientific, else a tiny p would read 0.0000
    p_text = (
        f"log-rank p = {num('km.logrank_p', logrank_p, 1 if small else 4, 'e' if small else 'f')}"
        if math.isfinite(logrank_p)
        else ""
    )
    km_html = (
        f'<figure><img class="km" alt="Kaplan-Meier curves of the risk groups" '
        f'src="data:image/png;base64,{_km_png(km, group)}"><figcaption>Kaplan-Meier curves of '
        "the cohort's out-of-fold risk groups (each patient split at the median score of its "
        f"fold's training patients); the patient's group is drawn bold. {p_text}</figcaption>"
        '</figure><table id="km"><tr><th>group</th><th>patients</th><th>events</th>'
        "<th>median time to event</th></tr>" + "".join(km_rows) + "</table>"
    )

    # heatmaps
    heat_html = ""
    try:
        heat = attention_heatmaps(
            run,
            cohort,
            pid,
            out / "heatmap",
            seed=seed,
            slides_dir=slides_dir,
            max_side=settings.heatmap_side,
            geojson=False,
        )
        notes.extend(heat.notes)
        for stem, path in heat.images.items():
            heat_html += (
                f'<figure><img class="heatmap" alt="attention on {e(stem)}" '
                f'src="{_data_uri(path)}"><figcaption>{e(stem)}: each patch coloured by its '
                "attention rank among the patient's patches</figcaption></figure>"
            )
        heat_html += (
            '<div class="legend-row"><span>least attention</span><div class="legend"></div>'
            "<span>most attention</span></div>"
        )
    except OncoslideError as exc:
        notes.append(f"no heatmap ({exc})")
        heat_html = f"<p>No heatmap: {e(str(exc))}</p>"

    # prototypes
    shown = pd.concat([raising.head(settings.n_prototypes), lowering.head(settings.n_prototypes)])
    proto_cards = []
    for _, r in shown.iterrows():
        name = str(r["prototype"])
        key = f"prototype.{name}"
        imgs = "".join(
            f'<img alt="pattern {e(name)} example" src="{_data_uri(folder / str(img))}">'
            for img in reps.loc[(reps["prototype"] == name) & (reps["image"] != ""), "image"]
        )
        where = "" if imgs else '<p class="method">(no slide image to show examples)</p>'
        corr = protos.loc[name, "risk_corr"]
        corr_s = (
            f"across patients its share goes with the score with Spearman "
            f"{num(key + '.risk_corr', corr, 2)}"
            if pd.notna(corr)
            else ""
        )
        proto_cards.append(
            f'<div class="proto" data-prototype="{e(name)}"><b>pattern {e(name)}</b><br>'
            f"share of patches {num(key + '.share_pct', 100 * r['share'], 0)}%, "
            f"of attention {num(key + '.attention_pct', 100 * r['attention_share'], 0)}%<br>"
            f"effect on the score {'+' if r['contribution'] > 0 else '-'}"
            f"{num(key + '.abs_contribution', abs(r['contribution']), d)}<br>{corr_s}"
            f"<div>{imgs}</div>{where}</div>"
        )
    proto_html = (
        '<div class="protos">' + "".join(proto_cards) + "</div>"
        if proto_cards
        else "<p>No tissue pattern changed this patient's score.</p>"
    )
    method = (
        "Tissue patterns are clusters (k-means) of the patch features, fitted on the training "
        "patients of each fold only. A pattern's effect on the score is the score of the whole "
        "slide minus the score with that pattern's patches left out, by the same out-of-fold "
        "model. All values are stored beside this page in report.json and in the run's "
        "explain/ folder."
    )
    page = PAGE.substitute(
        title=e(f"Patient {pid}: what the slide model says"),
        subtitle=e(f"run {run.name} · model {config.model} · task {config.task}"),
        disclaimer=e(DISCLAIMER),
        summary=summary,
        cards=cards,
        uncertainty_method=uncertainty,
        km=km_html,
        heatmaps=heat_html,
        prototypes=proto_html,
        method=method,
        gradient=_gradient(),
    )
    values: dict[str, Any] = {
        "patient_id": pid,
        "run": str(run.resolve()),
        "model": config.model,
        "seed": seed,
        "fold": fold,
        "group": group,
        "settings": asdict(settings),
        "numbers": num.values,
        "formats": num.formats,
        "bootstrap_scores": boot.tolist(),
        "notes": notes,
    }
    target = out / "report.html"
    with atomic_path(target, suffix=".html.tmp") as tmp:
        tmp.write_text(page, encoding="utf-8")
    values_path = out / "report.json"
    write_json(values_path, values)
    write_text(out / "summary.txt", "\n".join(_plain(s) for s in sentences) + "\n")
    return PatientReport(target, values_path, values, notes)


def _plain(sentence: str) -> str:
    """A summary sentence without its markup."""
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", sentence))


__all__ = ["DISCLAIMER", "REPORTS_DIR", "PatientReport", "ReportConfig", "patient_report"]
