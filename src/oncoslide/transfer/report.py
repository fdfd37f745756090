"""The transfer report (issue 13): one page over a transfer matrix, a benchmark of per-target
survival tasks and, for simulated data, the world's planted truth.

``transfer_report(tm, out, bench=..., world=...)`` writes::

    OUT/
      index.html          self-contained page (figures embedded)
      matrix.png          the recovered matrix (clustered order, as ``transfer matrix``)
      similarity.png      planted similarity beside the recovered matrix, same order (truth)
      pairs.csv           off-diagonal pairs: source, target, c_index, planted similarity,
                          oracle transfer C, same_family, and the oracle restricted to what
                          the slides show across the pair (visible_c_index, readout_c_index,
                          learned_c_index, learned_states_c_index, learned_marginal_c_index;
                          :func:`visible_oracle`)
                          (truth)
      gains.csv           per target and method: C of the method and of the cancer-specific
                          model, the paired difference, its interval and p, n patients, rare
      gains.png
      routing.csv         per target and source: mean router weight over the target's patients
                          (each patient's weight averaged over its seeds first), same_family
      routing.png
      concentration.csv   per target (truth): router weight on same-family sources against
                          the share uniform routing would give them
      summary.json        the numbers of the page's headline

The gains reuse the benchmark's paired patient x seed bootstrap
(:func:`oncoslide.bench.stats.paired_comparison`); nothing here is new statistics but the
Spearman correlations of the matrix with the truth and a Wilcoxon signed-rank test over targets
of the router's same-family excess.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide._io import atomic_path, check_folder_target, write_json, write_table, write_text
from oncoslide.bench.store import DETAIL_PREFIX
from oncoslide.errors import ConfigError

__all__ = [
    "OWN_EXPERT",
    "ROUTING_PREFIX",
    "TransferReport",
    "World",
    "load_world",
    "transfer_report",
    "visible_oracle",
]

#: Prediction columns of the router weights (ROUPKT's ``patient_details``).
ROUTING_PREFIX = f"{DETAIL_PREFIX}routing_"
#: ROUPKT's own (trainable, cancer-specific) expert (``oncoslide.models.roupkt.OWN_EXPERT``;
#: not imported, to keep torch out of the report): not a source of the zoo.
OWN_EXPERT = "own"
PathLike = str | os.PathLike[str]

GAIN_COLUMNS = ["task", "target", "feature_set", "method", "baseline", "n_patients", "n_paired",
                "rare", "c_method", "c_baseline", "diff", "lower", "upper", "p_value",
                "significant"]  # fmt: skip
ROUTING_COLUMNS = ["task", "target", "feature_set", "model", "source", "n_experts",
                   "mean_weight", "n_patients", "rare", "same_family"]  # fmt: skip
CONCENTRATION_COLUMNS = ["task", "target", "feature_set", "model", "n_patients", "n_experts",
                         "same_family_sources", "same_share", "uniform_share", "excess",
                         "patients_above_uniform", "mean_weight_same",
                         "mean_weight_other", "mean_weight_own"]  # fmt: skip


@dataclass(frozen=True)
class World:
    """The planted truth of a simulated world that the report reads (``truth.json``)."""

    families: dict[str, int]
    similarity: pd.DataFrame  # cancer x cancer cosine similarity of the hazard coefficients
    oracle: pd.DataFrame | None  # oracle_transfer_c_index[source][target]
    # per ordered pair: the oracle restricted to what the slides show across it (see
    # visible_oracle); None when the truth lacks the patients or prototypes
    visible: pd.DataFrame | None = None

    def same_family(self, a: str, b: str) -> bool | None:
        if a not in self.families or b not in self.families:
            return None
        return self.families[a] == self.families[b]


def load_world(path: PathLike) -> World:
    """The truth of a simulated world: its folder or its ``truth.json``."""
    p = Path(path)
    p = p / "truth.json" if p.is_dir() else p
    try:
        truth = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the world's truth {p}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"cannot read the world's truth {p}: not valid JSON ({exc})") from None
    prognosis = truth.get("prognosis") if isinstance(truth, dict) else None
    if not isinstance(prognosis, dict) or "similarity" not in prognosis:
        raise ConfigError(
            f"{p} has no planted similarity between cancers (prognosis.similarity): simulate "
            "a world with prognosis families, e.g. the pan-cancer preset"
        )
    # similarity[a][b]: a's row, b's column (as the truth writes it)
    similarity = pd.DataFrame(prognosis["similarity"]).T.astype(float)
    oracle = prognosis.get("oracle_transfer_c_index")
    return World(
        families={str(k): int(v) for k, v in (prognosis.get("families") or {}).items()},
        similarity=similarity,
        oracle=None if oracle is None else pd.DataFrame(oracle).T.astype(float),
        visible=visible_oracle(truth),
    )


VISIBLE_COLUMNS = ["source", "target", "shared_prototypes", "visible_latents",
                   "visible_c_index", "readout_c_index", "learned_c_index",
                   "learned_states_c_index", "learned_marginal_c_index"]  # fmt: skip
CEILING_COLUMNS = ["visible_c_index", "readout_c_index", "learned_c_index",
                   "learned_states_c_index", "learned_marginal_c_index"]  # fmt: skip
#: lifelines' ridge penalty of the learned readers (standardised covariates)
LEARNED_PENALIZER = 0.1


def _prototype_sets(truth: dict[str, Any]) -> dict[str, set[str]]:
    """Per cancer, the names of the prototypes its slides draw from: shared ones (no cohort, no
    family), its family's tumour morphologies and its own nuisance ones."""
    families = truth["prognosis"].get("families") or {}
    out: dict[str, set[str]] = {}
    for cancer in truth["prognosis"]["similarity"]:
        out[cancer] = {
            str(p["name"])
            for p in truth["prototypes"]
            if p.get("cohort") in (None, cancer)
            and (p.get("family") is None or p.get("family") == families.get(cancer))
        }
    return out


def visible_oracle(truth: dict[str, Any]) -> pd.DataFrame | None:
    """The world's oracle transfer C restricted to what a slide model can read across a pair.

    The planted oracle scores target b's patients with source a's true risk, coef_a . z_b over
    the prognostic latents z. A slide model sees the latents only through the morphologies
    (prototypes) whose share in the tissue (loading) or whose cells' state moves with them; a
    model trained on cancer a meets on b's slides only the prototypes the two cancers share
    (the shared tissue roles, and the tumour morphologies when they are of one family). Two
    ceilings per ordered pair (a, b), Harrell's C on b's patients:

    - ``visible_c_index``: coef_a restricted to the latents some shared prototype expresses,
      times b's true latents (the latent read perfectly wherever it shows at all);
    - ``readout_c_index``: coef_a times b's latents as the shared prototypes' realised shares
      in each patient's slides tell them: a least-squares fit (with intercept) of the latents
      on those shares, over every patient of the world whose cancer has all the shared
      prototypes (the world's reading, not the sample's). Cells' state is not used, so this
      one is conservative for same-family pairs.
    - ``learned_c_index``: what a perfect reader of the morphologies learns from the source's
      own patients, with no true coefficient: a ridge Cox model (lifelines, penalty
      :data:`LEARNED_PENALIZER` on covariates standardised over the source's patients) of the
      source's survival on the realised shares of its cancer's prototypes, fitted on all its
      patients (as the zoo's all-patient model), applied unchanged to the target's shares of
      the same prototypes (a prototype the target lacks has share 0 there).
    - ``learned_states_c_index``: the same reader that also reads the cells' state exactly:
      per latent that a prototype of the source's cancer carries as its cells' state, a
      covariate equal to the patient's latent where its slides hold such a prototype, else 0.
      A source model that learns its own cancer well reads these; on another family's slides
      they are absent.
    - ``learned_marginal_c_index``: the reader of the shares and states whose effects are
      each learned alone (one univariable Cox model per covariate, same penalty, the risks
      summed): unadjusted effects, which do not lean on covariates a target lacks.

    Only the four named latents (no interface or genomic term; None if the world has them),
    and None when the truth lacks the patients or the prototypes."""
    from oncoslide.simulate.truth import harrell_c

    prognosis = truth.get("prognosis") or {}
    names = list(prognosis.get("latents") or [])
    patients, prototypes = truth.get("patients"), truth.get("prototypes")
    if not patients or not prototypes or "hazard_coefs" not in prognosis or len(names) != 4:
        return None
    needed = {"cohort", "z", "event_time", "censor_time", "mix_realised"}
    if not all(needed <= set(p) for p in patients):
        return None  # a truth written before these were recorded
    coefs = {
        c: np.array([float(v[n]) for n in names]) for c, v in prognosis["hazard_coefs"].items()
    }
    members = _prototype_sets(truth)
    expresses: dict[str, np.ndarray] = {}
    for p in prototypes:
        shown = np.asarray(p.get("loadings") or [0.0] * 4, dtype=float)[:4] != 0
        if p.get("state_latent") in names:
            shown[names.index(p["state_latent"])] = True
        expresses[str(p["name"])] = shown
    table = pd.DataFrame(patients)
    z = np.array([row[:4] for row in table["z"]], dtype=float)
    time = np.minimum(table["event_time"].to_numpy(float), table["censor_time"].to_numpy(float))
    event = table["event_time"].to_numpy(float) <= table["censor_time"].to_numpy(float)
    cohort = table["cohort"].astype(str).to_numpy()
    # every patient's realised share of every prototype, read once (0 where it has none)
    column = {str(p["name"]): i for i, p in enumerate(prototypes)}
    all_shares = np.zeros((len(table), len(column)))
    for row, mix in enumerate(table["mix_realised"]):
        for name, share in mix.items():
            if str(name) in column:
                all_shares[row, column[str(name)]] = float(share)

    def shares_of(chosen: list[str]) -> np.ndarray:
        return all_shares[:, [column[n] for n in chosen]]

    states = {str(p["name"]): p.get("state_latent") for p in prototypes}
    learned: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for a in coefs:
        if a not in members:
            continue
        own = sorted(members[a])
        shares = shares_of(own)
        read = sorted({str(states[n]) for n in own if states[n] in names})
        state_cols = [
            np.where(shares[:, [states[n] == latent for n in own]].sum(axis=1) > 0,
                     z[:, names.index(latent)], 0.0)
            for latent in read
        ]  # fmt: skip
        src = cohort == a
        with_states = np.column_stack([shares, *state_cols])
        learned[a] = (
            _learned_risk(shares, src, time, event),
            _learned_risk(with_states, src, time, event),
            _learned_risk(with_states, src, time, event, marginal=True),
        )
    rows = []
    for a in coefs:
        for b in coefs:
            if a == b or a not in members or b not in members:
                continue
            shared = sorted(members[a] & members[b])
            seen = np.zeros(4, dtype=bool)
            for name in shared:
                seen |= expresses[name]
            mine = cohort == b
            visible = harrell_c(time[mine], event[mine], z[mine] @ (coefs[a] * seen))
            # the world's least-squares reading of the latents from the shared shares
            fit = np.array([set(shared) <= set(members[str(c)]) for c in cohort])
            design = np.column_stack([np.ones(len(table)), shares_of(shared)])
            beta, *_ = np.linalg.lstsq(design[fit], z[fit], rcond=None)
            readout = harrell_c(time[mine], event[mine], design[mine] @ beta @ coefs[a])
            by_shares, by_states, by_marginal = learned[a]
            rows.append(
                {
                    "source": a,
                    "target": b,
                    "shared_prototypes": ";".join(shared),
                    "visible_latents": ";".join(n for n, v in zip(names, seen, strict=True) if v),
                    "visible_c_index": visible,
                    "readout_c_index": readout,
                    "learned_c_index": _c_or_nan(time[mine], event[mine], by_shares[mine]),
                    "learned_states_c_index": _c_or_nan(time[mine], event[mine], by_states[mine]),
                    "learned_marginal_c_index": _c_or_nan(
                        time[mine], event[mine], by_marginal[mine]
                    ),
                }
            )
    return pd.DataFrame(rows, columns=VISIBLE_COLUMNS)


def _c_or_nan(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    from oncoslide.simulate.truth import harrell_c

    return math.nan if not np.isfinite(risk).all() else harrell_c(time, event, risk)


def _learned_risk(
    covariates: np.ndarray,
    fit_rows: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    marginal: bool = False,
) -> np.ndarray:
    """Every patient's risk under a ridge Cox model fitted on ``fit_rows`` (covariates
    standardised over those rows; one constant over them carries nothing and is left out; a
    constant risk when none varies, NaN when the fit has no event or fails). ``marginal``:
    one univariable model per covariate instead, their risks summed."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    x = covariates[fit_rows]
    mean, sd = x.mean(axis=0), x.std(axis=0)
    varies = sd > 1e-12
    if not varies.any():
        return np.zeros(len(covariates))
    if not event[fit_rows].any():
        return np.full(len(covariates), math.nan)
    standard = (covariates[:, varies] - mean[varies]) / sd[varies]
    frame = pd.DataFrame(standard[fit_rows], columns=[f"x{i}" for i in range(int(varies.sum()))])
    frame["time"], frame["event"] = time[fit_rows], event[fit_rows].astype(int)
    groups = [[c] for c in frame.columns[:-2]] if marginal else [list(frame.columns[:-2])]
    coefs = []
    try:
        for cols in groups:
            fitted = CoxPHFitter(penalizer=LEARNED_PENALIZER).fit(
                frame[[*cols, "time", "event"]], "time", "event"
            )
            coefs.extend(fitted.params_.to_numpy(float))
    except ConvergenceError:
        return np.full(len(covariates), math.nan)
    return np.asarray(standard @ np.asarray(coefs), dtype=float)


@dataclass
class TransferReport:
    """What :func:`transfer_report` computed and where it wrote the page."""

    out_dir: Path
    html_path: Path
    matrix: pd.DataFrame  # source x target C-index, clustered order
    pairs: pd.DataFrame
    gains: pd.DataFrame
    routing: pd.DataFrame
    concentration: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary_text(self) -> str:
        """The headline numbers, one per line."""
        s = self.summary
        lines = []
        if "spearman_planted" in s:
            lines.append(
                f"matrix vs planted similarity: Spearman {s['spearman_planted']:.3f} over "
                f"{s['n_pairs']} off-diagonal pairs"
                + (
                    f" (oracle transfer C: {s['spearman_oracle_planted']:.3f})"
                    if s.get("spearman_oracle_planted") is not None
                    else ""
                )
            )
        if s.get("spearman_visible_planted") is not None:
            lines.append(
                "ceilings of what the slides show across each pair, vs planted: the oracle on "
                f"the visible latents {s['spearman_visible_planted']:.3f}, on the latents read "
                f"from the shared morphologies {_fmt(s.get('spearman_readout_planted'))}; "
                "learned from each source's patients by a perfect reader of the shares "
                f"{_fmt(s.get('spearman_learned_planted'))}, of the shares and cell states "
                f"{_fmt(s.get('spearman_learned_states_planted'))}, the latter with each "
                f"effect learned alone {_fmt(s.get('spearman_learned_marginal_planted'))}"
            )
        for method, rare in (s.get("rare_mean_diff") or {}).items():
            interval = (
                f" [{rare['lower']:+.3f}, {rare['upper']:+.3f}], p {rare['p_value']:.3g}"
                if "lower" in rare
                else ""
            )
            lines.append(
                f"{method} - {s['baseline']} over the {s['n_rare']} rare targets: mean "
                f"{rare['mean_diff']:+.3f}{interval} ({rare['n_better']} better, "
                f"{rare['n_significant']} significant)"
            )
        c = s.get("concentration")
        if c:
            lines.append(
                f"router weight on same-family sources: {c['mean_same_share']:.3f} vs "
                f"{c['mean_uniform_share']:.3f} at uniform routing (excess "
                f"{c['mean_excess']:+.3f}, {c['n_positive']}/{c['n_targets']} targets above; "
                f"Wilcoxon one-sided p {c['wilcoxon_p']:.3g})"
                + (
                    f"; the own expert's mean weight {c['mean_weight_own']:.3f}"
                    if c.get("mean_weight_own") is not None
                    else ""
                )
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# ------------------------------------------------------------------------------ inputs


def _read_matrix(tm: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    cells_path, wide_path = tm / "matrix.csv", tm / "matrix_wide.csv"
    missing = [p.name for p in (cells_path, wide_path) if not p.exists()]
    if missing:
        raise ConfigError(
            f"{tm} is not a transfer matrix folder (oncoslide transfer matrix): "
            f"{', '.join(missing)} missing"
        )
    cells = pd.read_csv(cells_path, dtype={"source": str, "target": str})
    wide = pd.read_csv(wide_path, dtype={"source": str}).set_index("source")
    wide.columns = [str(c) for c in wide.columns]
    return cells, wide


def _task_targets(spec: dict[str, Any], tasks: Sequence[str], cancers: set[str]) -> dict[str, str]:
    """Each task's target cancer: the one value of its filter that is a cancer of the matrix,
    else the one cancer its name contains."""
    filters = {str(t.get("name")): t.get("filter") or {} for t in spec.get("tasks") or []}
    out = {}
    for task in tasks:
        values = {str(v) for vs in filters.get(task, {}).values() for v in (vs or [])}
        hits = sorted(values & cancers) if len(values) == 1 else []
        if not hits:
            hits = [c for c in cancers if c in task]
        if len(hits) == 1:
            out[task] = hits[0]
    return out


def _bench_predictions(bench: Path) -> tuple[dict[str, Any], list[dict[str, Any]], pd.DataFrame]:
    from oncoslide.bench.store import ResultStore

    if not (bench / "results.sqlite").exists():
        raise ConfigError(f"{bench} holds no benchmark results (results.sqlite); run bench run")
    with ResultStore.in_dir(bench) as store:
        spec = store.get_meta("spec") or {}
        tasks = store.get_meta("tasks") or []
        plan = set(store.get_meta("plan") or [])
        preds = store.predictions()
    return spec, tasks, preds[preds["cell_key"].isin(plan)]


# ------------------------------------------------------------------------------ parts


def _pairs(cells: pd.DataFrame, world: World | None) -> pd.DataFrame:
    off = cells.loc[~cells["diagonal"].astype(bool), ["source", "target", "c_index", "lower",
                                                        "upper", "n_patients"]].copy()  # fmt: skip
    if world is not None:

        def look(table: pd.DataFrame | None, s: str, t: str) -> float:
            if table is None or s not in table.index or t not in table.columns:
                return math.nan
            return float(table.at[s, t])

        off["planted_similarity"] = [
            look(world.similarity, s, t) for s, t in zip(off["source"], off["target"], strict=True)
        ]
        off["oracle_c_index"] = [
            look(world.oracle, s, t) for s, t in zip(off["source"], off["target"], strict=True)
        ]
        off["same_family"] = [
            world.same_family(s, t) for s, t in zip(off["source"], off["target"], strict=True)
        ]
        if world.visible is not None:
            v = world.visible.set_index(["source", "target"])
            for column in CEILING_COLUMNS:
                off[column] = [
                    float(v.at[(s, t), column]) if (s, t) in v.index else math.nan
                    for s, t in zip(off["source"], off["target"], strict=True)
                ]
    return off.reset_index(drop=True)


def _spearman(a: pd.Series, b: pd.Series) -> float | None:
    from scipy.stats import spearmanr

    ok = np.isfinite(a.to_numpy(float)) & np.isfinite(b.to_numpy(float))
    if ok.sum() < 3:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


def _bench_list(bench: PathLike | Sequence[PathLike] | None) -> list[Path]:
    if bench is None:
        return []
    if isinstance(bench, str | os.PathLike):
        return [Path(bench)]
    return [Path(b) for b in bench]


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    kept = [p for p in parts if not p.empty]
    if not kept:
        return pd.DataFrame(columns=columns)
    return pd.concat(kept, ignore_index=True)[columns]


def _pooled_interval(
    task_preds: dict[str, pd.DataFrame],
    gains: pd.DataFrame,
    baseline: str,
    *,
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
) -> dict[str, float]:
    """The mean over targets (the rows of ``gains``, one method) of the paired difference,
    with the two-level (patients, seeds) paired bootstrap of each target drawn independently
    (target i with seed ``seed + i``: the targets' patients are disjoint) and the replicate
    differences averaged over targets: a 95% interval and a two-sided p of the mean."""
    from oncoslide.bench.stats import TaskInfo, paired_replicate_diffs

    draws = []
    for i, row in enumerate(gains.sort_values("task").itertuples()):
        info = TaskInfo(str(row.task), "survival")
        draws.append(paired_replicate_diffs(
            task_preds[str(row.task)], info, (str(row.feature_set), str(row.method)),
            (str(row.feature_set), baseline), n_boot=n_boot, seed=seed + i))  # fmt: skip
    pooled = pooled_replicates(draws, alpha=alpha)
    pooled.pop("replicates", None)  # the report states the interval and p only
    return pooled


def pooled_replicates(draws: Sequence[np.ndarray], *, alpha: float = 0.05) -> dict[str, float]:
    """The mean over targets of paired replicate differences (one (n_boot,) array per target,
    drawn independently; NaN where undefined): its interval and two-sided p, from the
    replicates defined after averaging ({} when none)."""
    from oncoslide.bench.stats import bootstrap_p_value

    if not draws:
        return {}
    means = np.mean(np.vstack(draws), axis=0)
    means = means[np.isfinite(means)]
    if not means.size:
        return {}
    lower, upper = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"lower": float(lower), "upper": float(upper), "p_value": bootstrap_p_value(means),
            "replicates": int(means.size)}  # fmt: skip


def _gains(
    preds: pd.DataFrame,
    tasks: list[dict[str, Any]],
    targets: dict[str, str],
    baseline: str,
    *,
    rare_max: int,
    n_boot: int,
    seed: int,
    notes: list[str],
) -> pd.DataFrame:
    from oncoslide.bench.stats import BenchInputError, TaskInfo, paired_comparison

    rows = []
    for t in tasks:
        name = str(t["task"])
        if name not in targets or t.get("kind") != "survival":
            continue
        sub = preds[preds["task"] == name]
        n_patients = int(sub["patient_id"].nunique())
        info = TaskInfo(name, "survival")
        for fs in sorted(sub["feature_set"].unique()):
            models = sorted(sub.loc[sub["feature_set"] == fs, "model"].unique())
            if baseline not in models:
                notes.append(f"task {name}: no {baseline!r} entry in feature set {fs!r}")
                continue
            for method in (m for m in models if m != baseline):
                try:
                    cmp = paired_comparison(
                        sub, info, (fs, method), (fs, baseline), n_boot=n_boot, seed=seed
                    )
                except BenchInputError as exc:
                    notes.append(f"task {name}, {method}: {exc}")
                    continue
                rows.append(
                    {
                        "task": name,
                        "target": targets[name],
                        "feature_set": fs,
                        "method": method,
                        "baseline": baseline,
                        "n_patients": n_patients,
                        "n_paired": cmp.n_patients,
                        "rare": n_patients <= rare_max,
                        "c_method": cmp.estimate_a,
                        "c_baseline": cmp.estimate_b,
                        "diff": cmp.diff,
                        "lower": cmp.lower,
                        "upper": cmp.upper,
                        "p_value": cmp.p_value,
                        "significant": bool(cmp.lower > 0 or cmp.upper < 0),
                    }
                )
    return pd.DataFrame(rows, columns=GAIN_COLUMNS)


def _routing(
    preds: pd.DataFrame, targets: dict[str, str], world: World | None, rare_max: int
) -> pd.DataFrame:
    """Mean router weight of each source over each target's patients (per entry)."""
    columns = [c for c in preds.columns if isinstance(c, str) and c.startswith(ROUTING_PREFIX)]
    rows = []
    for (task, fs, model), sub in preds.groupby(["task", "feature_set", "model"], sort=True):
        if task not in targets:
            continue
        used = [c for c in columns if sub[c].notna().any()]
        if not used:
            continue
        # a patient tested in several seeds: its weights averaged first, so that every patient
        # counts once
        per_patient = sub.groupby("patient_id")[used].mean()
        n_patients = int(preds.loc[preds["task"] == task, "patient_id"].nunique())
        for c in used:
            source = c[len(ROUTING_PREFIX) :]
            rows.append(
                {
                    "task": task,
                    "target": targets[task],
                    "feature_set": fs,
                    "model": model,
                    "source": source,
                    "n_experts": len(used),
                    "mean_weight": float(per_patient[c].mean()),
                    "n_patients": n_patients,
                    "rare": n_patients <= rare_max,
                    "same_family": None
                    if world is None
                    else world.same_family(source, targets[task]),
                }
            )
    return pd.DataFrame(rows, columns=ROUTING_COLUMNS)


def _concentration(
    preds: pd.DataFrame, routing: pd.DataFrame, targets: dict[str, str], world: World
) -> pd.DataFrame:
    """Per target (and entry) with same-family sources among its experts: the router's weight
    on them (mean over patients of each patient's summed weight, as a share of its weight on the
    zoo's sources) against the share uniform routing would give them (n same-family / n zoo
    experts), and the share of patients above it; the own expert's mean weight beside."""
    rows = []
    for (task, fs, model), r in routing.groupby(["task", "feature_set", "model"], sort=True):
        # the zoo's sources; ROUPKT's own expert is no source: the shares are of the weight
        # the router gives the zoo (renormalised per patient; unchanged without an own expert)
        sources = [s for s in r["source"] if s != OWN_EXPERT]
        same = [s for s in sources if world.same_family(s, targets[task])]
        if not same or len(same) == len(sources):
            continue  # nothing to concentrate on, or nothing else to weigh
        sub = preds[
            (preds["task"] == task) & (preds["feature_set"] == fs) & (preds["model"] == model)
        ]
        per_patient = sub.groupby("patient_id")[[f"{ROUTING_PREFIX}{s}" for s in sources]].mean()
        share = per_patient[[f"{ROUTING_PREFIX}{s}" for s in same]].sum(axis=1) / per_patient.sum(
            axis=1
        )
        uniform = len(same) / len(sources)
        others = [s for s in sources if s not in same]
        own = r.loc[r["source"] == OWN_EXPERT, "mean_weight"]
        rows.append(
            {
                "task": task,
                "target": targets[task],
                "feature_set": fs,
                "model": model,
                "n_patients": len(per_patient),
                "n_experts": len(sources),
                "same_family_sources": ";".join(same),
                "same_share": float(share.mean()),
                "uniform_share": uniform,
                "excess": float(share.mean()) - uniform,
                "patients_above_uniform": float((share > uniform).mean()),
                "mean_weight_same": float(r.loc[r["source"].isin(same), "mean_weight"].mean()),
                "mean_weight_other": float(r.loc[r["source"].isin(others), "mean_weight"].mean()),
                "mean_weight_own": float(own.iloc[0]) if len(own) else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=CONCENTRATION_COLUMNS)


def concentration_summary(concentration: pd.DataFrame) -> dict[str, Any] | None:
    """Over targets: mean same-family share against uniform, and a one-sided Wilcoxon
    signed-rank test of the per-target excess (exact for few targets)."""
    from scipy.stats import wilcoxon

    if concentration.empty:
        return None
    own = concentration["mean_weight_own"].dropna()
    excess = concentration["excess"].to_numpy(float)
    p = (
        float(wilcoxon(excess, alternative="greater").pvalue)
        if len(excess) >= 2 and np.any(excess != 0)
        else math.nan
    )
    return {
        "n_targets": len(excess),
        "mean_same_share": float(concentration["same_share"].mean()),
        "mean_uniform_share": float(concentration["uniform_share"].mean()),
        "mean_excess": float(excess.mean()),
        "n_positive": int((excess > 0).sum()),
        "wilcoxon_p": p,
        "mean_weight_same": float(concentration["mean_weight_same"].mean()),
        "mean_weight_other": float(concentration["mean_weight_other"].mean()),
        "mean_weight_own": float(own.mean()) if len(own) else None,
    }


# ------------------------------------------------------------------------------ figures


def _save(fig: Any, target: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heat(ax: Any, table: pd.DataFrame, vmin: float, vmax: float, title: str, label: str) -> None:
    values = table.to_numpy(dtype=float)
    image = ax.imshow(values, cmap="RdBu_r", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=90)
    ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index])
    ax.set_title(title, fontsize=10)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            if np.isfinite(values[i, j]):
                shade = (values[i, j] - vmin) / (vmax - vmin)  # white text on the dark ends
                color = "white" if shade < 0.15 or shade > 0.85 else "black"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color=color)  # fmt: skip
    ax.figure.colorbar(image, ax=ax, label=label, shrink=0.8)


def _matrix_figure(wide: pd.DataFrame, planted: pd.DataFrame | None, out: Path) -> list[str]:
    plt = _pyplot()
    n_rows, n_cols = wide.shape
    size = (1.6 + 0.55 * n_cols, 1.2 + 0.5 * n_rows)
    fig, ax = plt.subplots(figsize=size)
    _heat(ax, wide, 0.3, 0.7, "recovered: C-index of source on target", "C-index")
    ax.set_xlabel("target cancer")
    ax.set_ylabel("source model")
    _save(fig, out / "matrix.png")
    written = ["matrix.png"]
    if planted is not None:
        fig, axes = plt.subplots(1, 2, figsize=(2 * size[0], size[1]))
        _heat(axes[0], planted, -1.0, 1.0, "planted similarity (cosine of hazards)", "cosine")
        _heat(axes[1], wide, 0.3, 0.7, "recovered C-index (same order)", "C-index")
        for ax in axes:
            ax.set_xlabel("target cancer")
            ax.set_ylabel("source")
        _save(fig, out / "similarity.png")
        written.append("similarity.png")
    return written


def _gains_figure(gains: pd.DataFrame, out: Path) -> bool:
    if gains.empty:
        return False
    plt = _pyplot()
    targets = list(dict.fromkeys(gains.sort_values("n_patients", ascending=False)["target"]))
    methods = sorted(gains["method"].unique())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.5 * len(targets) * len(methods)), 3.8))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        g = gains[gains["method"] == method].set_index("target")
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(targets):
            if t in g.index:
                row = g.loc[t] if isinstance(g.loc[t], pd.Series) else g.loc[t].iloc[0]
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(row["diff"])
                lo.append(row["diff"] - row["lower"])
                hi.append(row["upper"] - row["diff"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=2, label=method)
    rare = set(gains.loc[gains["rare"], "target"])
    for i, t in enumerate(targets):
        if t in rare:
            ax.axvspan(i - 0.5, i + 0.5, color="#f3e6c8", zorder=0)
    ax.axhline(0.0, color="grey", lw=0.8)
    n_of = gains.groupby("target")["n_patients"].first()
    ax.set_xticks(range(len(targets)), [f"{t}\n(n={n_of[t]})" for t in targets], fontsize=7)
    ax.set_ylabel(f"C-index minus {gains['baseline'].iloc[0]}")
    ax.set_title(
        "gain over the cancer-specific model, 95% paired interval (shaded: rare)", fontsize=9
    )
    ax.legend(fontsize=7)
    _save(fig, out / "gains.png")
    return True


def _routing_figure(routing: pd.DataFrame, out: Path) -> bool:
    if routing.empty:
        return False
    plt = _pyplot()
    table = routing.pivot_table(index="target", columns="source", values="mean_weight",
                                aggfunc="mean")  # fmt: skip
    order = list(dict.fromkeys(routing.sort_values("n_patients", ascending=False)["target"]))
    table = table.loc[order]
    fig, ax = plt.subplots(figsize=(1.8 + 0.6 * table.shape[1], 1.2 + 0.45 * table.shape[0]))
    image = ax.imshow(table.to_numpy(float), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(table.shape[1]), list(table.columns), rotation=90)
    ax.set_yticks(range(table.shape[0]), list(table.index))
    same = {
        (t, s)
        for t, s, f in zip(
            routing["target"], routing["source"], routing["same_family"], strict=True
        )
        if f is not None and not pd.isna(f) and bool(f)
    }
    for i, t in enumerate(table.index):
        for j, s in enumerate(table.columns):
            v = table.iat[i, j]
            if np.isfinite(v):
                mark = " *" if (t, s) in same else ""
                ax.text(j, i, f"{v:.2f}{mark}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.5 else "white")  # fmt: skip
    ax.set_xlabel("source (expert)")
    ax.set_ylabel("target")
    ax.set_title("mean router weight (* same planted family)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    _save(fig, out / "routing.png")
    return True


# ------------------------------------------------------------------------------ page


def _img(out: Path, name: str) -> str:
    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(name)}'>"


def _table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    formats = formats or {}

    def cell(column: str, value: Any) -> str:
        if isinstance(value, float | np.floating):
            return "-" if not np.isfinite(value) else format(value, formats.get(column, ".3f"))
        if value is None:
            return "-"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(c, v)}</td>" for c, v in zip(frame.columns, row, strict=True))
        + "</tr>"
        for row in frame.itertuples(index=False)
    )  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(report: TransferReport, figures: list[str], has_world: bool) -> str:
    out = report.out_dir
    s = report.summary
    parts = [
        "<!doctype html><meta charset='utf-8'><title>transfer report</title><style>"
        "body{font-family:sans-serif;max-width:1200px}td,th{padding:3px 7px;text-align:center;"
        "border:1px solid #ddd}table{border-collapse:collapse;margin:8px 0}.ns{color:#888}"
        ".rare{background:#fbf3e0}</style><h1>Cross-cancer transfer report</h1>",
        "<p>"
        + "<br>".join(html.escape(line) for line in report.summary_text().splitlines())
        + "</p>",
        "<h2>Transfer matrix</h2><p>C-index of each source model, unchanged, on each target's "
        "patients it never saw (diagonal: out-of-fold); rows and columns in clustered order.</p>",
        _img(out, "matrix.png"),
    ]
    if has_world and "similarity.png" in figures:
        rho = s.get("spearman_planted")
        parts += [
            "<h2>Planted similarity and recovered matrix</h2>",
            _img(out, "similarity.png"),
            "<p>Spearman over the off-diagonal pairs: recovered vs planted "
            f"{_fmt(rho)}; the oracle's transfer C vs planted "
            f"{_fmt(s.get('spearman_oracle_planted'))}; recovered vs oracle "
            f"{_fmt(s.get('spearman_recovered_oracle'))} ({s.get('n_pairs', 0)} pairs). "
            "What the slides can carry across a pair (the oracle restricted to the latents "
            "that prototypes the source and target share express, and to the latents as the "
            "shares of those prototypes read them) vs planted: "
            f"{_fmt(s.get('spearman_visible_planted'))} and "
            f"{_fmt(s.get('spearman_readout_planted'))}. A perfect reader of the morphologies "
            "whose coefficients are learned from each source's own patients (no true "
            "coefficient; ridge Cox on the realised shares, then also on the cells' state) vs "
            f"planted: {_fmt(s.get('spearman_learned_planted'))} and "
            f"{_fmt(s.get('spearman_learned_states_planted'))}; with each effect learned alone "
            "(univariable, unadjusted: what does not lean on tissue a target lacks) "
            f"{_fmt(s.get('spearman_learned_marginal_planted'))}.</p>",
        ]
    if not report.gains.empty:
        g = report.gains.copy()
        g["verdict"] = np.where(g["significant"], "", "not significant")
        g = g.sort_values(["n_patients", "target", "method"], ascending=[False, True, True])
        shown = g[["target", "n_patients", "rare", "method", "c_method", "c_baseline", "diff",
                   "lower", "upper", "p_value", "verdict"]]  # fmt: skip
        parts += [
            f"<h2>Gain over the cancer-specific model ({html.escape(str(s.get('baseline')))})"
            "</h2><p>Per target, each method's C-index minus the cancer-specific model's, on the "
            "patients both scored, with the benchmark's paired bootstrap over patients and "
            "seeds (95% interval, two-sided p). Rare: at most "
            f"{s.get('rare_max')} patients.</p>",
            _img(out, "gains.png") if "gains.png" in figures else "",
            _table(shown, {"p_value": ".3g"}),
        ]
    if not report.routing.empty:
        marked = report.routing.assign(
            shown=[
                f"{w:.3f}" + (" *" if f is not None and not pd.isna(f) and bool(f) else "")
                for w, f in zip(report.routing["mean_weight"], report.routing["same_family"],
                                strict=True)
            ]
        )  # fmt: skip
        r = marked.pivot(index=["target", "model", "n_patients", "rare"], columns="source",
                         values="shown").reset_index()  # fmt: skip
        parts += [
            "<h2>Router weights per target</h2><p>Mean softmax weight of each source (expert) "
            "over the target's test patients"
            + ("; * marks sources of the target's planted family" if has_world else "")
            + ".</p>",
            _img(out, "routing.png") if "routing.png" in figures else "",
            _table(r),
        ]
    if not report.concentration.empty:
        parts += [
            "<h2>Do the router weights concentrate on same-family sources?</h2><p>Per target "
            "with same-family sources among its experts: the weight on them (per patient, "
            "summed, then averaged) against the share of uniform routing.</p>",
            _table(report.concentration.drop(columns=["task", "feature_set"])),
        ]
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
            + "</ul>"
        )
    return "".join(parts)


def _fmt(value: Any) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"


# ------------------------------------------------------------------------------ main


def transfer_report(
    matrix_dir: PathLike,
    out_dir: PathLike,
    *,
    bench: PathLike | Sequence[PathLike] | None = None,
    world: PathLike | None = None,
    baseline: str = "abmil",
    rare_max: int = 60,
    n_boot: int = 1000,
    seed: int = 0,
) -> TransferReport:
    """Build the transfer report (see the module docstring).

    Args:
        matrix_dir: a transfer matrix folder (``oncoslide transfer matrix``).
        out_dir: where the page, CSVs and figures go.
        bench: a benchmark folder whose tasks are per-target survival tasks (a task's target is
            the one cancer of its filter, or named in the task); its entries are compared with
            the ``baseline`` model's entry, and entries that record router weights
            (``detail_routing_<source>``) give the router table. Several folders (e.g. the
            rare targets under 5 x 5 CV, the others under 5 x 1) are read together; a task may
            appear in one only.
        world: a simulated world's folder (or truth.json): the planted similarity and families.
        rare_max: targets with at most this many patients are marked rare.
        n_boot, seed: the paired bootstrap's replicates and seed.
    """
    tm = Path(matrix_dir)
    out = check_folder_target(out_dir)
    cells, wide = _read_matrix(tm)
    truth = load_world(world) if world is not None else None
    notes: list[str] = []
    cancers = set(cells["source"]) | set(cells["target"])

    pairs = _pairs(cells, truth)
    summary: dict[str, Any] = {"baseline": baseline, "rare_max": rare_max, "n_boot": n_boot}
    planted = None
    if truth is not None:
        missing = sorted(c for c in cancers if c not in truth.similarity.index)
        if missing:
            notes.append(f"the truth has no planted similarity for {', '.join(missing)}")
        rows = [r for r in wide.index if r in truth.similarity.index]
        cols = [c for c in wide.columns if c in truth.similarity.columns]
        planted = truth.similarity.loc[rows, cols]
        summary["n_pairs"] = int(pairs["planted_similarity"].notna().sum())
        summary["spearman_planted"] = _spearman(pairs["c_index"], pairs["planted_similarity"])
        summary["spearman_oracle_planted"] = _spearman(
            pairs["oracle_c_index"], pairs["planted_similarity"]
        )
        summary["spearman_recovered_oracle"] = _spearman(pairs["c_index"], pairs["oracle_c_index"])
        if "visible_c_index" in pairs:
            # the ceilings of what the slides carry across each pair (visible_oracle)
            for column in CEILING_COLUMNS:  # e.g. spearman_learned_states_planted
                key = f"spearman_{column.removesuffix('_c_index')}_planted"
                summary[key] = _spearman(pairs[column], pairs["planted_similarity"])
        if summary["spearman_planted"] is None:
            del summary["spearman_planted"]

    gains = pd.DataFrame(columns=GAIN_COLUMNS)
    routing = pd.DataFrame(columns=ROUTING_COLUMNS)
    concentration = pd.DataFrame(columns=CONCENTRATION_COLUMNS)
    benches = _bench_list(bench)
    if benches:
        gain_parts, routing_parts, conc_parts = [], [], []
        task_preds: dict[str, pd.DataFrame] = {}
        for folder in benches:
            spec, tasks, preds = _bench_predictions(folder)
            targets = _task_targets(spec, [str(t["task"]) for t in tasks], cancers)
            unmatched = [str(t["task"]) for t in tasks if str(t["task"]) not in targets]
            if unmatched:
                notes.append(
                    f"tasks without one target cancer of the matrix: {', '.join(unmatched)}"
                )
            twice = sorted(set(targets) & set(task_preds))
            if twice:
                raise ConfigError(f"benchmark {folder} repeats tasks of another: {twice}")
            task_preds.update({t: preds[preds["task"] == t] for t in targets})
            gain_parts.append(_gains(preds, tasks, targets, baseline, rare_max=rare_max,
                                     n_boot=n_boot, seed=seed, notes=notes))  # fmt: skip
            part_routing = _routing(preds, targets, truth, rare_max)
            routing_parts.append(part_routing)
            if truth is not None:
                conc_parts.append(_concentration(preds, part_routing, targets, truth))
        gains = _concat(gain_parts, GAIN_COLUMNS)
        routing = _concat(routing_parts, ROUTING_COLUMNS)
        concentration = _concat(conc_parts, CONCENTRATION_COLUMNS)
        rare = gains[gains["rare"].astype(bool)]
        summary["n_rare"] = int(rare["target"].nunique())
        summary["rare_mean_diff"] = {
            m: {
                "mean_diff": float(g["diff"].mean()),
                "n_better": int((g["diff"] > 0).sum()),
                "n_significant": int(g["significant"].sum()),
                "n_targets": len(g),
                **_pooled_interval(task_preds, g, baseline, n_boot=n_boot, seed=seed),
            }
            for m, g in rare.groupby("method")
        }
        c = concentration_summary(concentration) if truth is not None else None
        if c is not None:
            summary["concentration"] = c

    out.mkdir(parents=True, exist_ok=True)
    figures = _matrix_figure(wide, planted, out)
    write_table(out / "pairs.csv", pairs)
    write_table(out / "matrix_wide.csv", wide.reset_index())
    if planted is not None:
        write_table(out / "similarity_wide.csv", planted.rename_axis("source").reset_index())
    if benches:
        write_table(out / "gains.csv", gains)
        write_table(out / "routing.csv", routing)
        if _gains_figure(gains, out):
            figures.append("gains.png")
        if _routing_figure(routing, out):
            figures.append("routing.png")
        if truth is not None:
            write_table(out / "concentration.csv", concentration)
    report = TransferReport(
        out_dir=out,
        html_path=out / "index.html",
        matrix=wide,
        pairs=pairs,
        gains=gains,
        routing=routing,
        concentration=concentration,
        summary=summary,
        notes=notes,
    )
    write_json(out / "summary.json", {**summary, "notes": notes})
    write_text(out / "index.html", _page(report, figures, truth is not None))
    return report
