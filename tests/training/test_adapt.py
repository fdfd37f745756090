"""Test-time adaptation (``predict --adapt``): stored training statistics, re-standardisation,
entropy minimisation of normalisation parameters only, and labels of the new site never read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.training.adapt import (
    ADAPTATION_FILE,
    ADAPTATION_TABLE,
    UNADAPTED_FILE,
    AdaptConfig,
    SiteAdaptedModel,
    _log_distribution,
    coral_map,
    decision_bias,
    pair_tissues,
    tissue_alignment,
    training_prior,
)
from oncoslide.training.feature_stats import (
    FEATURE_STATS_FILE,
    FeatureStats,
    share_covariance,
    tissue_clusters,
    tissue_partition,
    tissue_signature,
    tissue_summary,
    with_tissues,
)
from oncoslide.training.fit_all import fit_all
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_cohort

FAST = dict(epochs=2, batch_size=8, n_boot=20, progress=False)


# the default before per-tissue alignment (re-standardisation, 10 entropy steps with the
# diversity term, decision matching): the tests of those steps name it
ENTROPY_STEPS = AdaptConfig(align="standardise", steps=10, match="decisions")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small site-shift world: 3 sites, the last scanned differently (preset settings kept)."""
    out = tmp_path_factory.mktemp("site-shift")
    config = make_simulation_config(
        "site-shift",
        {
            "n_patients": 90,
            "sites_per_cohort": 3,
            "feature_dim": 16,
            "patches_median": 30,
            "patches_min": 10,
            "n_genes": 24,
            "seed": 5,
        },
    )
    simulate_cohort(out, config)
    return out


def _tables(world: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = pd.read_csv(world / "cohort.csv", dtype={"patient_id": str})
    shifted = json.loads((world / "truth.json").read_text())["site_shift"]["shifted_sites"]
    is_shifted = table["site"].isin(shifted)
    return table[~is_shifted], table[is_shifted]


def _fit(world: Path, out: Path, **kw: object) -> Path:
    source, _ = _tables(world)
    task = str(kw.pop("task", "msi"))
    labels = () if task == "survival" else (task,)
    cohort = load_cohort(source, world / "features", label_cols=labels)
    fit_all(cohort, make_config(task=task, **{**FAST, **kw}), out)
    return out


@pytest.fixture(scope="module")
def msi_model(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fit(world, tmp_path_factory.mktemp("msi") / "model")


def _add_tissue_summary(model: Path, world: Path, out: Path) -> Path:
    """A copy of ``model`` whose statistics hold the tissue summary of its training part, as
    ``with_tissues`` computes it (fit time in cv.py does not store it yet)."""
    out.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    parts = pd.read_csv(model / "patients.csv", dtype={"patient_id": str})
    train = parts.loc[parts["part"] == "train", "patient_id"]
    cohort = load_cohort(_tables(world)[0], world / "features")
    with FeatureCache() as cache:
        slides = [cache.get(p) for pid in train for p in cohort.slide_paths(pid)]
        stats = with_tissues(FeatureStats.load(model), [(s.features, s.coords) for s in slides])
    stats.save(out)
    return out


@pytest.fixture(scope="module")
def tissue_model(msi_model: Path, world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _add_tissue_summary(msi_model, world, tmp_path_factory.mktemp("tissues") / "model")


def _target(world: Path, table: pd.DataFrame | None = None, labels: tuple[str, ...] = ("msi",)):
    return load_cohort(
        _tables(world)[1] if table is None else table, world / "features", label_cols=labels
    )


def test_model_folder_stores_the_training_parts_feature_statistics(
    msi_model: Path, world: Path
) -> None:
    stats = FeatureStats.load(msi_model)
    parts = pd.read_csv(msi_model / "patients.csv", dtype={"patient_id": str})
    source, _ = _tables(world)
    cohort = load_cohort(source, world / "features")
    train = parts.loc[parts["part"] == "train", "patient_id"]
    with FeatureCache() as cache:
        x = np.concatenate(
            [cache.get(p).features for pid in train for p in cohort.slide_paths(pid)]
        ).astype(np.float64)
    # the training part only: validation patients are not in the statistics
    assert stats.n_patches == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.std, x.std(axis=0), rtol=1e-7)
    # the full covariance too (CORAL)
    assert stats.cov is not None
    np.testing.assert_allclose(stats.cov, np.cov(x.T, bias=True), rtol=1e-7, atol=1e-9)


def test_coral_gives_the_site_the_training_covariance() -> None:
    """Whitening with the site's covariance and re-colouring with training's undoes a mixing of
    the dimensions that per-dimension re-standardisation cannot (oracle: the sample moments)."""
    rng = np.random.default_rng(1)
    d = 5
    colour = rng.normal(size=(d, d))
    train_x = rng.normal(size=(4000, d)) @ colour + 3.0
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a rotation and gains: the new scanner
    site_x = (rng.normal(size=(3000, d)) @ colour) @ q * np.exp(rng.normal(0, 0.3, d)) - 1.0
    train, site = FeatureStats.of([train_x]), FeatureStats.of([site_x])
    assert site.cov is not None and train.cov is not None

    class Echo(torch.nn.Module):
        in_dim, n_outputs, dropout, hidden_dim, embed_dim = d, 1, 0.0, d, d

        def forward(self, features, mask, coords=None):
            return features

    def mapped(model: SiteAdaptedModel) -> np.ndarray:
        x = torch.tensor(site_x, dtype=torch.float32)[None]
        return model(x, torch.ones(1, len(site_x), dtype=torch.bool))[0].detach().double().numpy()

    coral = mapped(
        SiteAdaptedModel(Echo(), train, site.mean, site.std, coral_map(site.cov, train, 0.0))  # type: ignore[arg-type]
    )
    np.testing.assert_allclose(coral.mean(axis=0), train.mean, atol=1e-3)
    np.testing.assert_allclose(np.cov(coral.T, bias=True), train.cov, rtol=1e-3, atol=1e-3)
    # re-standardisation matches the variances but leaves the correlations of the site
    std = mapped(SiteAdaptedModel(Echo(), train, site.mean, site.std))  # type: ignore[arg-type]
    assert np.abs(np.cov(std.T, bias=True) - train.cov).max() > 0.1 * np.abs(train.cov).max()
    # shrinkage mixes in the scaled identity: the result is still well defined for one patch
    assert np.isfinite(coral_map(np.zeros((d, d)), train, 0.5)).all()


def test_restandardisation_maps_the_sites_statistics_onto_trainings() -> None:
    rng = np.random.default_rng(0)
    train = FeatureStats.of([rng.normal(2.0, 3.0, size=(500, 4))])
    site_x = rng.normal(-1.0, 0.5, size=(300, 4))
    site = FeatureStats.of([site_x])

    class Echo(torch.nn.Module):  # stands in for a model: returns its input features
        in_dim, n_outputs, dropout, hidden_dim, embed_dim = 4, 1, 0.0, 4, 4

        def forward(self, features, mask, coords=None):
            return features

    model = SiteAdaptedModel(Echo(), train, site.mean, site.std)  # type: ignore[arg-type]
    out = model(
        torch.tensor(site_x, dtype=torch.float32)[None], torch.ones(1, 300, dtype=torch.bool)
    )
    mapped = out[0].detach().double().numpy()
    np.testing.assert_allclose(mapped.mean(axis=0), train.mean, atol=1e-4)
    np.testing.assert_allclose(mapped.std(axis=0), train.std, rtol=1e-4)


def test_distribution_of_the_event_time_bin_sums_to_one() -> None:
    logits = torch.randn(5, 4)
    p = _log_distribution(logits, "time_bins").exp()
    assert p.shape == (5, 5)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(5, dtype=p.dtype))
    hazards = torch.sigmoid(logits)
    torch.testing.assert_close(p[:, 0], hazards[:, 0])  # P(first bin) = h_1
    torch.testing.assert_close(p[:, -1], torch.prod(1 - hazards, dim=1))  # survives every bin


def test_adapt_writes_before_and_after_and_changes_only_the_adapted_parameters(
    msi_model: Path, world: Path, tmp_path: Path
) -> None:
    trained = load_model_folder(msi_model)
    original = {k: v.clone() for k, v in trained.model.state_dict().items()}
    cohort = _target(world)
    plain = predict_cohort(trained, cohort, tmp_path / "plain", embeddings=False)
    adapted = predict_cohort(trained, cohort, tmp_path / "adapted", adapt=ENTROPY_STEPS)
    # the trained model itself is untouched; each site adapts a copy
    for k, v in trained.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    # the unadapted predictions written beside the adapted ones are plain predict's, exactly
    before = pd.read_parquet(tmp_path / "adapted" / UNADAPTED_FILE)
    assert before.equals(plain.predictions)
    assert not np.allclose(adapted.predictions["prob_1"], plain.predictions["prob_1"])
    doc = json.loads((tmp_path / "adapted" / ADAPTATION_FILE).read_text())
    assert doc["objective"] == "classes" and doc["labels_read"] is False
    (site,) = doc["sites"]
    assert site["patients"] == len(cohort.patient_ids)
    assert site["adapted_parameters"] == 2 * 16  # the input affine: ABMIL has no norm layer
    assert len(site["objective"]) == 11 and site["objective"][-1] < site["objective"][0]
    table = pd.read_csv(tmp_path / "adapted" / ADAPTATION_TABLE)
    assert set(table["metric"]) == {"auc", "balanced_accuracy"}
    assert (table["site"] == "all").all() and (table["patients"] == len(cohort.patient_ids)).all()
    assert np.isfinite(table[["before", "after"]].to_numpy()).all()
    # embeddings come from the adapted model too
    assert adapted.patient_embeddings.shape == plain.patient_embeddings.shape
    assert len(list((tmp_path / "adapted" / "slide_embeddings").glob("*.h5"))) == len(cohort.slides)


def test_adapted_predictions_never_read_the_new_sites_labels(
    msi_model: Path, tissue_model: Path, world: Path, tmp_path: Path
) -> None:
    """Planted labels that would help (the target, and a copy of it) change nothing."""
    trained = load_model_folder(msi_model)
    _, target = _tables(world)
    helpful = target.assign(msi_copy=target["msi"], msi_hint=target["msi"] * 10.0)
    altered = target.assign(msi=1 - target["msi"])
    no_labels = target.drop(columns=["msi", "time", "event", "subtype"])
    runs = {
        "helpful": _target(world, helpful, ("msi", "msi_copy", "msi_hint")),
        "altered": _target(world, altered),
        "none": _target(world, no_labels, ()),
    }
    # every alignment and diversity target: the fit-time statistics (covariance, class
    # frequencies) come from the model folder, never from the new site's labels
    settings = {
        "default": (trained, AdaptConfig()),
        "coral": (trained, AdaptConfig(align="coral", prior="training", steps=3)),
        # the tissue summary (cluster means, shares, adjacency) comes from the model folder too
        "tissues": (load_model_folder(tissue_model), AdaptConfig(align="tissues", steps=3)),
    }
    for setting, (trained, adapt) in settings.items():
        preds = {
            name: predict_cohort(trained, c, tmp_path / setting / name, adapt=adapt)
            for name, c in runs.items()
        }
        ref = preds["none"].predictions
        assert "label" not in ref
        assert not (tmp_path / setting / "none" / ADAPTATION_TABLE).exists()
        for name in ("helpful", "altered"):
            got = preds[name].predictions
            for column in ("prob_0", "prob_1"):
                assert np.array_equal(got[column].to_numpy(), ref[column].to_numpy()), name
            assert preds[name].patient_embeddings.equals(preds["none"].patient_embeddings)
    tmp_path = tmp_path / "default"
    # the labels are used afterwards, for evaluation only: flipping them flips the AUC
    auc = {
        name: pd.read_csv(tmp_path / name / ADAPTATION_TABLE)
        .set_index("metric")
        .loc["auc", "after"]
        for name in ("helpful", "altered")
    }
    assert auc["helpful"] == pytest.approx(1 - auc["altered"])


def test_each_site_adapts_on_its_own(msi_model: Path, world: Path, tmp_path: Path) -> None:
    """A cohort of several sites: one re-standardisation and one adaptation per site."""
    trained = load_model_folder(msi_model)
    table = pd.read_csv(world / "cohort.csv", dtype={"patient_id": str})
    both = predict_cohort(
        trained, _target(world, table), tmp_path / "both", embeddings=False, adapt=AdaptConfig()
    )
    doc = json.loads((tmp_path / "both" / ADAPTATION_FILE).read_text())
    assert [s["site"] for s in doc["sites"]] == sorted(table["site"].unique())
    metrics = pd.read_csv(tmp_path / "both" / ADAPTATION_TABLE, dtype={"site": str})
    assert set(metrics["site"]) == {"all", *table["site"].unique()}
    # a site's adapted predictions depend on its own slides only
    _, target = _tables(world)
    alone = predict_cohort(
        trained, _target(world, target), tmp_path / "alone", embeddings=False, adapt=AdaptConfig()
    )
    got = both.predictions.set_index("patient_id").loc[alone.predictions["patient_id"]]
    np.testing.assert_array_equal(got["prob_1"].to_numpy(), alone.predictions["prob_1"].to_numpy())


def test_cox_models_get_the_restandardisation_only(world: Path, tmp_path: Path) -> None:
    trained = load_model_folder(_fit(world, tmp_path / "cox", task="survival"))
    predict_cohort(trained, _target(world, labels=()), tmp_path / "p", adapt=AdaptConfig())
    doc = json.loads((tmp_path / "p" / ADAPTATION_FILE).read_text())
    assert doc["objective"] == "none" and doc["sites"][0]["objective"] == []
    assert "c_index" in set(pd.read_csv(tmp_path / "p" / ADAPTATION_TABLE)["metric"])


def test_discrete_time_survival_minimises_the_entropy_of_the_event_bin(
    world: Path, tmp_path: Path
) -> None:
    trained = load_model_folder(_fit(world, tmp_path / "nll", task="survival", survival_loss="nll"))
    predict_cohort(trained, _target(world, labels=()), tmp_path / "p", adapt=AdaptConfig(steps=3))
    doc = json.loads((tmp_path / "p" / ADAPTATION_FILE).read_text())
    assert doc["objective"] == "time_bins"
    history = doc["sites"][0]["objective"]
    assert len(history) == 4 and history[-1] < history[0]


def test_a_model_folder_without_statistics_is_refused_clearly(
    msi_model: Path, world: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for f in msi_model.iterdir():
        if f.is_file() and f.name != FEATURE_STATS_FILE:
            (old / f.name).write_bytes(f.read_bytes())
    trained = load_model_folder(old)
    with pytest.raises(ConfigError, match=r"no training feature statistics.*--fit-all"):
        predict_cohort(trained, _target(world), tmp_path / "p", adapt=AdaptConfig())
    # plain prediction still works with such a folder
    predict_cohort(trained, _target(world), tmp_path / "q", embeddings=False)


def test_adapt_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"steps.*lr"):
        AdaptConfig(steps=-1, lr=0.0)


def test_cli_predict_adapt(msi_model: Path, world: Path, tmp_path: Path) -> None:
    _, target = _tables(world)
    target.to_csv(tmp_path / "site.csv", index=False)
    out = tmp_path / "p"
    result = CliRunner().invoke(
        app,
        [
            "predict", str(msi_model), "-c", str(tmp_path / "site.csv"),
            "-f", str(world / "features"), "--out", str(out), "--adapt", "--adapt-steps", "3",
            "--no-progress", "--no-embeddings",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "adapted to 1 site(s) without their labels" in result.output
    assert "all auc:" in result.output
    assert json.loads((out / ADAPTATION_FILE).read_text())["settings"]["steps"] == 3


def test_models_with_layer_norms_adapt_those_norms_and_nothing_else(
    world: Path, tmp_path: Path
) -> None:
    from oncoslide.training.adapt import adapt_and_predict

    trained = load_model_folder(_fit(world, tmp_path / "transmil", model="transmil"))
    cohort = _target(world, labels=())
    with FeatureCache() as cache:
        result = adapt_and_predict(
            trained, cohort, cohort.patient_ids, cache, {}, 1, AdaptConfig(steps=3)
        )
    (site_model,) = result.models.values()
    adapted = site_model.model
    assert isinstance(adapted, SiteAdaptedModel)
    norms = {
        name
        for name, module in adapted.base.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
    }
    assert norms  # TransMIL has LayerNorm layers
    before = trained.model.state_dict()
    changed = {k for k, v in adapted.base.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and {k.rsplit(".", 1)[0] for k in changed} <= norms
    n_norm = sum(p.numel() for n in norms for p in adapted.base.get_submodule(n).parameters())
    assert result.records[0].n_adapted == 2 * 16 + n_norm


def test_cli_adapt_options_need_adapt(msi_model: Path, world: Path, tmp_path: Path) -> None:
    _, target = _tables(world)
    target.to_csv(tmp_path / "site.csv", index=False)
    result = CliRunner().invoke(
        app,
        [
            "predict", str(msi_model), "-c", str(tmp_path / "site.csv"),
            "-f", str(world / "features"), "--out", str(tmp_path / "p"), "--adapt-steps", "3",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "need --adapt" in result.output
    assert not (tmp_path / "p").exists()


def test_coral_and_the_training_prior_adapt_and_are_recorded(
    msi_model: Path, world: Path, tmp_path: Path
) -> None:
    trained = load_model_folder(msi_model)
    # the class frequencies of the training part, recovered from the stored balanced weights
    parts = trained.patients()
    train = parts.loc[parts["part"] == "train", "patient_id"]
    source, _ = _tables(world)
    labels = source.drop_duplicates("patient_id").set_index("patient_id").loc[train, "msi"]
    freq = np.bincount(labels.astype(int), minlength=2) / len(labels)
    prior = training_prior(trained)
    assert prior is not None
    np.testing.assert_allclose(prior, freq, rtol=1e-5)
    adapt = AdaptConfig(align="coral", prior="training", steps=4)
    predict_cohort(trained, _target(world), tmp_path / "p", embeddings=False, adapt=adapt)
    doc = json.loads((tmp_path / "p" / ADAPTATION_FILE).read_text())
    assert doc["settings"]["align"] == "coral" and doc["settings"]["prior"] == "training"
    assert "CORAL" in doc["objective_note"] and "KL divergence" in doc["objective_note"]
    history = doc["sites"][0]["objective"]
    assert len(history) == 5 and history[-1] < history[0]


def test_coral_needs_the_stored_covariance(msi_model: Path, world: Path, tmp_path: Path) -> None:
    """A folder whose statistics predate the covariance: CORAL is refused with a message,
    re-standardisation still works."""
    old = tmp_path / "old"
    old.mkdir()
    for f in msi_model.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    stats = FeatureStats.load(old)
    FeatureStats(
        mean=stats.mean, std=stats.std, n_patches=stats.n_patches, n_slides=stats.n_slides
    ).save(old)
    trained = load_model_folder(old)
    assert FeatureStats.load(old).cov is None
    with pytest.raises(ConfigError, match=r"no training feature covariance.*--fit-all"):
        predict_cohort(trained, _target(world), tmp_path / "p", adapt=AdaptConfig(align="coral"))
    # nor decision rates: decision matching is refused, --adapt-match none works
    with pytest.raises(ConfigError, match=r"no decision rates.*--fit-all.*--adapt-match none"):
        predict_cohort(
            trained, _target(world), tmp_path / "p", adapt=AdaptConfig(steps=2, match="decisions")
        )
    predict_cohort(
        trained,
        _target(world),
        tmp_path / "q",
        embeddings=False,
        adapt=AdaptConfig(steps=2, match="none"),
    )


def test_decision_bias_meets_the_target_shares() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(101, 2))
    bias = decision_bias(logits, np.array([0.7, 0.3]))
    chosen = np.argmax(logits + bias, axis=1)
    assert (chosen == 1).sum() == round(0.3 * 101)  # exact for two classes
    assert bias[0] == 0.0
    # the positives are the highest margins: the ranking is kept
    margin = logits[:, 1] - logits[:, 0]
    assert margin[chosen == 1].min() > margin[chosen == 0].max()
    three = rng.normal(size=(300, 3)) + np.array([2.0, 0.0, -1.0])
    target = np.array([0.5, 0.3, 0.2])
    shares = np.bincount(np.argmax(three + decision_bias(three, target), axis=1), minlength=3)
    np.testing.assert_allclose(shares / 300, target, atol=0.02)
    # shares already met: no change of any decision
    met = np.bincount(np.argmax(three, axis=1), minlength=3) / 300
    assert np.array_equal(
        np.argmax(three + decision_bias(three, met), axis=1), np.argmax(three, axis=1)
    )


def test_decision_matching_predicts_the_training_parts_shares(
    msi_model: Path, world: Path, tmp_path: Path
) -> None:
    """Stored at fit time: the argmax shares of the model's outputs on its training part (full
    bags); after adapting, the site's patients are predicted in those shares."""
    from oncoslide.training.predict import predict_logits

    trained = load_model_folder(msi_model)
    stats = FeatureStats.load(msi_model)
    assert stats.decision_rates is not None
    source, _ = _tables(world)
    cohort = load_cohort(source, world / "features")
    train = list(trained.patients().query("part == 'train'")["patient_id"])
    with FeatureCache() as cache:
        logits, _ = predict_logits(trained, cohort, train, cache)
    expected = np.bincount(logits.argmax(dim=-1).numpy(), minlength=2) / len(train)
    np.testing.assert_allclose(stats.decision_rates, expected)
    target = _target(world)
    got = predict_cohort(trained, target, tmp_path / "p", embeddings=False, adapt=ENTROPY_STEPS)
    n = len(target.patient_ids)
    positive = int((got.predictions["prob_1"] > 0.5).sum())
    assert positive == round(stats.decision_rates[1] * n)
    site = json.loads((tmp_path / "p" / ADAPTATION_FILE).read_text())["sites"][0]
    assert site["decisions"]["site_rates"][1] == pytest.approx(positive / n)
    assert site["decisions"]["training_rates"] == pytest.approx(list(stats.decision_rates))


def test_adapt_alignment_and_prior_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"align must be one of.*prior must be one of"):
        AdaptConfig(align="whiten", prior="flat")
    with pytest.raises(ConfigError, match=r"shrinkage"):
        AdaptConfig(shrinkage=1.5)


def test_cli_predict_adapt_align_coral(msi_model: Path, world: Path, tmp_path: Path) -> None:
    _, target = _tables(world)
    target.to_csv(tmp_path / "site.csv", index=False)
    common = [
        "predict", str(msi_model), "-c", str(tmp_path / "site.csv"),
        "-f", str(world / "features"), "--no-progress", "--no-embeddings", "--adapt",
    ]  # fmt: skip
    out = tmp_path / "p"
    result = CliRunner().invoke(
        app,
        [*common, "--out", str(out), "--adapt-align", "coral", "--adapt-prior", "training",
         "--adapt-steps", "2", "--adapt-match", "decisions"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads((out / ADAPTATION_FILE).read_text())["settings"]
    assert settings["align"] == "coral" and settings["prior"] == "training"
    assert "CORAL" in result.output and "predicted shares per class" in result.output
    result = CliRunner().invoke(
        app, [*common, "--out", str(tmp_path / "m"), "--adapt-match", "none", "--adapt-steps", "0"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / ADAPTATION_FILE).read_text())["settings"]["match"] == "none"
    assert "predicted shares per class" not in result.output
    # the old switch still means no alignment, and contradicting it is an error
    result = CliRunner().invoke(
        app,
        [*common, "--out", str(tmp_path / "q"), "--adapt-no-restandardise", "--adapt-steps", "0"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q" / ADAPTATION_FILE).read_text())["settings"]["align"] == "none"
    result = CliRunner().invoke(
        app,
        [
            *common,
            "--out",
            str(tmp_path / "r"),
            "--adapt-no-restandardise",
            "--adapt-align",
            "coral",
        ],
    )
    assert result.exit_code == 2 and "contradicts" in result.output
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "s"), "--adapt-align", "x"])
    assert result.exit_code == 2 and "align must be one of" in result.output


# ------------------------------------------------------------------ per-tissue alignment


def _tissue_slides(
    rng: np.random.Generator, n_slides: int, logits: np.ndarray, side: int = 14
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Slides of ``side`` x ``side`` patches whose tissues fill spatially clustered regions:
    each cell takes the tissue with the highest smoothed random field plus its log-odds."""
    from scipy import ndimage

    out = []
    for _ in range(n_slides):
        fields = np.stack(
            [ndimage.gaussian_filter(rng.standard_normal((side, side)), 2.0) for _ in logits]
        )
        fields /= fields.std(axis=(1, 2), keepdims=True)
        lab = np.argmax(fields + logits[:, None, None], axis=0).ravel()
        rows, cols = np.divmod(np.arange(side * side), side)
        out.append((lab, np.stack([cols * 448 + 1000, rows * 448 + 500], axis=1)))
    return out


def test_tissue_clusters_are_paired_without_labels_and_their_shift_undone() -> None:
    """Planted: 4 tissues of different shares in spatial regions; a site whose features are
    rotated, rescaled and shifted, with a different extra shift per tissue (the site-shift
    world's transform). The site's clusters are paired with the training ones from shares and
    adjacency alone, and after the per-tissue shift each site patch lies nearest its own
    tissue's training centre (checked against the planted tissue of every patch)."""
    rng = np.random.default_rng(11)
    k, d = 4, 10
    centres = rng.normal(0.0, 2.0, size=(k, d))
    logits = np.log(np.array([0.45, 0.28, 0.17, 0.10])) * 2.0

    def features(lab: np.ndarray) -> np.ndarray:
        return centres[lab] + 0.5 * rng.standard_normal((len(lab), d))

    train = [(features(lab), xy, lab) for lab, xy in _tissue_slides(rng, 60, logits)]
    stats = FeatureStats.of(x for x, _, _ in train)
    stats = with_tissues(stats, [(x, xy) for x, xy, _ in train], k=k)
    assert stats.tissue_centres is not None and stats.tissue_shares is not None
    # each training cluster is one planted tissue (the nearest planted centre)
    truth_of_train = np.argmin(
        ((stats.tissue_centres[:, None, :] - centres[None]) ** 2).sum(axis=-1), axis=1
    )
    assert sorted(truth_of_train) == list(range(k))

    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    gain = np.exp(rng.normal(0.0, 0.3, size=d))
    content = 3.0 * rng.standard_normal((k, d)) / np.sqrt(d) * 2.0
    site = []
    for lab, xy in _tissue_slides(rng, 40, logits):
        x = (features(lab) @ rotation) * gain + 1.5 + content[lab]
        site.append((x, xy, lab))
    site_stats = FeatureStats.of(x for x, _, _ in site)
    part, shift, info = tissue_alignment([(x, xy) for x, xy, _ in site], site_stats, stats)
    x = np.concatenate([s[0] for s in site]).astype(np.float64)
    truth = np.concatenate([s[2] for s in site])
    z = (x - site_stats.mean) / site_stats.std
    lab = part.assign(z)
    # the site's clusters are the planted tissues, and each is paired with its own tissue
    majority = np.array([np.bincount(truth[lab == g], minlength=k).argmax() for g in range(k)])
    assert (majority[lab] == truth).mean() > 0.95
    paired = truth_of_train[np.asarray(info["paired_training_cluster"])]
    np.testing.assert_array_equal(paired, majority)
    assert info["second_best_cost"] > info["pairing_cost"]
    # after the shift the patches sit at their own tissue's training centre
    moved = z + shift[lab]
    train_z = (centres - stats.mean) / stats.std
    nearest = np.argmin(((moved[:, None, :] - train_z[None]) ** 2).sum(axis=-1), axis=1)
    assert (nearest == truth).mean() > 0.95
    # re-standardisation alone does not bring them there
    nearest = np.argmin(((z[:, None, :] - train_z[None]) ** 2).sum(axis=-1), axis=1)
    assert (nearest == truth).mean() < 0.8


def test_pair_tissues_recovers_a_permutation_of_the_signatures() -> None:
    rng = np.random.default_rng(4)
    k = 6
    shares = rng.dirichlet(np.ones(k) * 3)
    adjacency = rng.normal(size=(k, k))
    adjacency = (adjacency + adjacency.T) / 2
    perm = rng.permutation(k)
    # the site's cluster j is training cluster perm[j]; its signatures are training's, noisy
    site_shares = shares[perm] * np.exp(rng.normal(0, 0.02, size=k))
    site_adj = adjacency[np.ix_(perm, perm)] + rng.normal(0, 0.02, size=(k, k))
    order, cost, second = pair_tissues(site_shares, site_adj, shares, adjacency)
    np.testing.assert_array_equal(order, perm)
    assert second > cost
    # the covariance of the slides' shares joins the cost when both sides have it
    cov = rng.normal(size=(k, k))
    cov = cov @ cov.T
    order, cost_cov, _ = pair_tissues(
        site_shares, site_adj, shares, adjacency, cov[np.ix_(perm, perm)], cov
    )
    np.testing.assert_array_equal(order, perm)
    assert cost_cov == pytest.approx(cost)
    # the signatures alone decide: with flat shares and adjacency the covariance pairs them
    flat, zero = np.full(k, 1.0 / k), np.zeros((k, k))
    order, _, second = pair_tissues(flat, zero, flat, zero, cov[np.ix_(perm, perm)], cov)
    np.testing.assert_array_equal(order, perm)
    assert second > 0


def test_share_covariance_is_the_covariance_of_centred_log_shares() -> None:
    labels = [np.array([0, 0, 1]), np.array([1, 1, 1, 0]), np.array([0, 1])]
    shares = np.array([[2 / 3, 1 / 3], [1 / 4, 3 / 4], [1 / 2, 1 / 2]])
    logs = np.log(shares + 0.01)
    logs -= logs.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(share_covariance(labels, 2), np.cov(logs.T))
    np.testing.assert_array_equal(share_covariance(labels[:1], 2), np.zeros((2, 2)))


def test_tissue_signature_counts_four_neighbour_pairs() -> None:
    """A 2 x 3 slide: 7 neighbour pairs; enrichment from counts (hand-computed)."""
    lab = np.array([0, 0, 1, 0, 1, 1])
    xy = np.array([[0, 0], [448, 0], [896, 0], [0, 448], [448, 448], [896, 448]])
    shares, enrichment = tissue_signature([lab], [xy], 2)
    np.testing.assert_allclose(shares, [0.5, 0.5])
    # pairs: horizontal (0,0), (0,1), (0,1), (1,1); vertical (0,0), (0,1), (1,1)
    pairs = np.array([[4.0, 3.0], [3.0, 4.0]])
    expected = np.outer(pairs.sum(1), pairs.sum(0)) / pairs.sum()
    np.testing.assert_allclose(enrichment, np.log((pairs + 1) / (expected + 1)))


def test_tissue_clusters_are_deterministic_and_checked() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 5))
    coords = [np.stack([np.arange(300) % 20, np.arange(300) // 20], axis=1) * 448]
    zero, one = np.zeros(5), np.ones(5)
    a = tissue_clusters([(z, coords[0])], zero, one, 3)
    b = tissue_clusters([(z[:130], coords[0][:130]), (z[130:], coords[0][130:])], zero, one, 3)
    # the same patches split over two slides: the same clusters (pairs across slides aside)
    assert set(a.assign(z)) == {0, 1, 2}
    np.testing.assert_array_equal(a.centroids, b.centroids)
    again = tissue_clusters([(z, coords[0])], zero, one, 3)
    np.testing.assert_array_equal(a.assign(z), again.assign(z))
    with pytest.raises(ConfigError, match=r"tissue clusters must be in \[2, 8\]"):
        tissue_clusters([(z, coords[0])], zero, one, 9)
    with pytest.raises(ConfigError, match="need at least 24 patches"):
        tissue_clusters([(z[:10], coords[0][:10])], zero, one, 3)


def test_tissue_partition_labels_are_the_partitions_assignment() -> None:
    """The labels the merging made are reused by the summary: they must be exactly what the
    partition assigns each (standardised) patch, slide by slide."""
    rng = np.random.default_rng(1)
    slides = []
    for n in (170, 90, 240):
        x = rng.normal(size=(n, 6)) * 2.0 + 1.0
        xy = np.stack([np.arange(n) % 15, np.arange(n) // 15], axis=1) * 448
        slides.append((x, xy))
    mean, std = np.full(6, 1.0), np.full(6, 2.0)
    part, labels = tissue_partition(slides, mean, std, 4)
    assert len(labels) == 3
    for (x, _), lab in zip(slides, labels, strict=True):
        np.testing.assert_array_equal(lab, part.assign((x - mean) / std))
    np.testing.assert_array_equal(part.centroids, tissue_clusters(slides, mean, std, 4).centroids)
    given = tissue_summary(slides, mean, std, part, labels)
    assigned = tissue_summary(slides, mean, std, part)
    for a, b in zip(given[1:], assigned[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_tissue_alignment_is_stored_used_and_recorded(
    tissue_model: Path, world: Path, tmp_path: Path
) -> None:
    """The tissue summary survives a save and load; a folder without it (every folder fitted
    before it was stored) refuses ``align="tissues"`` with a message and still adapts
    otherwise; with it, the site's pairing and shifts are recorded."""
    stats = FeatureStats.load(tissue_model)
    assert stats.tissue_centres is not None and stats.tissue_adjacency is not None
    assert stats.tissue_centres.shape == (8, stats.dim)
    assert stats.tissue_shares is not None and stats.tissue_shares.sum() == pytest.approx(1.0)
    assert stats.tissue_share_cov is not None and stats.tissue_share_cov.shape == (8, 8)
    # a folder as written before the summary was stored
    old = tmp_path / "old"
    old.mkdir()
    for f in tissue_model.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    dataclasses.replace(
        stats,
        tissue_centres=None,
        tissue_shares=None,
        tissue_adjacency=None,
        tissue_share_cov=None,
    ).save(old)
    assert FeatureStats.load(old).tissue_centres is None
    tissues = AdaptConfig(align="tissues", steps=2)
    with pytest.raises(ConfigError, match=r"no tissue clusters.*--fit-all.*standardise"):
        predict_cohort(load_model_folder(old), _target(world), tmp_path / "p", adapt=tissues)
    # the default (auto) falls back to re-standardisation for such a folder, and says so
    predict_cohort(load_model_folder(old), _target(world), tmp_path / "o", adapt=AdaptConfig())
    fallback = json.loads((tmp_path / "o" / ADAPTATION_FILE).read_text())
    assert fallback["settings"]["align"] == "standardise" and fallback["settings"]["steps"] == 0
    # and uses the tissues where the folder stores them
    predict_cohort(
        load_model_folder(tissue_model), _target(world), tmp_path / "a", adapt=AdaptConfig()
    )
    auto = json.loads((tmp_path / "a" / ADAPTATION_FILE).read_text())
    assert auto["settings"]["align"] == "tissues" and auto["sites"][0]["tissues"]
    trained = load_model_folder(tissue_model)
    result = predict_cohort(trained, _target(world), tmp_path / "q", adapt=tissues)
    doc = json.loads((tmp_path / "q" / ADAPTATION_FILE).read_text())
    info = doc["sites"][0]["tissues"]
    assert sorted(info["paired_training_cluster"]) == list(range(8))
    assert info["pairing_cost"] <= info["second_best_cost"]
    assert "shift per tissue cluster" in doc["objective_note"]
    # through the CLI: the chosen variant (alignment alone) and the refusal without a summary
    _, target = _tables(world)
    target.to_csv(tmp_path / "site.csv", index=False)
    common = [
        "predict", "-c", str(tmp_path / "site.csv"), "-f", str(world / "features"),
        "--no-progress", "--no-embeddings", "--adapt", "--adapt-align", "tissues",
        "--adapt-steps", "0", "--adapt-match", "none",
    ]  # fmt: skip
    cli = CliRunner().invoke(
        app, [common[0], str(tissue_model), *common[1:], "--out", str(tmp_path / "c")]
    )
    assert cli.exit_code == 0, cli.output
    settings = json.loads((tmp_path / "c" / ADAPTATION_FILE).read_text())["settings"]
    assert settings["align"] == "tissues" and settings["steps"] == 0
    cli = CliRunner().invoke(app, [common[0], str(old), *common[1:], "--out", str(tmp_path / "d")])
    assert cli.exit_code != 0 and "no tissue clusters" in cli.output
    # the shift changes the predictions against re-standardisation alone
    plain = predict_cohort(
        trained,
        _target(world),
        tmp_path / "r",
        adapt=AdaptConfig(align="standardise", steps=2),
        embeddings=False,
    )
    assert not np.allclose(
        result.predictions["prob_1"].to_numpy(), plain.predictions["prob_1"].to_numpy()
    )
