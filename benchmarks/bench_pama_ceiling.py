"""How far can ANY label-free embedding of the `spatial` world's patch features go? A measured
ceiling for issue 14's PAMA requirement, without pre-training.

The `inflamed` label of the `spatial` preset is driven by where immune patches sit (next to
tumour or away from it) at fixed composition; the signal is at the scale of a patch's 4
neighbours. This script builds slide statistics of the arrangement from the features alone -
no label, no learnt encoder - and feeds them to exactly bench_pama.py's protocol: the same
halves of patients (stratified by `inflamed`, seeded), the same frozen linear probe (logistic
C = 0.5 balanced on standardised inputs, patient-level stratified 5-fold CV repeated), the
same mean-pooling baseline on the same folds, the same paired patient-level bootstrap.

Label-free statistics (everything fitted is fitted on half A's patches, never on a label):

- a k-means tokenizer of ``K`` codes (PAMA's ``fit_codebook``, k-means++ from the seed) on at
  most 65,536 patches of half A's slides, as ``--target codes`` fits it;
- per patch a code distribution: ``hard`` (nearest code), ``soft`` (the posterior of a
  spherical Gaussian mixture on the codes: shared variance and code shares from half A),
  ``mf`` (that posterior denoised by its 4 neighbours: two mean-field sweeps of a pairwise
  Markov random field whose potential is the code co-occurrence of half A over independence;
  spatial clustering makes a patch's neighbours evidence of its own code);
- per patient the 4-neighbour co-occurrence of those distributions, summed over the patient's
  slides (each its own coordinate frame; an edge joins two patches one grid step apart):
  C[a, b] = mean over edges of the symmetrised outer product of the two ends' distributions;
- reduced to a vector: ``rates`` (the upper triangle of C), ``pmi`` (log C[a, b] / (p_a p_b),
  p the patient's code shares: co-occurrence beyond what composition predicts, which is where
  the planted signal is), ``pca`` (the first ``--pca`` principal components of ``pmi``, fitted
  on half A's patients).

``--shuffle`` (the position ablation): each slide's coordinates permuted among its patches
before anything is computed; every statistic should fall back to mean pooling's level.

References (the planted truth, for evaluation only): the same statistics on the true patch
prototypes (``truth_patch_labels.npz``), and the simulator's own readout, the interface ratio
of docs/simulator.md (1 number per patient; NaN - set to 1, random mixing - without immune
patches or tumour).

Choosing: every label-free variant is scored on the development probe (half A's own labels,
5-fold x 5) and the best one there is marked ``chosen_on_A``; every variant is then compared
with mean pooling on half B. ``--set seed=1`` simulates another world of the preset, for
confirming variants named in advance (``--variants``); docs/pretrain.md says which were
named on which data.

    python benchmarks/bench_pama_ceiling.py --out out/pama-ceiling   # 9-12 min on a loaded CPU
    python benchmarks/bench_pama_ceiling.py --set seed=1 --variants hard16-pmi,soft16-rates \
        --out out/pama-ceiling-seed1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bench_pama import mean_auc, mean_pooled, oof_probe, paired_bootstrap, split_halves

_TOKENIZER_PATCHES = 65_536  # as PAMA's tokenizer
_EPS = 1e-4  # rates' floor in the log ratio (a pair never seen in a patient)


# ------------------------------------------------------------------------------ geometry
def grid_edges(coords: np.ndarray) -> np.ndarray:
    """(E, 2) indices of patch pairs one grid step apart (right and down neighbours: each
    4-neighbour edge once): the package's edges, as PAMA's pairs readout and the tissue
    summary read them."""
    from oncoslide.features.neighbours import coordinate_edges

    return coordinate_edges(coords)


# ------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """k-means codes fitted on half A, with a spherical Gaussian mixture on top (shared
    variance, code shares) for posteriors, and the code co-occurrence of half A for the
    neighbour-denoised posteriors. Label-free."""

    def __init__(self, k: int, seed: int) -> None:
        self.k = k
        self.seed = seed

    def fit(self, slides: list[tuple[np.ndarray, np.ndarray]]) -> Tokenizer:
        import torch

        from oncoslide.pretrain.pama import fit_codebook

        gen = torch.Generator().manual_seed(int(self.seed) * 7919 + 104729)
        per = max(1, -(-_TOKENIZER_PATCHES // len(slides)))
        parts = []
        for feats, _ in slides:
            x = torch.from_numpy(feats)
            if x.shape[0] > per:
                x = x[torch.randperm(x.shape[0], generator=gen)[:per]]
            parts.append(x)
        x = torch.cat(parts)
        self.centres = fit_codebook(x, self.k, gen).double().numpy()
        xd = x.double().numpy()
        d2 = _sq_dist(xd, self.centres)
        assign = d2.argmin(1)
        # spherical shared variance per dimension and code shares of the hard assignment
        self.var = float(d2[np.arange(len(xd)), assign].mean() / xd.shape[1])
        self.log_prior = np.log(np.bincount(assign, minlength=self.k) / len(xd) + 1e-12)
        # co-occurrence of half A's soft codes over 4-neighbour edges -> pairwise potential
        co = np.zeros((self.k, self.k))
        for feats, coords in slides:
            r = self.posterior(feats)
            e = grid_edges(coords)
            co += r[e[:, 0]].T @ r[e[:, 1]]
        co = (co + co.T) / 2
        co /= co.sum()
        marg = co.sum(1)
        self.log_potential = np.log(co + 1e-12) - np.log(np.outer(marg, marg) + 1e-12)
        return self

    def loglik(self, feats: np.ndarray) -> np.ndarray:
        return -_sq_dist(feats.astype(np.float64), self.centres) / (2 * self.var)

    def posterior(self, feats: np.ndarray) -> np.ndarray:
        return _softmax(self.loglik(feats) + self.log_prior)

    def codes(self, feats: np.ndarray, kind: str, coords: np.ndarray) -> np.ndarray:
        """(N, K) code distribution per patch: hard, soft or mf (neighbour-denoised)."""
        if kind == "hard":
            return np.eye(self.k)[self.loglik(feats).argmax(1)]
        unary = self.loglik(feats) + self.log_prior
        q = _softmax(unary)
        if kind == "soft":
            return q
        if kind != "mf":
            raise ValueError(kind)
        e = grid_edges(coords)
        for _ in range(2):  # mean-field sweeps: log q_i = unary_i + sum_j q_j . log psi
            msg = np.zeros_like(unary)
            np.add.at(msg, e[:, 0], q[e[:, 1]] @ self.log_potential)
            np.add.at(msg, e[:, 1], q[e[:, 0]] @ self.log_potential)
            q = _softmax(unary + msg)
        return q


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :], 0.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


# ------------------------------------------------------------------------------ statistics
def cooccurrence(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """A patient's (K, K) symmetric edge co-occurrence (mean over its slides' edges) and its
    (K,) code shares, from per-slide (distributions (N, K), edges (E, 2))."""
    k = parts[0][0].shape[1]
    co = np.zeros((k, k))
    shares = np.zeros(k)
    n_edges = n_patches = 0
    for q, e in parts:
        co += q[e[:, 0]].T @ q[e[:, 1]]
        n_edges += len(e)
        shares += q.sum(0)
        n_patches += len(q)
    co = (co + co.T) / 2 / max(n_edges, 1)
    return co, shares / max(n_patches, 1)


def reduce(co: np.ndarray, shares: np.ndarray, how: str) -> np.ndarray:
    iu = np.triu_indices(co.shape[0])
    if how == "rates":
        return co[iu]
    # pointwise mutual information: co-occurrence beyond what the code shares predict
    return np.log(co[iu] + _EPS) - np.log(np.outer(shares, shares)[iu] + _EPS)


def pca_fit_transform(
    train: np.ndarray, other: np.ndarray, d: int
) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-9
    zt = (train - mu) / sd
    _, _, vt = np.linalg.svd(zt, full_matrices=False)
    basis = vt[:d].T
    return zt @ basis, ((other - mu) / sd) @ basis


# ------------------------------------------------------------------------------ the run
def load_world(
    sim: Path, shuffle: bool = False, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The cohort and every slide's (features, coords). ``shuffle``: each slide's coordinates
    permuted among its patches (the position ablation: same features, same cells, no
    arrangement)."""
    from oncoslide.features.readers import read_features

    cohort = pd.read_csv(sim / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    rng = np.random.default_rng([seed, 97])
    slides = {}
    for sid in cohort["slide_id"]:
        f = read_features(sim / "features" / f"{sid}.h5")
        coords = np.asarray(f.coords)
        if shuffle:
            coords = coords[rng.permutation(len(coords))]
        slides[str(sid)] = (np.asarray(f.features, dtype=np.float32), coords)
    return cohort, slides


def variant_names(ks: list[int], kinds: list[str], pca: int) -> list[str]:
    return [
        f"{kind}{k}-{how}" for k in ks for kind in kinds for how in ("rates", "pmi", f"pca{pca}")
    ]


def statistic_matrices(
    cohort: pd.DataFrame,
    slides: dict[str, tuple[np.ndarray, np.ndarray]],
    pre: list[str],
    probe_sets: dict[str, list[str]],
    variants: list[str],
    seed: int,
    truth: dict[str, np.ndarray] | None,
) -> dict[str, dict[str, np.ndarray]]:
    """{variant: {probe set name: (patients, d) matrix}} for label-free variants (and the
    truth-label ones when ``truth`` is given: variants named truth-rates / truth-pmi)."""
    by_patient = cohort.groupby("patient_id")["slide_id"].apply(lambda s: [str(x) for x in s])
    edges = {sid: grid_edges(c) for sid, (_, c) in slides.items()}
    pre_slides = [s for p in pre for s in by_patient[p]]
    out: dict[str, dict[str, np.ndarray]] = {}
    wanted: dict[tuple[int, str], set[str]] = {}
    for v in variants:
        head, how = v.split("-", 1)
        kind = head.rstrip("0123456789")
        wanted.setdefault((int(head[len(kind) :]), kind), set()).add(how)
    tokenizers: dict[int, Tokenizer] = {}
    for (k, kind), hows in sorted(wanted.items()):
        if k not in tokenizers:
            t0 = time.perf_counter()
            tokenizers[k] = Tokenizer(k, seed).fit([slides[s] for s in pre_slides])
            print(f"tokenizer K={k}: {time.perf_counter() - t0:.1f} s", flush=True)
        tok = tokenizers[k]
        needed = sorted({p for ps in probe_sets.values() for p in ps} | set(pre))
        dists = {
            s: tok.codes(slides[s][0], kind, slides[s][1]) for p in needed for s in by_patient[p]
        }
        stats = {p: cooccurrence([(dists[s], edges[s]) for s in by_patient[p]]) for p in needed}
        _fill(out, f"{kind}{k}", hows, stats, pre, probe_sets)
    if truth is not None:
        n_proto = int(max(int(v.max()) for v in truth.values())) + 1
        stats = {}
        for p in sorted({p for ps in probe_sets.values() for p in ps} | set(pre)):
            parts = [(np.eye(n_proto)[truth[s].astype(int)], edges[s]) for s in by_patient[p]]
            stats[p] = cooccurrence(parts)
        _fill(out, "truth", {"rates", "pmi"}, stats, pre, probe_sets)
    return out


def _fill(
    out: dict[str, dict[str, np.ndarray]],
    head: str,
    hows: set[str],
    stats: dict[str, tuple[np.ndarray, np.ndarray]],
    pre: list[str],
    probe_sets: dict[str, list[str]],
) -> None:
    for how in sorted(hows):
        base = "pmi" if how.startswith("pca") else how
        mats = {
            name: np.stack([reduce(*stats[p], base) for p in ps]) for name, ps in probe_sets.items()
        }
        if how.startswith("pca"):  # principal components of half A's patients (no label)
            train = np.stack([reduce(*stats[p], base) for p in pre])
            d = int(how[3:])
            mats = {name: pca_fit_transform(train, m, d)[1] for name, m in mats.items()}
        out[f"{head}-{how}"] = mats


def run_ceiling(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    sim = Path(args.sim) if args.sim else out / "spatial"
    if not (sim / "cohort.csv").exists():
        from oncoslide.simulate import (
            make_simulation_config,
            parse_assignments,
            simulate_cohort,
        )

        knobs = parse_assignments(args.set)
        print(f"simulating the spatial preset {knobs or '(seed 0)'} into {sim}", flush=True)
        simulate_cohort(sim, make_simulation_config("spatial", knobs))
    started = time.perf_counter()
    cohort, slides = load_world(sim, getattr(args, "shuffle", False), args.seed)
    pre, probe = split_halves(cohort, "inflamed", args.seed)
    label = cohort.groupby("patient_id")["inflamed"].first()
    ys = {"A": label.loc[pre].to_numpy().astype(int), "B": label.loc[probe].to_numpy().astype(int)}
    sets = {"A": pre, "B": probe}
    truth = None
    if not args.no_truth and (sim / "truth_patch_labels.npz").exists():
        z = np.load(sim / "truth_patch_labels.npz")
        truth = {k: z[k] for k in z.files}
    variants = args.variants or variant_names(args.k, args.kinds, args.pca)
    mats = statistic_matrices(cohort, slides, pre, sets, variants, args.seed, truth)
    if truth is not None and not getattr(
        args, "shuffle", False
    ):  # the simulator's readout (1 number per patient), for reference
        ratio = {
            str(p["patient_id"]): 1.0 if p["interface_ratio"] is None else p["interface_ratio"]
            for p in json.loads((sim / "truth.json").read_text())["patients"]
        }
        mats["truth-interface-ratio"] = {
            h: np.array([[float(ratio[p])] for p in ps]) for h, ps in sets.items()
        }
    features = sim / "features"
    mean = {h: mean_pooled(features, cohort, ps) for h, ps in sets.items()}
    probs: dict[str, dict[str, np.ndarray]] = {h: {} for h in sets}
    for h in sets:
        probs[h]["mean-pool"] = oof_probe(mean[h], ys[h], args.repeats)
        for name, m in mats.items():
            probs[h][name] = oof_probe(m[h], ys[h], args.repeats)
    rows = []
    for name in ["mean-pool", *mats]:
        rows.append(
            {
                "statistic": name,
                "label_free": not name.startswith("truth"),
                "dim": int(mean["A"].shape[1] if name == "mean-pool" else mats[name]["A"].shape[1]),
                "auc_A_dev": mean_auc(ys["A"], probs["A"][name]),
                "auc_B": mean_auc(ys["B"], probs["B"][name]),
            }
        )
    table = pd.DataFrame(rows)
    free = table[table["label_free"] & (table["statistic"] != "mean-pool")]
    chosen = str(free.sort_values("auc_A_dev", ascending=False).iloc[0]["statistic"])
    comparisons = []
    for name in [n for n in mats if n != "mean-pool"]:
        diff, lo, hi, p = paired_bootstrap(
            ys["B"], probs["B"][name], probs["B"]["mean-pool"], n_boot=args.n_boot
        )
        comparisons.append(
            {"statistic": name, "chosen_on_A": name == chosen, "auc_diff_B": diff, "lo": lo,
             "hi": hi, "p": p}
        )  # fmt: skip
    comp = pd.DataFrame(comparisons)
    print("\nAUC `inflamed` (A: development probe on half A's labels; B: the protocol)")
    print(table.round(3).to_string(index=False))
    print(f"\nchosen on half A (label-free): {chosen}")
    print("half B, vs mean pooling (patient bootstrap, two-sided p):")
    print(comp.round(4).to_string(index=False))
    return {
        "seed": args.seed,
        "world": list(args.set),
        "shuffle": bool(getattr(args, "shuffle", False)),
        "n_patients": {h: len(ps) for h, ps in sets.items()},
        "repeats": args.repeats,
        "chosen": chosen,
        "table": rows,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bench_pama_ceiling")
    parser.add_argument("--sim", default=None, help="an existing spatial world")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="halves, tokenizer")
    parser.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16])
    parser.add_argument(
        "--kinds", type=lambda s: [x for x in s.split(",") if x], default=["hard", "soft", "mf"]
    )
    parser.add_argument("--pca", type=int, default=8)
    parser.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x], default=None)
    parser.add_argument("--no-truth", action="store_true", help="skip the truth references")
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="position ablation: each slide's coordinates permuted among its patches",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_ceiling(args, out)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwritten {out / 'results.json'}")


if __name__ == "__main__":
    main()
