"""HMIL against flat ABMIL on the fine labels of the `hierarchical` world (issue 15, part 1).

The preset as written (500 patients, 3 families -> 7 subtypes, seed 0; never tuned), the task
``histology_fine``, 5-fold cross-validation x ``--seeds`` seeds, default training settings for
both models. ABMIL is trained flat (no tree; its fine decision is the argmax, the usual
balanced accuracy); HMIL with ``--hierarchy label_tree.yaml`` (its fine decision is top-down,
inside the most probable family, see ``oncoslide.evaluation.hierarchy``). Both runs use the
same splits (same seeds, same strata), so every test patient is paired.

Printed: each model's fine balanced accuracy and macro AUC (mean over (seed, fold)), ABMIL's
top-down balanced accuracy too (its probabilities under HMIL's decision rule), both models'
coarse-level numbers, the share of tree-consistent predictions, the paired difference of fine
balanced accuracy with a patient bootstrap (one draw of the patients per replicate, shared by
every seed and fold, each (seed, fold) rescored with the multiplicities, and a draw of the
training seeds, as ``oncoslide.bench.stats``) and its two-sided p-value, and the seconds per run.

    python benchmarks/bench_hmil.py                 # 6 seeds: about 40-65 minutes on 2 CPU cores
    python benchmarks/bench_hmil.py --seeds 1       # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncoslide.bench.stats import SeedDraws, bootstrap_counts
from oncoslide.cohort.label_tree import load_label_tree
from oncoslide.cohort.table import load_cohort
from oncoslide.evaluation.hierarchy import hierarchical_metrics, tree_consistent, tree_decision
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import cross_validate, make_config

TASK = "histology_fine"


def _weighted_bacc(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> float:
    recalls = []
    for c in np.unique(y):
        wc = w * (y == c)
        if wc.sum() > 0:
            recalls.append(float((wc * (pred == c)).sum() / wc.sum()))
    return float(np.mean(recalls)) if recalls else float("nan")


def _cells(preds: pd.DataFrame, classes: list[str], parent: np.ndarray, top_down: bool) -> dict:
    """Per (seed, fold): patient ids, true and predicted fine class indices."""
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for (seed, fold), cell in preds.groupby(["seed", "fold"]):
        probs = cell[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
        pred = tree_decision(probs, parent)[1] if top_down else probs.argmax(1)
        y = cell["label"].map(index).to_numpy()
        out[(int(seed), int(fold))] = (cell["patient_id"].to_numpy(), y, pred)
    return out


def paired_bacc(
    a: dict, b: dict, n_boot: int, seed: int = 0, *, seed_level: bool = True
) -> dict[str, float]:
    """Paired bootstrap of balanced accuracy a - b (same cells, same patients), two levels as
    ``oncoslide.bench.stats``: each replicate draws the patients (shared by every seed and
    fold) and the training seeds with replacement, and weights each (seed, fold) cell by its
    seed's count (``seed_level=False``: the patient level only, as a run's summary does)."""
    patients = np.sort(np.unique(np.concatenate([ids for ids, _, _ in a.values()])))
    col = {p: k for k, p in enumerate(patients)}
    counts = bootstrap_counts(len(patients), n_boot, seed)
    keys = sorted(a)
    draws = SeedDraws.draw([s for s, _ in keys], n_boot, seed)
    weights = draws.cell_weights(np.asarray([s for s, _ in keys], dtype=np.intp))  # (B, cells)
    if not seed_level:
        weights = np.ones_like(weights)
    cell_diffs = np.zeros((n_boot, len(keys)))
    point = []
    for j, key in enumerate(keys):
        ids, y, pred_a = a[key]
        ids_b, y_b, pred_b = b[key]
        assert (ids == ids_b).all() and (y == y_b).all(), "runs are not paired"
        cols = np.asarray([col[p] for p in ids])
        ones = np.ones(len(y))
        point.append(_weighted_bacc(y, pred_a, ones) - _weighted_bacc(y, pred_b, ones))
        for r in range(n_boot):
            w = counts[r, cols].astype(float)
            cell_diffs[r, j] = _weighted_bacc(y, pred_a, w) - _weighted_bacc(y, pred_b, w)
    diffs = (cell_diffs * weights).sum(1) / weights.sum(1)
    diffs = diffs[np.isfinite(diffs)]
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    p = min(1.0, 2.0 * min(below + 1, above + 1) / (diffs.size + 1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    per_seed = {
        f"diff_seed{s}": float(
            np.mean([d for (ks, _), d in zip(keys, point, strict=True) if ks == s])
        )
        for s in draws.seeds.tolist()
    }
    return {
        "diff": float(np.mean(point)), "lower": float(lo), "upper": float(hi), "p_value": p,
        **per_seed,
    }  # fmt: skip


def _fold_means(cells: dict, parent: np.ndarray, preds: pd.DataFrame, classes: list[str]) -> dict:
    """Mean over (seed, fold) of the fine and coarse metrics of a run's predictions."""
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for (_seed, _fold), cell in preds.groupby(["seed", "fold"]):
        probs = cell[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
        y = cell["label"].map(index).to_numpy()
        rows.append(hierarchical_metrics(y, probs, parent))
    frame = pd.DataFrame(rows)
    flat = [_weighted_bacc(y, pred, np.ones(len(y))) for _, y, pred in cells.values()]
    return {**frame.mean().to_dict(), "balanced_accuracy_argmax": float(np.mean(flat))}


def compare(
    root: Path, seeds: tuple[int, ...] = (0, 1, 2), n_boot: int = 2000, world_seed: int = 0
) -> dict[str, Any]:
    """Train both models on the preset's world under ``root`` and compare them (see above)."""
    world = root / "world"
    if not (world / "cohort.csv").exists():
        simulate_cohort(world, make_simulation_config("hierarchical", {"seed": world_seed}))
    tree_path = world / "label_tree.yaml"
    cohort = load_cohort(world / "cohort.csv", world / "features", label_cols=(TASK,))
    results: dict[str, Any] = {"seeds": list(seeds), "patients": len(cohort.patient_ids)}
    runs = {}
    for model in ("abmil", "hmil"):
        config = make_config(
            task=TASK,
            model=model,
            hierarchy=str(tree_path) if model == "hmil" else None,
            folds=5,
            seed=seeds[0],
            repeats=len(seeds),
            n_boot=0,
            progress=False,
        )
        started = time.perf_counter()
        runs[model] = cross_validate(cohort, config, root / model)
        results[f"{model}_seconds"] = time.perf_counter() - started
    assert runs["abmil"].splits.equals(runs["hmil"].splits), "the two runs must share splits"
    classes = list(runs["hmil"].task.classes)
    tree = load_label_tree(tree_path)
    coarse, parent = tree.parent_index(classes)
    preds = {m: r.predictions.sort_values(["seed", "fold", "patient_id"]) for m, r in runs.items()}
    hmil_cells = _cells(preds["hmil"], classes, parent, top_down=True)
    abmil_cells = _cells(preds["abmil"], classes, parent, top_down=False)
    for model, cells in (("hmil", hmil_cells), ("abmil", abmil_cells)):
        for k, v in _fold_means(cells, parent, preds[model], classes).items():
            results[f"{model}_{k}"] = v
    # the flat model's own decision (argmax) against HMIL's top-down one
    results["hmil_bacc"] = results["hmil_balanced_accuracy"]
    results["abmil_bacc"] = results["abmil_balanced_accuracy_argmax"]
    results["hmil_bacc_coarse"] = results["hmil_balanced_accuracy_coarse"]
    hp = preds["hmil"]
    results["hmil_consistent"] = float(
        tree_consistent(
            [coarse.index(c) for c in hp["pred_coarse"]],
            [classes.index(c) for c in hp["pred_fine"]],
            parent,
        ).mean()
    )
    abp = preds["abmil"][[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    results["abmil_argmax_consistent"] = float(
        (parent[abp.argmax(1)] == np.argmax(
            np.stack([abp[:, parent == k].sum(1) for k in range(len(coarse))], 1), 1
        )).mean()
    )  # fmt: skip
    results.update(paired_bacc(hmil_cells, abmil_cells, n_boot))
    patient_level = paired_bacc(hmil_cells, abmil_cells, n_boot, seed_level=False)
    results.update({f"patients_only_{k}": patient_level[k] for k in ("lower", "upper", "p_value")})
    abmil_td = _cells(preds["abmil"], classes, parent, top_down=True)
    td = paired_bacc(hmil_cells, abmil_td, n_boot)
    results.update({f"vs_abmil_top_down_{k}": v for k, v in td.items()})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="training seeds (0, 1, ...)")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--root", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        r = compare(root, seeds=tuple(range(args.seeds)), n_boot=args.n_boot)
    print(f"hierarchical preset, {r['patients']} patients, 5-fold x seeds {r['seeds']}")
    for m in ("abmil", "hmil"):
        print(
            f"  {m:6s} fine bacc {r[f'{m}_bacc']:.3f} (argmax {r[f'{m}_balanced_accuracy_argmax']:.3f},"
            f" top-down {r[f'{m}_balanced_accuracy']:.3f}), fine AUC {r[f'{m}_auc']:.3f}, "
            f"coarse bacc {r[f'{m}_balanced_accuracy_coarse']:.3f}, coarse AUC "
            f"{r[f'{m}_auc_coarse']:.3f}; {r[f'{m}_seconds']:.0f} s"
        )
    print(
        f"  HMIL - ABMIL fine bacc {r['diff']:+.3f} [{r['lower']:+.3f}, {r['upper']:+.3f}], "
        f"p {r['p_value']:.4f}; against ABMIL top-down {r['vs_abmil_top_down_diff']:+.3f}, "
        f"p {r['vs_abmil_top_down_p_value']:.4f}"
    )
    print(
        f"  (patients resampled, seeds not: [{r['patients_only_lower']:+.3f}, "
        f"{r['patients_only_upper']:+.3f}], p {r['patients_only_p_value']:.4f}; per seed: "
        + ", ".join(f"{k[5:]} {v:+.3f}" for k, v in r.items() if k.startswith("diff_seed"))
        + ")"
    )
    print(
        f"  tree-consistent: HMIL {100 * r['hmil_consistent']:.1f} %, ABMIL argmax "
        f"{100 * r['abmil_argmax_consistent']:.1f} %"
    )
    print(json.dumps(r, default=float))
    ok = r["diff"] > 0 and r["p_value"] < 0.05 and r["hmil_consistent"] == 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
