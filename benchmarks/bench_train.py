"""Training throughput of 5-fold ABMIL survival: oncoslide vs a CLAM-style loop vs the bare rate.

Three ways to train the same ABMIL model on the same simulated cohort, timed in one process:

* **oncoslide**: ``cross_validate`` as users run it (feature files on disk, shared cache with
  background prefetch, minibatches of padded bags, Lightning), on a fixed schedule (no
  validation part, last checkpoint) so every run does the same number of steps.
* **reference**: the loop CLAM and Patho-Bench use: one bag per step, every feature file
  re-read from disk (h5py) each time a bag is used, discrete-time NLL loss.
* **bare**: the GEMM-bound rate of the same model and batch shapes on random in-memory bags:
  no data loading at all. On CPU ABMIL is compute-bound, so this is the ceiling.

It prints patches/s of each, the ratios, both cross-validated C-indices, how many times feature
files were read, and the peak resident memory of each phase (Linux: VmHWM, reset between
phases). A phase reruns oncoslide with a cache limit of a quarter of the features, to show
memory bounded by the cache rather than by the cohort; a last one trains a side-input model
(ABMIL that reconstructs the omics profile from its embedding, omics seen in training only: the
G-HANet / PathLUPI pattern) through the same path, to measure what side inputs and an auxiliary
loss cost the loop.

    python benchmarks/bench_train.py            # minutes on 2 CPU cores
    python benchmarks/bench_train.py --full     # 1,000 patients x 2,000 patches x 1536-d
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from oncoslide.cohort.splits import fold_parts
from oncoslide.cohort.table import load_cohort
from oncoslide.features.cache import FeatureCache
from oncoslide.models import create_model
from oncoslide.models.heads import discrete_risk
from oncoslide.simulate import SimulationConfig, simulate_cohort
from oncoslide.survival.bins import TimeBins
from oncoslide.survival.losses import cox_ph_loss, discrete_time_nll
from oncoslide.survival.metrics import concordance_index_censored
from oncoslide.training import cross_validate, make_config

# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux), so phases are separate."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- a side-input model


class OmicsGuidedABMIL(torch.nn.Module):
    """ABMIL plus a decoder from the bag embedding to the omics profile (training only)."""

    def __init__(self, in_dim: int, n_outputs: int, n_genes: int = 300) -> None:
        super().__init__()
        self.abmil = create_model("abmil", in_dim=in_dim, n_outputs=n_outputs)
        self.decoder = torch.nn.Linear(self.abmil.embed_dim, n_genes)
        self.in_dim, self.n_outputs, self.embed_dim = in_dim, n_outputs, self.abmil.embed_dim

    def forward(self, features, mask, coords=None, side=None):
        out = self.abmil(features, mask)
        if side is not None:
            present = side["omics_present"]
            error = ((self.decoder(out.embedding) - side["omics"]) ** 2).mean(dim=1)
            out.aux_losses["recon"] = error[present].mean() if present.any() else error.sum() * 0
        return out


def register_side_model() -> str:
    from oncoslide.models import MODELS

    name = "bench_omics_abmil"
    if name not in MODELS:
        MODELS.register(
            name, reference="benchmark", has_attention=True, uses_coords=False,
            side_inputs={"omics": "train"}, aux_losses={"recon": 0.3},
        )(OmicsGuidedABMIL)  # fmt: skip
    return name


# ----------------------------------------------------------------------------- phases


def train_patches(cohort, splits, epochs: int, max_patches: int | None) -> int:
    """Patches that pass through training steps over the whole CV run."""
    total = 0
    n = cohort.patients["n_patches"]
    for (seed, fold), _ in splits.groupby(["seed", "fold"]):
        ids = fold_parts(splits, seed, fold)["train"]
        counts = n.loc[ids].to_numpy()
        if max_patches is not None:
            counts = np.minimum(counts, max_patches)
        total += int(counts.sum())
    return total * epochs


def run_oncoslide(
    cohort, out: Path, epochs: int, cache_bytes: int | None, model: str = "abmil", side=None
) -> dict:
    cfg = make_config(
        task="survival", model=model, folds=5, epochs=epochs, val_fraction=0.0,
        checkpoint="last", early_stopping_patience=None, progress=False, n_boot=0,
        max_patches=None,
        model_kwargs={} if side is None else {"n_genes": len(side["omics"].genes)},
    )  # fmt: skip
    cache = FeatureCache(max_bytes=cache_bytes)
    reset_peak_rss()
    started = time.perf_counter()
    result = cross_validate(cohort, cfg, out, cache=cache, overwrite=True, side=side)
    seconds = time.perf_counter() - started
    stats = cache.stats
    cache.close()
    done = [json.loads(p.read_text()) for p in sorted(out.glob("folds/*/done.json"))]
    patches = sum(d["train_patches"] for d in done)
    fit_seconds = sum(d["fit_seconds"] for d in done)
    c_index = float(result.summary.set_index("metric").loc["c_index", "mean"])
    return {
        "seconds": seconds,
        "patches": patches,
        "rate": patches / fit_seconds,  # the training loop: loading, steps, Lightning
        "rate_end_to_end": patches / seconds,  # plus splits, predictions, metrics, files
        "c_index": c_index,
        "reads": stats.reads,
        "cache_peak_mb": stats.peak_bytes / 2**20,
        "peak_mb": peak_rss_mb(),
        "splits": result.splits,
    }


def run_reference(cohort, splits, epochs: int, seed: int = 0) -> dict:
    """One bag per step, the h5 file re-read every time (CLAM / Patho-Bench style)."""
    reset_peak_rss()
    started = time.perf_counter()
    patches, reads, c_indices, train_seconds = 0, 0, [], 0.0
    torch.manual_seed(seed)

    def read(pid: str) -> torch.Tensor:
        nonlocal reads
        parts = []
        for path in cohort.slide_paths(pid):
            with h5py.File(path, "r") as f:
                parts.append(torch.from_numpy(f["features"][:].astype(np.float32)))
            reads += 1
        return torch.cat(parts)

    for (s, fold), _ in splits.groupby(["seed", "fold"]):
        parts = fold_parts(splits, s, fold)
        train, test = parts["train"], parts["test"]
        y = cohort.survival(train)
        bins = TimeBins.quantile(y["time"], y["event"], n_bins=4)
        model = create_model("abmil", in_dim=cohort.feature_dim, n_outputs=len(bins.edges) - 1)
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
        bin_index = torch.as_tensor(bins.transform(y["time"]))
        event = torch.as_tensor(y["event"], dtype=torch.float32)
        rng = np.random.default_rng(seed + fold)
        model.train()
        fit_started = time.perf_counter()
        for _ in range(epochs):
            for i in rng.permutation(len(train)):
                x = read(train[i])[None]
                mask = torch.ones(x.shape[:2], dtype=torch.bool)
                out = model(x, mask)
                loss = discrete_time_nll(out.logits, bin_index[i : i + 1], event[i : i + 1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                patches += x.shape[1]
        train_seconds += time.perf_counter() - fit_started
        model.eval()
        with torch.no_grad():
            risk = []
            for pid in test:
                x = read(pid)[None]
                risk.append(
                    float(discrete_risk(model(x, torch.ones(x.shape[:2], dtype=torch.bool)).logits))
                )
        yt = cohort.survival(test)
        c_indices.append(concordance_index_censored(yt["event"], yt["time"], np.array(risk)).cindex)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "patches": patches,
        "rate": patches / train_seconds,
        "rate_end_to_end": patches / seconds,
        "c_index": float(np.mean(c_indices)),
        "reads": reads,
        "peak_mb": peak_rss_mb(),
    }


def run_bare(cohort, dim: int, batch_size: int = 8, steps: int = 60, seed: int = 0) -> dict:
    """Same model, same batch shapes, random bags already in memory: the compute ceiling."""
    rng = np.random.default_rng(seed)
    sizes = cohort.patients["n_patches"].to_numpy()
    model = create_model("abmil", in_dim=dim, n_outputs=1)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-5)
    batches = []
    for _ in range(min(steps, 16)):
        n = rng.choice(sizes, batch_size)
        x = torch.randn(batch_size, int(n.max()), dim)
        mask = torch.arange(int(n.max()))[None] < torch.as_tensor(n)[:, None]
        batches.append((x, mask, int(n.sum())))
    time_ = torch.rand(batch_size) * 1000
    event = torch.ones(batch_size)
    reset_peak_rss()

    def step(x, mask):
        out = model(x, mask)
        loss = cox_ph_loss(out.logits[:, 0], time_, event)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(*batches[0][:2])  # warm-up
    started, patches = time.perf_counter(), 0
    for k in range(steps):
        x, mask, n = batches[k % len(batches)]
        step(x, mask)
        patches += n
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "patches": patches,
        "rate": patches / seconds,
        "peak_mb": peak_rss_mb(),
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="1,000 patients x 2,000 patches x 1536-d"
    )
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--patches", type=int, default=400, help="median patches per slide")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--data", type=Path, default=None, help="reuse/keep the simulated cohort here"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.full:
        args.patients, args.patches, args.dim, args.epochs = 1000, 2000, 1536, 1

    data = args.data or Path(tempfile.mkdtemp(prefix="oncoslide-bench-"))
    if not (data / "cohort.csv").exists():
        print(
            f"simulating {args.patients} patients x ~{args.patches} patches x {args.dim}-d into {data} ..."
        )
        sim = SimulationConfig(
            n_patients=args.patients, feature_dim=args.dim, patches_median=args.patches,
            patches_min=max(4, args.patches // 4), patches_max=max(3000, 4 * args.patches),
            feature_dtype="float16",
        )  # fmt: skip
        simulate_cohort(data, sim)
    cohort = load_cohort(data / "cohort.csv", data / "features")
    feature_bytes = int(cohort.slides["n_patches"].sum()) * cohort.feature_dim * 2
    print(
        f"cohort: {len(cohort.patient_ids)} patients, {len(cohort.slides)} slides, "
        f"{int(cohort.slides['n_patches'].sum())} patches x {cohort.feature_dim}-d "
        f"({feature_bytes / 2**20:.0f} MiB as float16); torch threads: {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        # the ceiling is measured before and after the others and the faster kept: machine
        # noise then lowers our ratios rather than flattering them
        bare_first = run_bare(cohort, cohort.feature_dim)
        ours = run_oncoslide(cohort, Path(tmp) / "ours", args.epochs, cache_bytes=None)
        ref = run_reference(cohort, ours.pop("splits"), args.epochs)
        bare_last = run_bare(cohort, cohort.feature_dim, seed=1)
        bare = max(bare_first, bare_last, key=lambda r: r["rate"])
        limited = run_oncoslide(
            cohort, Path(tmp) / "limited", args.epochs, cache_bytes=feature_bytes // 4
        )
        limited.pop("splits")
        from oncoslide.cohort.omics import load_omics

        side = run_oncoslide(
            cohort, Path(tmp) / "side", args.epochs, cache_bytes=None,
            model=register_side_model(), side={"omics": load_omics(data / "omics.csv")},
        )  # fmt: skip
        side.pop("splits")

    rows = [("oncoslide", ours), ("reference (CLAM-style)", ref), ("bare GEMM rate", bare)]
    rows.append(("oncoslide, cache 1/4", limited))
    rows.append(("side-input model", side))
    header = ("", "train p/s", "e2e p/s", "C-index", "file reads", "cache MiB", "peak RSS MiB")
    print("\n{:24s} {:>10s} {:>10s} {:>8s} {:>10s} {:>10s} {:>12s}".format(*header))
    for name, r in rows:
        cells = (
            f"{r['rate']:.0f}",
            f"{r['rate_end_to_end']:.0f}" if "rate_end_to_end" in r else "-",
            f"{r['c_index']:.3f}" if "c_index" in r else "-",
            str(r.get("reads", "-")),
            f"{r['cache_peak_mb']:.0f}" if "cache_peak_mb" in r else "-",
            f"{r['peak_mb']:.0f}",
        )
        print("{:24s} {:>10s} {:>10s} {:>8s} {:>10s} {:>10s} {:>12s}".format(name, *cells))
    n_files = len(cohort.slides)
    print(
        f"\nbare rate: {bare_first['rate']:.0f} before, {bare_last['rate']:.0f} after (kept the faster)"
        f"\noncoslide / bare      = {ours['rate'] / bare['rate']:.2f}   training loop, features on disk"
        " (target >= 0.90: loading hidden)"
        f"\noncoslide / reference = {ours['rate'] / ref['rate']:.2f}   training loop"
        f" ({ours['rate_end_to_end'] / ref['rate_end_to_end']:.2f} end to end; target >= 1.00)"
        f"\nfeature files read by oncoslide: {ours['reads']} for {n_files} files "
        f"(target: each once per run); reference: {ref['reads']}"
        f"\nside-input model / bare = {side['rate'] / bare['rate']:.2f}   (omics in training "
        f"steps, a reconstruction loss; {side['rate'] / ours['rate']:.2f} of plain ABMIL's loop)"
        f"\ncache limited to {feature_bytes // 4 / 2**20:.0f} MiB: it held at most "
        f"{limited['cache_peak_mb']:.0f} MiB (unlimited: {ours['cache_peak_mb']:.0f} MiB), "
        f"{limited['reads']} reads"
    )
    if args.json:
        payload = {name: {k: v for k, v in r.items()} for name, r in [*rows, ("limited", limited)]}
        args.json.write_text(json.dumps(payload, indent=2))
    if args.data is None:
        import shutil

        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
