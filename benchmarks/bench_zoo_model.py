"""Which zoo model gives a CROPKT matrix that follows the planted similarity (issue 13's
must-hold B: Spearman >= 0.7 over the off-diagonal pairs on the `pan-cancer` preset).

For every world seed and zoo model: simulate the world (once per seed), train the zoo of the
cancers with >= ``--min-patients`` patients (12 epochs, 5-fold CV, otherwise the defaults),
score the matrix, and print one row: Spearman of the recovered C-index with the planted
similarity over the off-diagonal pairs and over the cross-family ones, the zoo's mean CV
C-index, and the world's ceilings (``visible_oracle``: the oracle on the visible latents and on
the latents read from the shared morphologies; a perfect reader of the shares, then of the
shares and cells' states, whose coefficients are learned from each source's patients, jointly
and each alone) and the seconds spent training and scoring (0 when reused). Folders already
written are reused::

    OUT/w<seed>/world/            the simulated world
    OUT/w<seed>/<model>/zoo/      the zoo
    OUT/w<seed>/<model>/tm/       its transfer matrix

    python benchmarks/bench_zoo_model.py --out /tmp/zm --seeds 0 3 --models abmil composition

The rows go to ``OUT/rows.csv``; a last table judges issue 13's B over the worlds per zoo model
(``over_worlds``: the mean Spearman with its 95% t-interval, how many worlds reach 0.7, and the
ceilings averaged alike), since one world's Spearman depends on the draw (docs/transfer.md).

Measured 2026-12-01 (docs/transfer.md, "Which zoo model for the matrix"): about 5-9 minutes
per zoo on 2 shared CPU cores.

``--familiar-only`` adds a diagnostic that only a simulated world allows (its patch labels):
the Spearman of a matrix in which each source scores the target's slides with the patches of
morphologies it never met in training left out (other families' tumour morphologies, other
cancers' own tissue), as ``spearman_familiar``. It measures how much of the gap the sources'
response to unfamiliar tissue costs; it is not a method (no gate learned from the patches
reproduces it, docs/transfer.md). About 3 minutes per world (it writes filtered feature
copies to a temporary folder under OUT).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import make_simulation_config, simulate_cohort
from oncoslide.training import make_config
from oncoslide.transfer import Zoo, build_zoo, load_zoo, transfer_matrix
from oncoslide.transfer.matrix import score_unseen
from oncoslide.transfer.report import CEILING_COLUMNS, _prototype_sets, visible_oracle
from oncoslide.transfer.zoo import cancer_groups, cindex_interval


def agreement(truth: dict, cells: pd.DataFrame) -> dict[str, float]:
    """Spearman of the off-diagonal cells' C-index (and of the ceilings) with the planted
    similarity, as the transfer report computes it; also over the cross-family pairs."""
    prognosis = truth["prognosis"]
    similarity, families = prognosis["similarity"], prognosis["families"]
    off = cells[~cells["diagonal"].astype(bool)].copy()
    off = off[np.isfinite(off["c_index"])]
    off["planted"] = [similarity[s][t] for s, t in zip(off["source"], off["target"], strict=True)]
    off["cross"] = [families[s] != families[t] for s, t in zip(off["source"], off["target"], strict=True)]  # fmt: skip
    ceilings = visible_oracle(truth)
    if ceilings is not None:
        off = off.join(ceilings.set_index(["source", "target"]), on=["source", "target"])
    cross = off[off["cross"]]
    out = {
        "n_pairs": float(len(off)),
        "spearman": float(spearmanr(off["planted"], off["c_index"]).statistic),
        "spearman_cross": float(spearmanr(cross["planted"], cross["c_index"]).statistic),
    }
    for column in CEILING_COLUMNS:
        if column in off:
            out[column] = float(spearmanr(off["planted"], off[column]).statistic)
    return out


def familiar_only_cells(world: Path, zoo: Zoo, scratch: Path) -> pd.DataFrame:
    """Off-diagonal cells (source, target, c_index, diagonal) with every target slide reduced to
    the patches whose prototype (the world's patch labels) the source's cancer has; a slide
    left without any patch stays whole."""
    import h5py

    from oncoslide.features.cache import FeatureCache

    truth = json.loads((world / "truth.json").read_text())
    labels = np.load(world / "truth_patch_labels.npz")
    names = {int(p["index"]): str(p["name"]) for p in truth["prototypes"]}
    members = _prototype_sets(truth)
    rows = []
    for source in zoo.cancers:
        known = [i for i, name in names.items() if name in members[source]]
        folder = scratch / source
        folder.mkdir(parents=True)
        for path in sorted((world / "features").glob("*.h5")):
            keep = np.isin(labels[path.stem], known)
            keep = keep if keep.any() else np.ones_like(keep)
            with h5py.File(path) as src, h5py.File(folder / path.name, "w") as dst:
                dst.attrs.update(dict(src.attrs))
                for key in src:
                    copy = dst.create_dataset(key, data=src[key][()][keep])
                    copy.attrs.update(dict(src[key].attrs))
        cohort = load_cohort(world / "cohort.csv", folder)
        trained = zoo.model(source)
        seen = set(trained.patients()["patient_id"].astype(str))
        cache = FeatureCache()
        try:
            for target, patient_ids in cancer_groups(cohort, zoo.by).items():
                frame = None if target == source else score_unseen(
                    trained, cohort, patient_ids, seen, cache)  # fmt: skip
                if frame is None:
                    continue
                c = cindex_interval(frame, 1, 0)[0]
                rows.append({"source": source, "target": target, "c_index": c, "diagonal": False})
        finally:
            cache.close()
    return pd.DataFrame(rows)


def run(
    out: Path, seed: int, model: str, min_patients: int, epochs: int, familiar_only: bool = False
) -> dict[str, object]:
    world = out / f"w{seed}" / "world"
    if not (world / "truth.json").exists():
        simulate_cohort(world, make_simulation_config("pan-cancer", {"seed": seed}))
    cohort = load_cohort(world / "cohort.csv", world / "features")
    folder = out / f"w{seed}" / model
    start = time.perf_counter()
    if not (folder / "zoo" / "zoo.json").exists():
        config = make_config(task="survival", model=model, epochs=epochs, n_boot=0, progress=False)
        build_zoo(cohort, config, folder / "zoo", by="cohort", min_patients=min_patients)
    zoo = load_zoo(folder / "zoo")
    if not (folder / "tm" / "matrix.csv").exists():
        transfer_matrix(zoo, cohort, folder / "tm", n_boot=200)
    cells = pd.read_csv(folder / "tm" / "matrix.csv", dtype={"source": str, "target": str})
    truth = json.loads((world / "truth.json").read_text())
    row: dict[str, object] = {"seed": seed, "model": model, **agreement(truth, cells)}
    if familiar_only:
        import tempfile

        with tempfile.TemporaryDirectory(dir=out) as scratch:
            familiar = agreement(truth, familiar_only_cells(world, zoo, Path(scratch)))
        row["spearman_familiar"] = familiar["spearman"]
        row["spearman_cross_familiar"] = familiar["spearman_cross"]
    return {
        **row,
        "zoo_cv_c": float(np.mean([e.c_index for e in zoo.entries])),
        "seconds": round(time.perf_counter() - start),
    }


def over_worlds(rows: pd.DataFrame, threshold: float = 0.7) -> pd.DataFrame:
    """Per zoo model, issue 13's check B judged over the worlds rather than in one: the mean of
    each Spearman column over the seeds, the 95% t-interval of the matrix's mean (``spearman``)
    and how many worlds reach ``threshold``; the ceilings beside it, averaged alike."""
    from scipy import stats

    out = []
    columns = [c for c in rows.columns if c.startswith("spearman") or c in CEILING_COLUMNS]
    for model, group in rows.groupby("model", sort=False):
        values = group["spearman"].to_numpy(float)
        n = len(values)
        mean = float(values.mean())
        half = (
            float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        )
        row: dict[str, object] = {
            "model": model,
            "n_worlds": n,
            "spearman_lower": mean - half,
            "spearman_upper": mean + half,
            "worlds_at_threshold": int((values >= threshold).sum()),
        }
        row.update({c: float(group[c].mean()) for c in columns})
        out.append(row)
    return pd.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", default=["abmil", "mean", "max"])
    parser.add_argument("--min-patients", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--familiar-only", action="store_true",
                        help="also the matrix with unfamiliar target patches left out (truth)")  # fmt: skip
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for model in args.models:
            rows.append(
                run(args.out, seed, model, args.min_patients, args.epochs, args.familiar_only)
            )
            print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False))
    table.to_csv(args.out / "rows.csv", index=False)
    print("\nover the worlds (issue 13's B: mean Spearman, its 95% t-interval, worlds >= 0.7):")
    print(over_worlds(table).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
