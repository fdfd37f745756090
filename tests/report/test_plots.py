"""Report figures: within-fold risk groups, Kaplan-Meier log-rank p-values, heat maps, PNGs."""

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

from oncoslide.errors import ConfigError
from oncoslide.report.plots import figure_png_base64, heatmap_figure, km_figure, risk_groups


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
    assert plt.get_fignums() == before


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
