"""Report figures: within-fold risk groups, Kaplan-Meier log-rank p-values, ROC curves and
reliability bins (checked against scikit-learn and a hand computation), heat maps, PNGs."""

from __future__ import annotations

import base64
import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from oncoslide.errors import ConfigError
from oncoslide.report.plots import (
    ClassifierCurves,
    calibration_bins,
    classification_figure,
    figure_png_base64,
    heatmap_figure,
    km_figure,
    mean_roc_curve,
    risk_groups,
)


def _frame(risk: list[float], fold: list[int], **extra: list[object]) -> pd.DataFrame:
    n = len(risk)
    return pd.DataFrame(
        {
            "cell_key": [f"c{f}" for f in fold],
            "task": "os",
            "feature_set": "uni",
            "model": "abmil",
            "seed": 0,
            "fold": fold,
            "patient_id": [f"p{i}" for i in range(n)],
            "time": np.arange(1.0, n + 1),
            "event": [1.0, 0.0] * (n // 2) + [1.0] * (n % 2),
            "risk": risk,
            **extra,
        }
    )


def _planted(n: int = 200, seed: int = 0, shuffle: bool = False) -> pd.DataFrame:
    """Exponential times whose hazard grows with the risk (censoring independent of it)."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    event_time = rng.exponential(np.exp(-1.5 * risk))
    censor_time = rng.exponential(2.0, size=n)
    frame = pd.DataFrame(
        {
            "patient_id": [f"p{i}" for i in range(n)],
            "seed": 0,
            "fold": np.arange(n) % 4,
            "time": np.minimum(event_time, censor_time),
            "event": (event_time <= censor_time).astype(float),
            "risk": rng.permutation(risk) if shuffle else risk,
        }
    )
    return frame


# ------------------------------------------------------------------------------ risk groups


def test_risk_groups_split_at_each_folds_own_median() -> None:
    # fold 0 median 2.5 -> 3 and 10 high; fold 1 median 200 -> only 300 high (200 ties: low).
    # A global median (10) would put all of fold 0 low and all of fold 1 high.
    preds = _frame([1, 10, 2, 3, 100, 300, 200], [0, 0, 0, 0, 1, 1, 1])
    groups = risk_groups(preds)
    assert list(groups.columns) == [
        *["patient_id", "fold", "time", "event", "risk", "group", "threshold", "threshold_source"]
    ]
    assert list(groups["patient_id"]) == list(preds["patient_id"])
    assert list(groups["group"]) == ["low", "high", "low", "high", "low", "high", "low"]
    # predictions without a training threshold (older results) fall back to the test median
    assert list(groups["threshold"]) == [2.5] * 4 + [200.0] * 3
    assert (groups["threshold_source"] == "test").all()


def _oracle_groups(preds: pd.DataFrame) -> list[str]:
    """High when the risk exceeds its row's training threshold, by a plain loop."""
    return [
        "high" if risk > threshold else "low"
        for risk, threshold in zip(preds["risk"], preds["risk_threshold"], strict=True)
    ]


def test_risk_groups_split_at_the_threshold_fitted_on_the_training_part() -> None:
    # fold 0: the training median is 5 (the test median 2.5 would also make 3 high); fold 1:
    # the training median is 50, below every test risk (the test median 200 would make only
    # 300 high); the risk equal to its threshold (5) is low
    risk = [1, 10, 2, 3, 5, 100, 300, 200]
    preds = _frame(risk, [0, 0, 0, 0, 0, 1, 1, 1], risk_threshold=[5.0] * 5 + [50.0] * 3)
    groups = risk_groups(preds)
    assert list(groups["group"]) == _oracle_groups(preds)
    assert list(groups["group"]) == ["low", "high", "low", "low", "low", "high", "high", "high"]
    assert list(groups["threshold"]) == [5.0] * 5 + [50.0] * 3
    assert (groups["threshold_source"] == "train").all()
    # not what the test folds' own medians give
    test_median = preds.groupby("fold")["risk"].transform("median")
    assert list(groups["group"]) != list(np.where(preds["risk"] > test_median, "high", "low"))


def test_risk_groups_use_the_test_median_only_for_folds_without_a_threshold() -> None:
    risk = [1.0, 10.0, 2.0, 3.0, 100.0, 300.0, 200.0]
    preds = _frame(risk, [0, 0, 0, 0, 1, 1, 1], risk_threshold=[5.0] * 4 + [np.nan] * 3)
    groups = risk_groups(preds)
    assert list(groups["group"]) == ["low", "high", "low", "low", "low", "high", "low"]
    assert list(groups["threshold_source"]) == ["train"] * 4 + ["test"] * 3
    assert list(groups["threshold"]) == [5.0] * 4 + [200.0] * 3


def test_risk_groups_refuse_a_threshold_that_is_not_one_value_per_fold() -> None:
    varying = _frame([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], risk_threshold=[1.5, 2.5, 3.0, 3.0])
    partial = _frame([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], risk_threshold=[1.5, 1.5, 3.0, np.nan])
    infinite = _frame([1.0, 2.0], [0, 0], risk_threshold=[np.inf, np.inf])
    for preds, needle in ((varying, "fold 0"), (partial, "fold 1"), (infinite, "infinite")):
        with pytest.raises(ConfigError, match="risk_threshold") as info:
            risk_groups(preds)
        assert needle in str(info.value)


def test_risk_groups_ties_at_the_median_are_low() -> None:
    groups = risk_groups(_frame([5.0, 5.0, 5.0, 7.0], [0, 0, 0, 0]))
    assert list(groups["group"]) == ["low", "low", "low", "high"]


def test_risk_groups_lists_every_problem() -> None:
    preds = _frame([1.0, np.nan, 2.0, 3.0], [0, 0, 1, 1])
    preds.loc[3, "seed"] = 1
    preds.loc[2, "model"] = "transmil"
    preds.loc[1, "event"] = 2.0
    with pytest.raises(ConfigError) as info:
        risk_groups(preds)
    message = str(info.value)
    for needle in ("more than one model", "more than one seed", "risk", "event must be 0 or 1"):
        assert needle in message


def test_risk_groups_names_missing_columns() -> None:
    with pytest.raises(ConfigError, match="missing columns: risk"):
        risk_groups(_frame([1.0, 2.0], [0, 0]).drop(columns="risk"))


# ------------------------------------------------------------------------------ Kaplan-Meier


def test_km_p_value_is_lifelines_logrank_on_the_same_groups() -> None:
    groups = risk_groups(_planted(n=80, seed=5))
    fig, p_value = km_figure(groups, "os")
    high, low = groups[groups["group"] == "high"], groups[groups["group"] == "low"]
    expected = logrank_test(
        high["time"], low["time"], event_observed_A=high["event"], event_observed_B=low["event"]
    ).p_value
    assert p_value == pytest.approx(expected, rel=1e-12)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"high risk (n={len(high)})", f"low risk (n={len(low)})"]
    assert "log-rank p" in fig.axes[0].get_title()


def test_km_planted_separation_and_shuffled_groups() -> None:
    _, p_planted = km_figure(risk_groups(_planted(seed=1)), "planted")
    _, p_shuffled = km_figure(risk_groups(_planted(seed=1, shuffle=True)), "shuffled")
    assert p_planted < 1e-3
    assert p_shuffled > 0.05


def test_km_numbers_at_risk_at_time_zero_are_group_sizes() -> None:
    groups = risk_groups(_planted(n=60, seed=2))
    fig, _ = km_figure(groups, "os")
    table = fig.axes[1]
    at_zero = sorted(int(t.get_text()) for t in table.texts if t.get_position()[0] == 0)
    assert at_zero == sorted(groups["group"].value_counts().tolist())


def test_km_with_one_group_has_no_p_value() -> None:
    groups = risk_groups(_frame([1.0] * 6, [0, 0, 0, 1, 1, 1]))  # all tied: everyone "low"
    _, p_value = km_figure(groups, "flat")
    assert math.isnan(p_value)


def test_figures_leave_pyplot_alone() -> None:
    before = plt.get_fignums()
    km_figure(risk_groups(_planted(n=40)), "os")
    heatmap_figure(pd.DataFrame({"a": [0.5]}, index=["t"]), "h")
    preds = _classified(("MSI", "MSS"))
    curves = ClassifierCurves(
        "abmil", mean_roc_curve(preds, ["MSI", "MSS"]), calibration_bins(preds, ["MSI", "MSS"])
    )
    classification_figure([curves], "msi")
    assert plt.get_fignums() == before


# ------------------------------------------------------------------------------ ROC, calibration


def _classified(
    classes: tuple[str, ...], n: int = 40, seeds: tuple[int, ...] = (0, 1), folds: int = 3
) -> pd.DataFrame:
    """One entry's test predictions with a signal, in several seeds and folds; probabilities
    rounded to 0.05 so that many scores tie (ties are where ROC implementations differ)."""
    rng = np.random.default_rng(len(classes))
    rows = []
    for seed in seeds:
        label = rng.integers(0, len(classes), size=n)
        logits = rng.normal(size=(n, len(classes)))
        logits[np.arange(n), label] += 1.0
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        probs = np.round(probs / 0.05) * 0.05
        probs[:, 0] = 1.0 - probs[:, 1:].sum(axis=1)  # rows still sum to 1
        probs = np.clip(probs, 0.0, 1.0)
        for i in range(n):
            rows.append(
                {
                    "task": "t",
                    "feature_set": "uni",
                    "model": "abmil",
                    "seed": seed,
                    "fold": i % folds,
                    "patient_id": f"p{i:02d}",
                    "label": classes[label[i]],
                    **{f"prob_{c}": probs[i, k] for k, c in enumerate(classes)},
                }
            )
    return pd.DataFrame(rows)


def _sklearn_auc(cell: pd.DataFrame, classes: list[str]) -> float:
    """Binary AUC of classes[-1], or the mean one-vs-rest AUC over the classes present."""
    if len(classes) == 2:
        return float(roc_auc_score(cell["label"] == classes[-1], cell[f"prob_{classes[-1]}"]))
    present = [c for c in classes if (cell["label"] == c).any()]
    return float(np.mean([roc_auc_score(cell["label"] == c, cell[f"prob_{c}"]) for c in present]))


def test_roc_of_one_fold_is_sklearns_curve() -> None:
    preds = _classified(("MSI", "MSS"), seeds=(0,), folds=1)
    curve = mean_roc_curve(preds, ["MSI", "MSS"])
    fpr, tpr, _ = roc_curve(preds["label"] == "MSS", preds["prob_MSS"], drop_intermediate=False)
    # the same path: scikit-learn's vertices with each vertical run reduced to its two ends
    ends = pd.DataFrame({"fpr": fpr, "tpr": tpr}).groupby("fpr")["tpr"].agg(["min", "max"])
    want = [(x, y) for x, row in ends.iterrows() for y in dict.fromkeys((row["min"], row["max"]))]
    np.testing.assert_allclose(curve.fpr, [x for x, _ in want], atol=1e-12)
    np.testing.assert_allclose(curve.tpr, [y for _, y in want], atol=1e-12)
    assert len(want) < fpr.size  # there were vertical runs to reduce
    assert curve.n_cells == 1
    assert curve.auc == pytest.approx(roc_auc_score(preds["label"] == "MSS", preds["prob_MSS"]))
    frame = curve.frame()
    assert list(frame.columns) == ["point", "fpr", "tpr"] and len(frame) == len(want)


@pytest.mark.parametrize("classes", [("MSI", "MSS"), ("A", "B", "C", "D")])
def test_mean_roc_area_is_the_mean_per_fold_auc(classes: tuple[str, ...]) -> None:
    preds = _classified(classes, n=36)
    if len(classes) > 2:
        # a fold without class D (it drops out of that fold's macro mean) and one with a single
        # class (no AUC: left out, as the benchmark's statistics do)
        preds = preds[~((preds["seed"] == 0) & (preds["fold"] == 1) & (preds["label"] == "D"))]
        single = (preds["seed"] == 1) & (preds["fold"] == 2)
        preds = preds[~single | (preds["label"] == "A")]
    cells = [cell for _, cell in preds.groupby(["seed", "fold"])]
    want = [_sklearn_auc(c, list(classes)) for c in cells if c["label"].nunique() > 1]
    assert len(want) == (6 if len(classes) == 2 else 5)
    curve = mean_roc_curve(preds, list(classes))
    assert curve.n_cells == len(want)
    assert curve.auc == pytest.approx(float(np.mean(want)), abs=1e-12)
    # a curve from (0, 0) to (1, 1), never going back
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (np.diff(curve.fpr) >= 0).all() and (np.diff(curve.tpr) >= -1e-12).all()
    # between vertices it is the vertical mean of scikit-learn's per-fold (per-class) curves
    x = np.random.default_rng(3).uniform(0.01, 0.99, size=25)
    per_cell = []
    for cell in cells:
        present = [c for c in classes if (cell["label"] == c).any()]
        if len(present) < 2:
            continue
        split = [classes[-1]] if len(classes) == 2 else present
        ys = []
        for c in split:
            fpr, tpr, _ = roc_curve(cell["label"] == c, cell[f"prob_{c}"], drop_intermediate=False)
            ys.append(np.interp(x, fpr, tpr))
        per_cell.append(np.mean(ys, axis=0))
    np.testing.assert_allclose(np.interp(x, curve.fpr, curve.tpr), np.mean(per_cell, axis=0))


def test_roc_without_any_fold_with_two_classes_is_empty() -> None:
    preds = _classified(("MSI", "MSS")).assign(label="MSS")
    curve = mean_roc_curve(preds, ["MSI", "MSS"])
    assert curve.n_cells == 0 and curve.fpr.size == 0 and math.isnan(curve.auc)


def _hand_bins(p: list[float], y: list[float], n_bins: int) -> list[tuple[int, float, float]]:
    """(n, mean predicted, observed) of each bin [k/n, (k+1)/n), the last one closed."""
    out = []
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        inside = [i for i, v in enumerate(p) if lo <= v < hi or (k == n_bins - 1 and v == 1.0)]
        if inside:
            mean_p = sum(p[i] for i in inside) / len(inside)
            obs = sum(y[i] for i in inside) / len(inside)
            out.append((len(inside), mean_p, obs))
        else:
            out.append((0, math.nan, math.nan))
    return out


def test_binary_calibration_bins_equal_a_hand_computation() -> None:
    # values on bin edges (0, 0.3, 0.5, 1) go to the bin they open (1 to the last)
    p = [0.0, 0.05, 0.3, 0.29, 0.31, 0.5, 0.5, 0.55, 0.7, 0.95, 1.0, 1.0]
    y = [0, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0]
    preds = pd.DataFrame(
        {
            "seed": [0] * 6 + [1] * 6,
            "fold": [0, 1] * 6,
            "label": ["pos" if v else "neg" for v in y],
            "prob_neg": [1 - v for v in p],
            "prob_pos": p,
        }
    )
    cal = calibration_bins(preds, ["neg", "pos"])
    assert cal.target == "P(pos)" and cal.n == len(p)
    bins = cal.bins
    assert list(bins.columns) == ["bin", "lower", "upper", "n", "mean_predicted", "observed"]
    assert bins["lower"].tolist() == [k / 10 for k in range(10)]
    hand = _hand_bins(p, [float(v) for v in y], 10)
    assert bins["n"].tolist() == [n for n, _, _ in hand]
    np.testing.assert_allclose(bins["mean_predicted"], [m for _, m, _ in hand])
    np.testing.assert_allclose(bins["observed"], [o for _, _, o in hand])
    ece = sum(n * abs(m - o) for n, m, o in hand if n) / len(p)
    assert cal.ece == pytest.approx(ece)
    assert cal.brier == pytest.approx(sum((a - b) ** 2 for a, b in zip(p, y, strict=True)) / len(p))
    # 4 bins: a different grid, the same rule
    four = calibration_bins(preds, ["neg", "pos"], n_bins=4).bins
    assert four["n"].tolist() == [n for n, _, _ in _hand_bins(p, [float(v) for v in y], 4)]


def test_multiclass_calibration_bins_the_top_label_confidence() -> None:
    probs = np.array(
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8], [0.45, 0.45, 0.1]]
    )
    labels = ["A", "A", "C", "C", "B"]
    preds = pd.DataFrame(
        {
            "seed": 0,
            "fold": 0,
            "label": labels,
            **{f"prob_{c}": probs[:, k] for k, c in enumerate("ABC")},
        }
    )
    cal = calibration_bins(preds, ["A", "B", "C"])
    assert cal.target == "top-label confidence"
    # top labels A, B, A, C, A (a tie goes to the first class): right, wrong, wrong, right, wrong
    hand = _hand_bins([0.6, 0.7, 0.34, 0.8, 0.45], [1.0, 0.0, 0.0, 1.0, 0.0], 10)
    assert cal.bins["n"].tolist() == [n for n, _, _ in hand]
    np.testing.assert_allclose(cal.bins["observed"], [o for _, _, o in hand])
    onehot = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    assert cal.brier == pytest.approx(float(((probs - onehot) ** 2).sum(axis=1).mean()))


def test_classification_inputs_list_every_problem() -> None:
    preds = _classified(("MSI", "MSS"))
    bad = preds.assign(model=["a", "b"] * (len(preds) // 2))
    bad.loc[0, "prob_MSS"] = np.nan
    bad.loc[1, "label"] = "MSX"
    with pytest.raises(ConfigError) as info:
        mean_roc_curve(bad, ["MSI", "MSS"])
    for needle in ("more than one model", "non-finite", "labels not in classes"):
        assert needle in str(info.value)
    with pytest.raises(ConfigError, match="prob_MSS"):
        calibration_bins(preds.drop(columns="prob_MSS"), ["MSI", "MSS"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        calibration_bins(preds.assign(prob_MSS=preds["prob_MSS"] + 1), ["MSI", "MSS"])
    with pytest.raises(ConfigError, match="n_bins"):
        calibration_bins(preds, ["MSI", "MSS"], n_bins=0)


def test_classification_figure_legends_give_auc_ece_and_brier() -> None:
    classes = ["MSI", "MSS"]
    entries = []
    for name, preds in (
        ("abmil", _classified(("MSI", "MSS"))),
        ("flat", _classified(("MSI", "MSS")).assign(label="MSS")),
    ):
        entries.append(
            ClassifierCurves(name, mean_roc_curve(preds, classes), calibration_bins(preds, classes))
        )
    fig = classification_figure(entries, "msi", colours=["#111111", "#222222"])
    roc_ax, cal_ax = fig.axes
    auc = entries[0].roc.auc
    assert [t.get_text() for t in roc_ax.get_legend().get_texts()] == [
        f"abmil (AUC {auc:.3f})",
        "flat (AUC n/a)",
    ]
    cal = entries[0].calibration
    assert cal_ax.get_legend().get_texts()[0].get_text() == (
        f"abmil (ECE {cal.ece:.3f}, Brier {cal.brier:.3f})"
    )
    # the drawn ROC line is the curve itself
    np.testing.assert_array_equal(roc_ax.get_lines()[1].get_xdata(), entries[0].roc.fpr)
    with pytest.raises(ConfigError, match="at least one"):
        classification_figure([], "none")


# ------------------------------------------------------------------------------ heat map, PNG


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def test_heatmap_annotates_every_cell_and_has_a_colorbar() -> None:
    matrix = pd.DataFrame(
        {"uni · abmil": [0.7421, 0.61], "ctp · linear": [0.655, np.nan]}, index=["os", "msi"]
    )
    fig = heatmap_figure(matrix, "primary metric")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(["0.742", "0.610", "0.655", "–"])
    assert len(fig.axes) == 2  # the heat map and its colorbar
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(matrix.columns)


def test_heatmap_rejects_an_empty_matrix() -> None:
    with pytest.raises(ConfigError, match="empty"):
        heatmap_figure(pd.DataFrame(), "nothing")


def test_pngs_decode_with_sensible_sizes() -> None:
    fig, _ = km_figure(risk_groups(_planted(n=60)), "os")
    km = _decode(figure_png_base64(fig, dpi=100))
    assert km.format == "PNG"
    assert 350 < km.width < 900 and 300 < km.height < 800
    small = _decode(figure_png_base64(fig, dpi=50))
    assert small.width == pytest.approx(km.width / 2, abs=15)

    narrow = heatmap_figure(pd.DataFrame({"a": [0.5, 0.6]}, index=["t1", "t2"]), "h")
    wide = heatmap_figure(pd.DataFrame({f"e{i}": [0.5, 0.6] for i in range(8)}), "h")
    narrow_png, wide_png = _decode(figure_png_base64(narrow)), _decode(figure_png_base64(wide))
    assert 200 < narrow_png.width < wide_png.width < 2000
