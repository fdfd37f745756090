"""CROPKT's transferability matrix: every zoo model, unchanged, scored on every cancer.

Cell (source s, target t) is Harrell's C-index of s's model on t's patients that the model never
saw: for s != t every patient of t that is not in the model's ``patients.csv`` (train or
validation part); on the diagonal, where the all-patient model saw everyone, the out-of-fold
predictions of s's cross-validation run. Each cell has a percentile bootstrap interval over its
patients. Rows and columns are ordered by average-linkage clustering of the matrix, so cancers
that share prognostic morphology sit together.

``transfer_matrix(zoo, cohort, out)`` writes::

    OUT/
      matrix.csv        tidy: source, target, c_index, lower, upper, n_patients, n_events
      matrix_wide.csv   source x target C-index, in the clustered order
      matrix.png        the heat map
      predictions.parquet  source, target, patient_id, time, event, risk (every scored patient)
      index.html        the matrix as a table with its intervals
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from oncoslide._io import atomic_path, check_folder_target, write_table, write_text
from oncoslide.cohort.table import Cohort
from oncoslide.features.cache import FeatureCache
from oncoslide.transfer.zoo import Zoo, cancer_groups, cindex_interval, out_of_fold

if TYPE_CHECKING:
    from oncoslide.training.model_folder import TrainedModel

__all__ = ["TransferMatrix", "clustered_order", "score_unseen", "transfer_matrix"]


@dataclass(frozen=True)
class TransferMatrix:
    cells: pd.DataFrame  # tidy rows
    wide: pd.DataFrame  # source x target C-index, clustered order
    predictions: pd.DataFrame
    out_dir: Path


def clustered_order(matrix: pd.DataFrame) -> list[str]:
    """Labels in the leaf order of average-linkage clustering of the symmetrised matrix
    (distance 1 - C, so cancers whose models transfer well to each other are close)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    labels = list(matrix.index)
    if len(labels) < 3:
        return labels
    values = matrix.loc[labels, labels].to_numpy(dtype=float)
    values = np.where(np.isfinite(values), values, 0.5)
    sym = 0.5 * (values + values.T)
    dist = np.clip(1.0 - sym, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    order = leaves_list(linkage(squareform(dist, checks=False), method="average"))
    return [labels[i] for i in order]


def score_unseen(
    model: TrainedModel,
    cohort: Cohort,
    patient_ids: Sequence[str],
    seen: set[str],
    cache: FeatureCache,
) -> pd.DataFrame | None:
    """The model's risk on the patients of ``patient_ids`` it never saw (not in ``seen``) that
    have a survival outcome: patient_id, time, event, risk; None when none is left."""
    from oncoslide.training.predict import predict_logits

    sub = cohort.subset([p for p in patient_ids if p not in seen])
    ids = sub.patients_with(sub.time_col, sub.event_col)
    if not ids:
        return None
    logits, _ = predict_logits(model, sub, ids, cache)
    risk = model.fold_task.prediction_frame(logits)["risk"].to_numpy()
    y = sub.survival(ids)
    return pd.DataFrame({"patient_id": ids, "time": y["time"], "event": y["event"], "risk": risk})


def transfer_matrix(
    zoo: Zoo,
    cohort: Cohort,
    out_dir: str | os.PathLike[str],
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> TransferMatrix:
    """Score every zoo model on every cancer of ``cohort`` (see the module docstring)."""
    from oncoslide.training.predict import check_contract
    from oncoslide.training.run_folder import RunFolder

    out = check_folder_target(out_dir)
    groups = cancer_groups(cohort, zoo.by)
    targets = [c for c in groups if c in set(zoo.cancers)] + [
        c for c in groups if c not in set(zoo.cancers)
    ]
    rows, scored = [], []
    cache = FeatureCache()
    try:
        for source in zoo.cancers:
            model = zoo.model(source)
            check_contract(model, cohort, cache)
            seen = set(model.patients()["patient_id"].astype(str))
            for target in targets:
                if target == source:
                    frame = out_of_fold(pd.read_parquet(RunFolder(zoo.cv_run(source)).predictions))
                else:
                    unseen = score_unseen(model, cohort, groups[target], seen, cache)
                    if unseen is None:
                        continue
                    frame = unseen
                c, lo, hi = cindex_interval(frame, n_boot, seed)
                rows.append(
                    {
                        "source": source,
                        "target": target,
                        "c_index": c,
                        "lower": lo,
                        "upper": hi,
                        "n_patients": len(frame),
                        "n_events": int(frame["event"].sum()),
                        "diagonal": source == target,
                    }
                )
                scored.append(frame.assign(source=source, target=target))
    finally:
        cache.close()
    cells = pd.DataFrame(rows)
    wide = cells.pivot(index="source", columns="target", values="c_index")
    order = clustered_order(wide.loc[:, list(wide.index)]) if len(wide.index) else []
    extra = [c for c in wide.columns if c not in order]
    wide = wide.loc[order, order + extra]
    predictions = pd.concat(scored, ignore_index=True)[
        ["source", "target", "patient_id", "time", "event", "risk"]
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "matrix.csv", cells)
    write_table(out / "matrix_wide.csv", wide.reset_index())
    write_table(out / "predictions.parquet", predictions)
    _heatmap(wide, out / "matrix.png")
    write_text(out / "index.html", _page(cells, wide))
    return TransferMatrix(cells, wide, predictions, out)


def _heatmap(wide: pd.DataFrame, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = wide.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n_cols, 1.0 + 0.5 * n_rows))
    image = ax.imshow(wide.to_numpy(dtype=float), cmap="RdBu_r", vmin=0.3, vmax=0.7)
    ax.set_xticks(range(n_cols), [str(c) for c in wide.columns], rotation=90)
    ax.set_yticks(range(n_rows), [str(r) for r in wide.index])
    ax.set_xlabel("target cancer (patients the model never saw)")
    ax.set_ylabel("source model")
    for i in range(n_rows):
        for j in range(n_cols):
            v = wide.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="C-index")
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _page(cells: pd.DataFrame, wide: pd.DataFrame) -> str:
    lookup = {(r.source, r.target): r for r in cells.itertuples()}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in wide.columns)
    body = []
    for source in wide.index:
        tds = []
        for target in wide.columns:
            r = lookup.get((source, target))
            if r is None or not np.isfinite(r.c_index):
                tds.append("<td>-</td>")
                continue
            shade = "diag" if r.diagonal else ("up" if r.lower > 0.5 else "")
            tds.append(
                f'<td class="{shade}">{r.c_index:.3f}<br><small>[{r.lower:.2f}, {r.upper:.2f}]'
                f" n={r.n_patients}</small></td>"
            )
        body.append(f"<tr><th>{html.escape(str(source))}</th>{''.join(tds)}</tr>")
    return (
        "<!doctype html><meta charset='utf-8'><title>transfer matrix</title><style>"
        "body{font-family:sans-serif}td,th{padding:4px 8px;text-align:center;border:1px solid "
        "#ddd}.diag{background:#eee}.up{background:#e3f1e3}</style>"
        "<h1>Cross-cancer transfer: C-index of each source model on each target</h1>"
        "<p>Rows: source models (unchanged); columns: target cancers, scored on patients the "
        "source never saw (diagonal: out-of-fold). Green: the 95% interval lies above 0.5. "
        "Order: average-linkage clustering.</p><img src='matrix.png' alt='heat map'>"
        f"<table><tr><th>source \\ target</th>{head}</tr>{''.join(body)}</table>"
    )
