"""Issue 14's check on the `spatial` world (slow): frozen PAMA embeddings pre-trained without
labels against mean pooling, and without positions, in the frozen linear probe.

The protocol is benchmarks/bench_pama.py's (imported from there): pre-training on one half of the
patients (stratified by `inflamed`), probing on the other half in repeated patient-level 5-fold
CV (logistic C = 0.5, balanced), paired patient-level bootstrap of the AUC difference.

Measured (docs/pretrain.md): neither PAMA as specified (MSE on masked raw patch features) nor
the discrete-target option (cross-entropy on masked k-means codes, ``target="codes"``) beats
mean pooling here, nor does it with denser anchors (``patches_per_anchor=4``), nor with short-range patch mixing in the encoder
(``local_neighbours=8``, codes, 50 % masked, 30 epochs: positions now matter, full beats
positions off, but not mean pooling), nor with the second-order pairs readout on top of that
(``pool="cls+mean+pairs"``: +0.12 on worlds 0 and 1, -0.005 on world 2, the one named in
advance for confirmation; not a case here, as it passes on world 0, where it was developed),
nor with the pairs readout on token codes (``pair_readout="codes"``: +0.035, p 0.48, on world
3, named in advance; developed on worlds 0 and 2, so not a case here either);
the test states the requirement for each of these and
is marked as an expected failure until a method meets it (strict=False: it passes the day one
does).

Judged over worlds instead, the requirement holds: ``--recipe codes`` (codes, 50 % masked, 30
epochs, ``local_neighbours=8``, the pairs readout on token codes) beats mean pooling over four
fresh worlds named in advance (seeds 4-7, pooled: +0.114 AUC, p 0.0005) and shuffling the
coordinates removes the gain; the third test repeats that run (about 70 min on 2 CPU cores).

The features do carry the arrangement for a label-free statistic: the ceiling of
benchmarks/bench_pama_ceiling.py (4-neighbour co-occurrence of k-means codes fitted on half A,
no label, no pre-training) beats mean pooling in the same protocol on a world named in advance
(seed 1); the second test checks that, so the expected failure above is PAMA's, not the
preset's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

_REASONS = {
    "features": "measured 2026-12-01: PAMA's masked-feature MSE learns no more than the mean "
    "feature on the spatial world's noisy features; AUC 0.500 vs 0.550 (docs/pretrain.md)",
    "codes": "measured 2026-12-01: masked k-means codes are learnt (cross-entropy 2.77 -> 2.49) "
    "but the frozen embeddings stay at chance: AUC 0.517 vs 0.550 for mean pooling, p = 0.43; "
    "full vs positions off +0.028, p = 0.28 (world seed 1: 0.486 vs 0.446, p = 0.39); denser "
    "anchors (4 patches per anchor, 50 % masked) 0.511 vs 0.550, p = 0.36; while a label-free "
    "code co-occurrence statistic of the same features beats mean pooling (docs/pretrain.md)",
    "codes-local8": "measured 2026-12-01 (codes, 50 % masked, 30 epochs, local_neighbours=8): "
    "AUC 0.587 vs 0.550 for mean pooling, +0.036, p = 0.45 (world seed 1: 0.502 vs 0.446, "
    "p = 0.21); full vs positions off +0.080, p = 0.007 (seed 1 +0.095, p = 0.018): positions "
    "now matter, but the gain over mean pooling is not significant (re-run with the final "
    "neighbour lookup: 0.567, p = 0.70; docs/pretrain.md)",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(t, marks=pytest.mark.xfail(strict=False, reason=reason))
        for t, reason in _REASONS.items()
    ],
)
def test_pama_beats_mean_pooling_on_the_arrangement_task(
    tmp_path: Path, variant: str, benchmark_script: Callable[[str], ModuleType]
) -> None:
    import argparse

    bench = benchmark_script("bench_pama")
    local = variant == "codes-local8"  # the pre-specified local-mixing variant
    target = "codes" if local else variant
    args = argparse.Namespace(
        sim=None,
        variants=["full", "positions-off"],
        epochs=30 if local else 15,
        batch_size=8,
        max_patches=2048,
        repeats=5,
        n_boot=1000,
        seed=0,
        target=target,
        codebook_size=16,
        masking="patches",
        mask_ratio=0.5 if local else 0.75,
        local_neighbours=8 if local else 0,
        set=[],
    )
    result = bench.run_probe(args, tmp_path)
    comp = {(c["a"], c["b"]): c for c in result["comparisons"]}
    full = comp[("full", "mean-pool")]
    assert full["auc_diff"] > 0 and full["p"] < 0.05, full
    # without positions the gain is gone
    off = comp[("positions-off", "mean-pool")]
    assert off["p"] >= 0.05 or off["auc_diff"] <= 0, off
    assert comp[("full", "positions-off")]["auc_diff"] > 0


@pytest.mark.slow
def test_a_label_free_arrangement_statistic_beats_mean_pooling(
    tmp_path: Path, benchmark_script: Callable[[str], ModuleType]
) -> None:
    """The ceiling: on world seed 1 (a world no choice was made on), the two statistics named
    in advance from seed 0 (hard k-means codes' 4-neighbour pointwise mutual information, 16
    codes; soft codes' co-occurrence rates) beat mean pooling in the issue's protocol, and
    shuffling each slide's coordinates removes the gain. Measured 2026-12-01: +0.196 (p 0.001)
    and +0.129 (p 0.008) over mean pooling's 0.446; shuffled -0.010 (p 0.86), +0.043 (p 0.40)."""
    import argparse

    ceiling = benchmark_script("bench_pama_ceiling")
    args = argparse.Namespace(
        sim=None, set=["seed=1"], seed=0, k=[16], kinds=["hard", "soft"], pca=8,
        variants=["hard16-pmi", "soft16-rates"], no_truth=True, repeats=5, n_boot=1000,
        shuffle=False,
    )  # fmt: skip
    result = ceiling.run_ceiling(args, tmp_path)
    comp = {c["statistic"]: c for c in result["comparisons"]}
    assert set(comp) == {"hard16-pmi", "soft16-rates"}
    for name, c in comp.items():
        assert c["auc_diff_B"] > 0.05 and c["p"] < 0.05, (name, c)
    # the position ablation: the same world, each slide's coordinates shuffled
    args.sim, args.shuffle = str(tmp_path / "spatial"), True
    shuffled = ceiling.run_ceiling(args, tmp_path / "shuffled")
    for c in shuffled["comparisons"]:
        assert c["p"] >= 0.05 or c["auc_diff_B"] <= 0, c
        assert c["auc_diff_B"] < comp[c["statistic"]]["auc_diff_B"] - 0.05, c


def pooled_recipe_check(
    bench: ModuleType, pool: ModuleType, out: Path, seeds: list[int], epochs: int, n_boot: int
) -> dict[tuple[str, str], dict[str, float]]:
    """bench_pama's probe protocol with ``--recipe codes`` (variants full and shuffled) on each
    world ``seeds`` names, pooled by bench_pama_pooled: {(variant, baseline): summary}."""
    import argparse

    from oncoslide.pretrain.pama import PAMA_RECIPES

    recipe = PAMA_RECIPES["codes"]
    runs = []
    for seed in seeds:
        args = argparse.Namespace(
            sim=None, set=[f"seed={seed}"], variants=["full", "shuffled"], epochs=epochs,
            batch_size=8, max_patches=2048, repeats=5, n_boot=n_boot, seed=0, codebook_size=16,
            masking="patches", patches_per_anchor=18, max_anchors=128, probe_half="B",
            **recipe,
        )  # fmt: skip
        bench.run_probe(args, out / f"s{seed}")
        runs.append(out / f"s{seed}")
    pairs = [("full", "mean-pool"), ("full", "shuffled"), ("shuffled", "mean-pool")]
    return {(a, b): pool.pooled(runs, a, b, n_boot=n_boot, seed=0)[1] for a, b in pairs}


@pytest.mark.slow
def test_the_codes_recipe_beats_mean_pooling_over_four_fresh_worlds(
    tmp_path: Path, benchmark_script: Callable[[str], ModuleType]
) -> None:
    """Issue 14's check read over worlds (the plan of docs/pretrain.md, "Over fresh worlds"):
    worlds seeds 4-7, pooled patient bootstraps. Measured 2026-12-01: full - mean pooling
    +0.114 (0.070, 0.162), p 0.0005; full - shuffled +0.102, p 0.0005; shuffled - mean pooling
    +0.013, p 0.58."""
    bench = benchmark_script("bench_pama")
    pool = benchmark_script("bench_pama_pooled")
    got = pooled_recipe_check(bench, pool, tmp_path, [4, 5, 6, 7], epochs=30, n_boot=2000)
    gain = got[("full", "mean-pool")]
    assert gain["mean_diff"] > 0 and gain["p_value"] < 0.05, gain
    positions = got[("full", "shuffled")]
    assert positions["mean_diff"] > 0 and positions["p_value"] < 0.05, positions
    shuffled = got[("shuffled", "mean-pool")]
    assert shuffled["mean_diff"] <= 0 or shuffled["p_value"] >= 0.05, shuffled
