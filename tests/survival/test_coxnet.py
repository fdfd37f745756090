"""Elastic-net Cox (oncoslide.survival.coxnet) against independent oracles.

Oracles: scikit-survival's CoxnetSurvivalAnalysis (GPL, used only here as a reference), lifelines'
unpenalised CoxPHFitter, a brute-force O(n^2) Breslow likelihood minimised by scipy, and planted
ground truth.
"""

from __future__ import annotations

import time as clock

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

import oncoslide.survival.coxnet as coxnet_module
from oncoslide.errors import ConfigError
from oncoslide.survival.coxnet import ElasticNetCox, alpha_max, alpha_path, fit_select_alpha
from oncoslide.survival.metrics import ConcordanceResult, concordance_index_censored

WhasData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def whas500() -> WhasData:
    """WHAS500 (500 patients, 215 events, tied times): numeric columns, categoricals one-hot."""
    datasets = pytest.importorskip("sksurv.datasets")
    X, y = datasets.load_whas500()
    x = pd.get_dummies(X, drop_first=True, dtype=float).astype(float).to_numpy()
    return x, y["lenfol"].astype(float), y["fstat"].astype(bool), y


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What sklearn's StandardScaler does: centre, divide by the population sd."""
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / sd, sd


def _sksurv_coef(x: np.ndarray, y: np.ndarray, alpha: float, **kwargs: object) -> np.ndarray:
    sksurv_lm = pytest.importorskip("sksurv.linear_model")
    ref = sksurv_lm.CoxnetSurvivalAnalysis(
        l1_ratio=kwargs.pop("l1_ratio", 0.5),
        alphas=[alpha],
        fit_baseline_model=False,
        tol=1e-12,
        max_iter=1_000_000,
        **kwargs,
    ).fit(x, y)
    return np.asarray(ref.coef_[:, 0])


def _assert_close_coef(ours: np.ndarray, ref: np.ndarray, rel: float) -> None:
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(ours - ref).max() <= rel * scale, (ours, ref)


# --------------------------------------------------------------------------- scikit-survival


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.01])
def test_standardized_fit_equals_sksurv_coxnet_on_standardscaled_features(
    whas500: WhasData, fraction: float
) -> None:
    # standardize=True is StandardScaler + CoxnetSurvivalAnalysis(normalize=False); sksurv's
    # coefficients are then on the standardised scale, ours on the original one.
    x, time, event, y = whas500
    alpha = fraction * alpha_max(x, time, event)
    z, sd = _standardise(x)
    ref = _sksurv_coef(z, y, alpha, normalize=False) / sd
    model = ElasticNetCox(alpha, 0.5, tol=1e-10).fit(x, time, event)
    assert model.converged_
    _assert_close_coef(model.coef_, ref, rel=1e-4)
    assert np.array_equal(model.coef_ != 0, np.abs(ref) > 1e-8)


def test_raw_fit_equals_sksurv_coxnet_without_normalisation(whas500: WhasData) -> None:
    x, time, event, y = whas500
    alpha = 0.05 * alpha_max(x, time, event, standardize=False)
    ref = _sksurv_coef(x, y, alpha, normalize=False)
    model = ElasticNetCox(alpha, 0.5, standardize=False, tol=1e-10).fit(x, time, event)
    _assert_close_coef(model.coef_, ref, rel=1e-4)


def test_sksurv_normalize_true_divides_by_the_column_norm_not_the_sd(whas500: WhasData) -> None:
    # Documents why standardize=True is compared with StandardScaler + normalize=False: sksurv's
    # normalize=True scales by ||x - mean||_2 = sd * sqrt(n), which changes what alpha means.
    x, time, event, y = whas500
    norms = np.linalg.norm(x - x.mean(axis=0), axis=0)
    alpha = 0.2 * alpha_max(x / norms, time, event, standardize=False)
    ref = _sksurv_coef(x, y, alpha, normalize=True)
    ours = ElasticNetCox(alpha, standardize=False, tol=1e-10).fit(x / norms, time, event)
    _assert_close_coef(ours.coef_ / norms, ref, rel=1e-4)
    standardised = ElasticNetCox(alpha, tol=1e-10).fit(x, time, event)
    assert np.abs(standardised.coef_ - ref).max() > 0.1 * np.abs(ref).max()


def test_alpha_path_starts_where_all_coefficients_vanish(whas500: WhasData) -> None:
    x, time, event, y = whas500
    path = alpha_path(x, time, event, n_alphas=6, min_ratio=0.02)
    sksurv_lm = pytest.importorskip("sksurv.linear_model")
    z, _ = _standardise(x)
    ref = sksurv_lm.CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=6, alpha_min_ratio=0.02)
    assert path[0] == pytest.approx(ref.fit(z, y).alphas_[0], rel=1e-9)
    assert path[-1] == pytest.approx(0.02 * path[0], rel=1e-12)
    np.testing.assert_allclose(path[1:] / path[:-1], 0.02 ** (1 / 5), rtol=1e-12)
    assert not ElasticNetCox(path[0]).fit(x, time, event).coef_.any()
    assert ElasticNetCox(0.98 * path[0]).fit(x, time, event).coef_.any()
    # the lasso end of the mixing range: alpha_max scales with 1 / l1_ratio
    lasso = alpha_path(x, time, event, l1_ratio=1.0, n_alphas=1)
    assert lasso[0] == pytest.approx(0.5 * path[0], rel=1e-12)


# --------------------------------------------------------------------------- unpenalised limit


def test_vanishing_penalty_equals_lifelines_unpenalised_cox(whas500: WhasData) -> None:
    # lifelines handles ties with Efron's method, we with Breslow's: the times are made distinct
    # (the k-th of a tied group gets +k/1000 day, which keeps the order), so both are exact.
    lifelines = pytest.importorskip("lifelines")
    x, time, event, _ = whas500
    order = np.lexsort((np.arange(time.size), time))
    sorted_t = time[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_t)) + 1]
    rank_in_group = np.arange(time.size) - np.repeat(starts, np.diff(np.r_[starts, time.size]))
    distinct = time.copy()
    distinct[order] = sorted_t + 1e-3 * rank_in_group
    assert np.unique(distinct).size == distinct.size
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    frame = frame.assign(T=distinct, E=event.astype(int))
    ref = lifelines.CoxPHFitter(penalizer=0.0).fit(
        frame, "T", "E", fit_options={"precision": 1e-12}
    )
    for l1_ratio in (1.0, 0.5):
        ours = ElasticNetCox(1e-8, l1_ratio, tol=1e-10).fit(x, distinct, event)
        np.testing.assert_allclose(ours.coef_, ref.params_.to_numpy(), rtol=1e-4)


def _breslow_objective(b: np.ndarray, x: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """-(1/n) log PL with Breslow ties, written the slow obvious way (the test's own oracle)."""
    eta = x @ b
    total = 0.0
    for i in np.flatnonzero(event):
        at_risk = time >= time[i]
        total += eta[i] - np.log(np.exp(eta[at_risk]).sum())
    return -total / time.size


def test_ridge_with_heavy_ties_equals_brute_force_breslow_minimum() -> None:
    rng = np.random.default_rng(0)
    n, d, alpha = 60, 4, 0.05
    x = rng.normal(size=(n, d)) * [1.0, 2.0, 0.5, 3.0] + 4.0
    time = np.round(rng.exponential(np.exp(-(x[:, 0] - 4.0))), 1)  # many tied times
    event = rng.random(n) < 0.7
    assert np.unique(time).size < n - 10
    z = (x - x.mean(axis=0)) / x.std(axis=0)

    def objective(b: np.ndarray) -> float:
        return _breslow_objective(b, z, time, event) + 0.5 * alpha * float(b @ b)

    ref = minimize(objective, np.zeros(d), method="BFGS", options={"gtol": 1e-10}).x
    model = ElasticNetCox(alpha, l1_ratio=0.0, tol=1e-10).fit(x, time, event)
    np.testing.assert_allclose(model.coef_ * x.std(axis=0), ref, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- planted signal


def _planted(
    n: int, d: int, rng: np.random.Generator, beta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, d))
    hazard = np.exp(x[:, : beta.size] @ beta)
    event_time = rng.exponential(1.0 / hazard)
    censor_time = rng.exponential(2.0, size=n)
    return x, np.minimum(event_time, censor_time), event_time <= censor_time


def test_more_features_than_patients_is_sparse_and_finds_the_planted_signal() -> None:
    rng = np.random.default_rng(1)
    beta = np.array([1.0, -1.0, 0.8, -0.8, 0.8])
    train = _planted(80, 300, rng, beta)
    val = _planted(40, 300, rng, beta)
    test = _planted(500, 300, rng, beta)
    model, _, _ = fit_select_alpha(*train, *val)
    assert model.converged_
    nonzero = np.flatnonzero(model.coef_)
    assert 0 < nonzero.size < 60
    top = np.argsort(-np.abs(model.coef_))[:5]
    assert np.isin(top, np.arange(5)).sum() >= 4  # the planted features dominate
    cindex = concordance_index_censored(test[2], test[1], model.predict(test[0])).cindex
    assert cindex > 0.7
    # the same procedure with outcomes shuffled against the features learns nothing
    perm_train, perm_val = rng.permutation(80), rng.permutation(40)
    null, _, _ = fit_select_alpha(
        train[0], train[1][perm_train], train[2][perm_train],
        val[0], val[1][perm_val], val[2][perm_val],
    )  # fmt: skip
    null_c = concordance_index_censored(test[2], test[1], null.predict(test[0])).cindex
    assert abs(null_c - 0.5) < 0.08


def test_direct_fit_with_more_features_than_patients_converges_and_is_sparse() -> None:
    rng = np.random.default_rng(2)
    x, time, event = _planted(80, 300, rng, np.array([1.0, -1.0, 0.8, -0.8, 0.8]))
    model = ElasticNetCox(0.2 * alpha_max(x, time, event)).fit(x, time, event)
    assert model.converged_ and model.kkt_violation_ <= model.tol
    assert 0 < np.count_nonzero(model.coef_) < 80


def test_fit_select_alpha_scores_refits_and_breaks_ties_towards_larger_alpha(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(3)
    beta = np.array([0.7, -0.7, 0.5])
    xt, tt, et = _planted(150, 40, rng, beta)
    xv, tv, ev = _planted(80, 40, rng, beta)
    model, alpha, scores = fit_select_alpha(xt, tt, et, xv, tv, ev, n_alphas=8)
    path = alpha_path(xt, tt, et, n_alphas=8)
    assert len(scores) == 8 and alpha in path
    best = int(np.argmax(scores))
    assert alpha == path[best] and best > 0  # the all-zero first model is not the winner
    assert scores[0] == 0.5  # all-zero risks: every comparable pair is a tie
    # each score is the validation C-index of a cold fit on the training part alone
    for k in (0, best, 7):
        cold = ElasticNetCox(path[k], tol=1e-9).fit(xt, tt, et)
        expected = concordance_index_censored(ev, tv, cold.predict(xv)).cindex
        assert scores[k] == pytest.approx(expected, abs=1e-3)
    # the returned model is a refit on exactly training + validation
    refit = ElasticNetCox(alpha).fit(np.vstack([xt, xv]), np.r_[tt, tv], np.r_[et, ev])
    np.testing.assert_allclose(model.coef_, refit.coef_, rtol=1e-5, atol=1e-8)
    # equal scores everywhere: the largest alpha (sparsest model) wins
    monkeypatch.setattr(
        coxnet_module,
        "concordance_index_censored",
        lambda *_: ConcordanceResult(0.6, 1, 0, 0, 0),
    )
    _, tied_alpha, _ = fit_select_alpha(xt, tt, et, xv, tv, ev, n_alphas=8)
    assert tied_alpha == path[0]


def test_constant_columns_get_zero_and_leave_the_rest_unchanged() -> None:
    rng = np.random.default_rng(4)
    x, time, event = _planted(120, 6, rng, np.array([0.8, -0.5]))
    with_constant = np.column_stack([x[:, :3], np.full(120, 7.0), x[:, 3:]])
    alpha = 0.05
    plain = ElasticNetCox(alpha, tol=1e-10).fit(x, time, event)
    padded = ElasticNetCox(alpha, tol=1e-10).fit(with_constant, time, event)
    assert padded.coef_[3] == 0.0
    np.testing.assert_allclose(np.delete(padded.coef_, 3), plain.coef_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(padded.predict(with_constant), plain.predict(x), atol=1e-10)


def test_predict_is_the_centred_linear_predictor_and_orders_hazards() -> None:
    rng = np.random.default_rng(5)
    x, time, event = _planted(200, 5, rng, np.array([1.0, -1.0]))
    model = ElasticNetCox(0.02).fit(pd.DataFrame(x), list(time), event.astype(int))
    risk = model.predict(x.astype(np.float32))
    np.testing.assert_allclose(risk, (x - x.mean(axis=0)) @ model.coef_, atol=1e-5)
    assert model.coef_[0] > 0 > model.coef_[1]  # the planted directions
    assert concordance_index_censored(event, time, risk).cindex > 0.7


def test_one_alpha_on_a_thousand_patients_and_1536_correlated_features_is_fast() -> None:
    # the size of the benchmark's largest linear-protocol problems; embeddings are correlated
    rng = np.random.default_rng(6)
    n, d = 1000, 1536
    factors = rng.normal(size=(n, 30)) @ rng.normal(size=(30, d)) / np.sqrt(30)
    x = factors + 0.5 * rng.normal(size=(n, d))
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    event_time = rng.exponential(np.exp(-(z[:, :5] @ np.full(5, 0.3))))
    censor_time = rng.exponential(np.quantile(event_time, 0.7), size=n)
    time, event = np.minimum(event_time, censor_time), event_time <= censor_time
    alpha = 0.05 * alpha_max(x, time, event)
    started = clock.perf_counter()
    model = ElasticNetCox(alpha).fit(x, time, event)
    elapsed = clock.perf_counter() - started
    assert model.converged_ and np.count_nonzero(model.coef_) > 20
    assert elapsed < 15.0, f"took {elapsed:.1f} s"


# --------------------------------------------------------------------------- errors


def test_all_data_problems_are_reported_together_as_config_error() -> None:
    rng = np.random.default_rng(7)
    x, time, event = _planted(20, 3, rng, np.array([0.5]))
    x[2, 1] = np.nan
    x[5, 0] = np.inf
    bad_time = time.copy()
    bad_time[:3] = -1.0
    with pytest.raises(ConfigError) as info:
        ElasticNetCox().fit(x, bad_time, event)
    message = str(info.value)
    assert "2 non-finite value(s) (NaN or inf)" in message
    assert "time has 3 negative value(s)" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda x, t, e: (x[:15], t, e), "lengths differ: X has 15 rows"),
        (lambda x, t, e: (x, t, np.zeros_like(e)), "no events"),
        (lambda x, t, e: (x, t, np.where(e, 2, 0)), "event must be boolean or 0/1"),
        (lambda x, t, e: (x[:, 0], t, e), "X must be 2-D"),
        (lambda x, t, e: (x, np.where(e, np.nan, t), e), "time has"),
        (lambda x, t, e: (x[:, :0], t, e), "no feature columns"),
    ],
)
def test_bad_data_is_a_typed_error_naming_the_problem(change, expected: str) -> None:
    rng = np.random.default_rng(8)
    x, time, event = _planted(20, 3, rng, np.array([0.5]))
    with pytest.raises(ConfigError, match=expected):
        ElasticNetCox().fit(*change(x, time, event))


def test_bad_hyper_parameters_and_predict_misuse_are_typed_errors() -> None:
    rng = np.random.default_rng(9)
    x, time, event = _planted(30, 3, rng, np.array([0.5]))
    with pytest.raises(ConfigError) as info:
        ElasticNetCox(alpha=0.0, l1_ratio=1.5, max_iter=0, tol=-1.0).fit(x, time, event)
    for name in ("alpha", "l1_ratio", "max_iter", "tol"):
        assert f"{name} must be" in str(info.value)
    with pytest.raises(ConfigError, match="not fitted"):
        ElasticNetCox().predict(x)
    model = ElasticNetCox().fit(x, time, event)
    with pytest.raises(ConfigError, match="2 feature columns but the model was fitted on 3"):
        model.predict(x[:, :2])
    with pytest.raises(ConfigError, match="non-finite"):
        model.predict(np.full((2, 3), np.nan))
    with pytest.raises(ConfigError, match="pure ridge"):
        alpha_path(x, time, event, l1_ratio=0.0)
    with pytest.raises(ConfigError, match="min_ratio"):
        alpha_path(x, time, event, min_ratio=1.0)


def test_fit_select_alpha_rejects_inconsistent_parts() -> None:
    rng = np.random.default_rng(10)
    xt, tt, et = _planted(40, 4, rng, np.array([0.5]))
    xv, tv, ev = _planted(20, 4, rng, np.array([0.5]))
    with pytest.raises(ConfigError, match="X_train has 4 features but X_val has 3"):
        fit_select_alpha(xt, tt, et, xv[:, :3], tv, ev)
    with pytest.raises(ConfigError, match="event_val has no events"):
        fit_select_alpha(xt, tt, et, xv, tv, np.zeros(20, dtype=bool))
    with pytest.raises(ConfigError, match="time_train has 1 negative"):
        fit_select_alpha(xt, np.r_[-1.0, tt[1:]], et, xv, tv, ev)
