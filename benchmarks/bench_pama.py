"""PAMA on the `spatial` world: frozen label-free embeddings vs mean pooling, ablations, and
pre-training throughput / memory vs bag size and number of anchors.

Part 1 (``--part probe``). The `spatial` preset (untouched, seed 0: 400 patients; the
`inflamed` label and survival depend on where immune cells sit, composition does not) is split
once into two halves of patients, stratified by `inflamed` (seeded). Every PAMA variant is
pre-trained WITHOUT labels on the slides of half A only; the slides of half B are embedded
(``embed_slides``, one vector per slide, the mean over a patient's slides) and probed with the
frozen linear protocol of bench/protocols.py (standardised logistic regression, C = 0.5,
balanced) in patient-level stratified 5-fold CV, repeated over seeds. No patient of the probe
ever reached pre-training, and the probe never sees a label of its test fold. Mean pooling of
the patch features is probed identically (same folds). Paired test: patient-level bootstrap of
the difference in out-of-fold AUC (mean over repeats), two-sided.

Variants: full PAMA; positions off (no position reaches the model); shuffled coordinates; no
KRO; no anchor dropout. The encoder kept is chosen by RankMe (label-free), as the CLI does.
``--target codes`` (with ``--codebook-size``), ``--masking regions`` and ``--mask-ratio`` give
every variant that pretext (masked k-means codes, block masking); ``--patches-per-anchor``
(and ``--max-anchors``) the anchor density; ``--local-neighbours K`` the encoder's
short-range patch mixing (each patch attends to its K nearest patches; 0, off, the paper's);
``--set seed=1`` simulates another world of the
preset (to confirm a result on a world no choice was made on); ``--probe-half A`` probes the
pre-training half with its own labels instead (a development probe, for choosing settings
without touching half B; the pre-training is the same as the protocol's).
The label-free ceiling of these features (no pre-training) is benchmarks/bench_pama_ceiling.py.

Part 2 (``--part speed``). Synthetic bags (random 384-d features on a square patch grid) of
512 to 16,384 patches: one PAMA training step (forward + backward, 75 % masked) per bag size
at the default anchor rule, and one encoder forward over the whole bag at fixed anchor counts
(16 to 128): seconds, bags/s, peak memory (CUDA: max allocated; CPU: peak RSS growth of a
child process per measurement), and the attention time per (N x anchors) pair, which should
stay flat if the cost scales as N x anchors. ``--patches-per-anchor`` sets the training
step's anchor rule, ``--local-neighbours`` the encoder's local mixing (both parts);
``--no-speed-anchors`` measures the training steps only.

    python benchmarks/bench_pama.py --out out/pama                # both parts, ~40 min on 2 CPUs
    python benchmarks/bench_pama.py --part probe --epochs 20 --variants full,positions-off
    python benchmarks/bench_pama.py --part probe --epochs 15 --target codes --out out/pama-codes
    python benchmarks/bench_pama.py --part speed --device cuda
    python benchmarks/bench_pama.py --part probe --variants full --target codes --mask-ratio 0.5 \
        --epochs 30 --patches-per-anchor 4 --probe-half A --out out/pama-dense-dev
    python benchmarks/bench_pama.py --part speed --no-speed-anchors --sizes 300,2048 \
        --patches-per-anchor 4
    python benchmarks/bench_pama.py --part probe --variants full,positions-off,shuffled \
        --target codes --mask-ratio 0.5 --epochs 30 --local-neighbours 8 --out out/pama-local
    python benchmarks/bench_pama.py --part speed --no-speed-anchors --sizes 512,2048,8192 \
        --local-neighbours 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "positions-off": {"positions": "off"},
    "shuffled": {"positions": "shuffled"},
    "no-kro": {"kro": False},
    "no-ad": {"anchor_dropout": 0.0},
}


# ------------------------------------------------------------------------------ part 1
def split_halves(cohort: pd.DataFrame, label: str, seed: int) -> tuple[list[str], list[str]]:
    """Patients split in two halves stratified by ``label`` (pre-training, probe)."""
    patients = cohort.groupby("patient_id")[label].first()
    rng = np.random.default_rng([seed, 31])
    first: list[str] = []
    second: list[str] = []
    for _, ids in patients.groupby(patients):
        ids_list = sorted(map(str, ids.index))
        rng.shuffle(ids_list)
        half = len(ids_list) // 2
        first += ids_list[:half]
        second += ids_list[half:]
    return sorted(first), sorted(second)


def oof_probe(x: np.ndarray, y: np.ndarray, repeats: int, folds: int = 5) -> np.ndarray:
    """Out-of-fold probabilities (repeats, n): logistic C=0.5 balanced on standardised x."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros((repeats, len(y)))
    for r in range(repeats):
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=r)
        for train, test in cv.split(x, y):
            clf = make_pipeline(
                StandardScaler(), LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000)
            )
            clf.fit(x[train], y[train])
            out[r, test] = clf.predict_proba(x[test])[:, 1]
    return out


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties count one half), as sklearn's roc_auc_score."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def mean_auc(y: np.ndarray, probs: np.ndarray, rows: np.ndarray | None = None) -> float:
    rows = np.arange(len(y)) if rows is None else rows
    return float(np.mean([_auc(y[rows], p[rows]) for p in probs]))


def bootstrap_diffs(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> np.ndarray:
    """``n_boot`` patient-level bootstrap replicates of AUC(a) - AUC(b) (means over repeats);
    resamples holding one class only are drawn again."""
    rng = np.random.default_rng(seed)
    diffs: list[float] = []
    n = len(y)
    while len(diffs) < n_boot:
        rows = rng.integers(0, n, n)
        if len(np.unique(y[rows])) < 2:
            continue
        diffs.append(mean_auc(y, a, rows) - mean_auc(y, b, rows))
    return np.asarray(diffs)


def summarise_diffs(diff: float, d: np.ndarray) -> tuple[float, float, float, float]:
    """An observed difference with its replicates: (diff, 95 % interval, two-sided p)."""
    p = 2 * min(float((d <= 0).mean()), float((d >= 0).mean()))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return diff, float(lo), float(hi), min(1.0, max(p, 1.0 / len(d)))


def paired_bootstrap(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float, float]:
    """AUC(a) - AUC(b) (mean over repeats), its 95 % interval and a two-sided p-value from a
    patient-level bootstrap."""
    diff = mean_auc(y, a) - mean_auc(y, b)
    return summarise_diffs(diff, bootstrap_diffs(y, a, b, n_boot, seed))


def patient_matrix(emb_dir: Path, cohort: pd.DataFrame, patients: list[str]) -> np.ndarray:
    from oncoslide.features.slide_embeddings import load_slide_embeddings

    slides = cohort[cohort["patient_id"].isin(patients)]
    emb = load_slide_embeddings(emb_dir, slides["slide_id"].astype(str).tolist())
    by_patient = slides.groupby("patient_id")["slide_id"].apply(list)
    return np.stack([emb.vectors([str(s) for s in by_patient[p]]).mean(0) for p in patients])


def mean_pooled(features: Path, cohort: pd.DataFrame, patients: list[str]) -> np.ndarray:
    from oncoslide.features.readers import read_features

    rows = []
    for p in patients:
        ids = cohort.loc[cohort["patient_id"] == p, "slide_id"].astype(str)
        feats = np.concatenate([read_features(features / f"{s}.h5").features for s in ids])
        rows.append(feats.astype(np.float32).mean(0))
    return np.stack(rows)


def run_probe(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from oncoslide.pretrain import PretrainBags, create_method, run_pretraining
    from oncoslide.pretrain.embed import embed_slides

    sim = Path(args.sim) if args.sim else out / "spatial"
    if not (sim / "cohort.csv").exists():
        from oncoslide.simulate import (
            make_simulation_config,
            parse_assignments,
            simulate_cohort,
        )

        knobs = parse_assignments(getattr(args, "set", []))
        print(f"simulating the spatial preset {knobs or '(seed 0)'} into {sim}", flush=True)
        simulate_cohort(sim, make_simulation_config("spatial", knobs))
    cohort = pd.read_csv(sim / "cohort.csv", dtype={"patient_id": str, "slide_id": str})
    features = sim / "features"
    pre, probe = split_halves(cohort, "inflamed", args.seed)
    if getattr(args, "probe_half", "B") == "A":  # development probe: half A's own labels
        probe = pre
    y = cohort.groupby("patient_id")["inflamed"].first().loc[probe].to_numpy().astype(int)
    pre_slides = cohort.loc[cohort["patient_id"].isin(pre), "slide_id"].tolist()
    probe_slides = cohort.loc[cohort["patient_id"].isin(probe), "slide_id"].tolist()
    print(
        f"pre-training half: {len(pre)} patients ({len(pre_slides)} slides); probe half: "
        f"{len(probe)} patients ({len(probe_slides)} slides, {y.mean():.2f} inflamed)",
        flush=True,
    )
    probs: dict[str, np.ndarray] = {}
    pretrain_rows = []
    x_mean = mean_pooled(features, cohort, probe)
    probs["mean-pool"] = oof_probe(x_mean, y, args.repeats)
    print(f"mean pooling: AUC {mean_auc(y, probs['mean-pool']):.3f}", flush=True)
    target = getattr(args, "target", "features")
    for name in args.variants:
        kwargs = dict(VARIANTS[name])
        tag = name
        if target != "features":  # the pretext's target (every variant gets it)
            kwargs.update(target=target, codebook_size=getattr(args, "codebook_size", 16))
            tag = f"{name}-{target}"
        masking = getattr(args, "masking", "patches")
        if masking != "patches":
            kwargs.update(masking=masking)
            tag = f"{tag}-{masking}"
        mask_ratio = getattr(args, "mask_ratio", 0.75)
        if mask_ratio != 0.75:
            kwargs.update(mask_ratio=mask_ratio)
            tag = f"{tag}-m{round(100 * mask_ratio)}"
        per_anchor = getattr(args, "patches_per_anchor", 18)
        if per_anchor != 18:  # anchor density (the paper's rule: N / 18 + 1)
            kwargs.update(patches_per_anchor=per_anchor)
            tag = f"{tag}-ppa{per_anchor}"
        max_anchors = getattr(args, "max_anchors", 128)
        if max_anchors != 128:
            kwargs.update(max_anchors=max_anchors)
            tag = f"{tag}-k{max_anchors}"
        local = getattr(args, "local_neighbours", 0)
        if local:  # short-range patch mixing (the paper's encoder: 0, off)
            kwargs.update(local_neighbours=local)
            tag = f"{tag}-ln{local}"
        pool = getattr(args, "pool", "cls+mean")
        if pool != "cls+mean":  # the slide embedding's readout (the paper's: cls+mean)
            kwargs.update(pool=pool)
            tag = f"{tag}-pairs"
            readout = getattr(args, "pair_readout", "axes")
            if readout != "axes":  # the pairs readout on token codes (16) instead of 8 axes
                kwargs.update(pair_readout=readout, pair_dim=16)
                tag = f"{tag}-{readout}"
        if getattr(args, "probe_half", "B") == "A":
            tag = f"{tag}-devA"
        enc_dir, emb_dir = out / f"enc-{tag}", out / f"emb-{tag}"
        bags = PretrainBags.from_features(
            features, slide_ids=pre_slides, max_patches=args.max_patches, seed=args.seed
        )
        torch.manual_seed(args.seed)
        method = create_method("pama", in_dim=bags.feature_dim, **kwargs)
        result = run_pretraining(
            method,
            bags,
            enc_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
            checkpoint_every_n_steps=100,
            seed=args.seed,
            probe_size=64,
        )
        started = time.perf_counter()
        embed_slides(enc_dir, features, emb_dir, slide_ids=probe_slides)
        embed_s = time.perf_counter() - started
        x = patient_matrix(emb_dir, cohort, probe)
        probs[name] = oof_probe(x, y, args.repeats)
        auc = mean_auc(y, probs[name])
        pretrain_rows.append(
            {
                "variant": name,
                "auc": auc,
                "seconds": result.seconds,
                "bags_per_s": result.bags_per_second,
                "chosen_epoch": result.chosen_epoch,
                "rankme": result.rankme,
                "final_loss": result.history[-1]["loss"],
                "embed_seconds": embed_s,
            }
        )
        print(
            f"{name}: AUC {auc:.3f} (pre-training {result.seconds:.0f} s, "
            f"{result.bags_per_second:.1f} bags/s, epoch {result.chosen_epoch} by RankMe "
            f"{result.rankme:.2f}, final loss {result.history[-1]['loss']:.4f})",
            flush=True,
        )
    comparisons = []
    pairs = [(v, "mean-pool") for v in args.variants]
    if "full" in args.variants:
        pairs += [("full", v) for v in args.variants if v != "full"]
    for a, b in pairs:
        diff, lo, hi, p = paired_bootstrap(y, probs[a], probs[b], n_boot=args.n_boot)
        comparisons.append({"a": a, "b": b, "auc_diff": diff, "lo": lo, "hi": hi, "p": p})
    table = pd.DataFrame(comparisons)
    print("\npaired comparisons (AUC a - b, patient bootstrap, two-sided p):")
    print(table.round(4).to_string(index=False))
    aucs = {k: mean_auc(y, v) for k, v in probs.items()}
    # the probe's out-of-fold probabilities, for pooling worlds (bench_pama_pooled.py)
    np.savez(out / "probe.npz", patients=np.asarray(probe), y=y,
             **{f"probs_{k}": v for k, v in probs.items()})  # fmt: skip
    return {
        "n_pretrain_patients": len(pre),
        "n_probe_patients": len(probe),
        "repeats": args.repeats,
        "epochs": args.epochs,
        "seed": args.seed,
        "target": target,
        "masking": getattr(args, "masking", "patches"),
        "mask_ratio": getattr(args, "mask_ratio", 0.75),
        "patches_per_anchor": getattr(args, "patches_per_anchor", 18),
        "max_anchors": getattr(args, "max_anchors", 128),
        "local_neighbours": getattr(args, "local_neighbours", 0),
        "pool": getattr(args, "pool", "cls+mean"),
        "pair_readout": getattr(args, "pair_readout", "axes"),
        "probe_half": getattr(args, "probe_half", "B"),
        "auc": aucs,
        "pretraining": pretrain_rows,
        "comparisons": comparisons,
    }


# ------------------------------------------------------------------------------ part 2
def _grid_bag(n: int, dim: int, seed: int) -> tuple[Any, Any]:
    import torch

    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.from_numpy(xy * 448.0).float()


def measure_size(
    n: int,
    anchors: list[int],
    device: str,
    repeats: int,
    patches_per_anchor: int = 18,
    local_neighbours: int = 0,
) -> list[dict[str, Any]]:
    """Encoder forwards at each anchor count (ascending), then one training step (anchors by
    the rule N / ``patches_per_anchor`` + 1, at most 128), on one bag of ``n`` patches. Memory: CUDA max allocated per measurement; on CPU the growth of this
    process's peak RSS (a high-water mark: measurements run in increasing order of size)."""
    import resource

    import torch

    from oncoslide.pretrain import Bag, create_method
    from oncoslide.pretrain.pama import PAMAEncoder, kmeans_anchors, n_anchors

    torch.manual_seed(0)
    method = create_method(
        "pama", in_dim=384, patches_per_anchor=patches_per_anchor, local_neighbours=local_neighbours
    ).to(device)
    enc = method.encoder
    assert isinstance(enc, PAMAEncoder)
    feats, coords = _grid_bag(n, 384, 0)
    feats, coords = feats.to(device), coords.to(device)
    pos = coords / 448.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def peak() -> float:
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024

    rows = []
    for k in anchors:
        idx = kmeans_anchors(pos.cpu(), k).to(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for r in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                enc.pooled(enc.encode(feats, pos, pos[idx]))
            sync()
            if r > 0:  # the first run warms up
                times.append(time.perf_counter() - t0)
        rows.append(
            {"kind": "encoder", "n_patches": n, "anchors": int(idx.numel()),
             "seconds": float(np.median(times)), "peak_mb": peak()}
        )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(repeats + 1):
        bag = Bag(0, "b", "p", feats, coords, torch.zeros(n, dtype=torch.long))
        sync()
        t0 = time.perf_counter()
        loss = method.loss([bag], torch.Generator().manual_seed(r))
        loss.backward()
        method.zero_grad(set_to_none=True)
        sync()
        if r > 0:
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    rows.append(
        {"kind": "step", "n_patches": n, "anchors": n_anchors(n, 128, patches_per_anchor),
         "patches_per_anchor": patches_per_anchor, "local_neighbours": local_neighbours,
         "seconds": step,
         "bags_per_s": 1.0 / step, "peak_mb": peak()}
    )  # fmt: skip
    return rows


def run_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(x) for x in args.sizes.split(",")]
    anchors = [16, 32, 64, 128] if args.speed_anchors else []
    ppa = getattr(args, "patches_per_anchor", 18)
    local = getattr(args, "local_neighbours", 0)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        if args.device == "cuda":
            got = measure_size(n, anchors, "cuda", args.speed_repeats, ppa, local)
        else:  # a child per bag size: its peak RSS is its own
            code = (
                f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "from bench_pama import measure_size; "
                f"print(json.dumps(measure_size({n}, {anchors}, 'cpu', {args.speed_repeats}, {ppa}, {local})))"
            )
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            got = json.loads(res.stdout.strip().splitlines()[-1])
        rows += got
        for row in got:
            print(json.dumps(row), flush=True)
    fit: dict[str, Any] = {"kind": "fit"}
    if anchors:
        fit.update(_encoder_scaling(rows))
    steps = pd.DataFrame([r for r in rows if r["kind"] == "step"])
    print(f"\ntraining step (75 % masked, anchors min(128, N/{ppa} + 1)):")
    print(steps[["n_patches", "anchors", "seconds", "bags_per_s", "peak_mb"]].round(3)
          .to_string(index=False))  # fmt: skip
    return [*rows, fit]


def _encoder_scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Encoder forwards vs N x anchors: the table and the log-log slopes."""
    enc = pd.DataFrame([r for r in rows if r["kind"] == "encoder"])
    enc["pairs"] = enc["n_patches"] * enc["anchors"]
    enc["us_per_1k_pairs"] = enc["seconds"] / enc["pairs"] * 1e9
    # slope of log(time) on log(N x K): 1 when the cost scales as N x anchors; below 1 while
    # the parts linear in N alone (patch embedding, MLPs) dominate
    slope = float(np.polyfit(np.log(enc["pairs"]), np.log(enc["seconds"]), 1)[0])
    by_k = {}
    for n, part in enc.groupby("n_patches"):
        if len(part) > 1:  # at fixed N: time vs anchors
            by_k[int(n)] = float(np.polyfit(np.log(part["anchors"]), np.log(part["seconds"]), 1)[0])
    print("\nencoder forward (whole bag) vs N x anchors:")
    print(enc[["n_patches", "anchors", "seconds", "us_per_1k_pairs", "peak_mb"]]
          .round(4).to_string(index=False))  # fmt: skip
    print(f"log-log slope of time on N x anchors: {slope:.2f}; on anchors at fixed N: {by_k}")
    return {"slope_pairs": slope, "slope_anchors_at_n": by_k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bench_pama")
    parser.add_argument("--part", choices=["probe", "speed", "both"], default="both")
    parser.add_argument("--sim", default=None, help="an existing spatial world")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-patches", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target",
        choices=["features", "codes"],
        default="features",
        help="PAMA's pretext target: masked features (MSE, the paper's) or k-means codes (CE)",
    )
    parser.add_argument("--codebook-size", type=int, default=16)
    parser.add_argument(
        "--masking",
        choices=["patches", "regions"],
        default="patches",
        help="mask patches at random (the paper's) or whole anchor regions (block masking)",
    )
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument(
        "--patches-per-anchor",
        type=int,
        default=18,
        help="anchor density: N / this + 1 anchors per slide (the paper's 18)",
    )
    parser.add_argument("--max-anchors", type=int, default=128)
    parser.add_argument(
        "--local-neighbours",
        type=int,
        default=0,
        help="short-range mixing: each patch attends to its K nearest patches before each "
        "PACA block (0: off, the paper's encoder; 8: the 8-neighbourhood)",
    )
    parser.add_argument(
        "--pool",
        choices=["cls+mean", "cls+mean+pairs"],
        default="cls+mean",
        help="the slide embedding: CLS + mean token (the paper's) or + the 4-neighbour pairs "
        "readout (second-order, 8 label-free axes)",
    )
    parser.add_argument(
        "--pair-readout",
        choices=["axes", "codes"],
        default="axes",
        help="with --pool cls+mean+pairs: the tokens on 8 principal axes, or their posterior "
        "over 16 label-free k-means codes of the tokens",
    )
    parser.add_argument(
        "--probe-half",
        choices=["A", "B"],
        default="B",
        help="B: the protocol (probe the held-out half); A: development probe on the "
        "pre-training half's own labels (for choosing settings without touching half B)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="simulator knob of the spatial world (e.g. seed=1: another world of the preset)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192,16384")
    parser.add_argument(
        "--no-speed-anchors",
        dest="speed_anchors",
        action="store_false",
        help="speed part: training steps only (skip the encoder forwards at 16-128 anchors)",
    )
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.part in ("probe", "both"):
        results["probe"] = run_probe(args, out)
    if args.part in ("speed", "both"):
        results["speed"] = run_speed(args)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwritten {out / 'results.json'}")


if __name__ == "__main__":
    main()
