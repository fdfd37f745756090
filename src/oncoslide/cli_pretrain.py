"""``oncoslide pretrain <method>`` (slide-encoder pre-training) and ``oncoslide embed-slides``.

Registered in :mod:`oncoslide.cli`. Each method is a command of the ``pretrain`` sub-app
sharing the run options (:func:`_run_pretraining`); add a method's command below the PAMA one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import typer
from rich.markup import escape

from oncoslide.cli import _friendly, _PlainHelpGroup, _progress_view, _shown, console

pretrain_app = typer.Typer(
    help="Pre-train slide encoders on feature bags (label-free PAMA; more methods to come).",
    no_args_is_help=True,
    cls=_PlainHelpGroup,
)

# options every method shares (typer reads them from each command's signature)
_FEATURES = typer.Option(..., "--features", "-f", help="feature folder (one file per slide)")
_OUT = typer.Option(..., "--out", "-o", help="encoder folder to write (resumes a killed run)")
_COHORT = typer.Option(
    None, "--cohort", "-c", help="cohort table naming the slides to use [default: every file]"
)
_EPOCHS = typer.Option(30, "--epochs", help="passes over the slides")
_MAX_STEPS = typer.Option(None, "--max-steps", help="optimiser steps instead of --epochs")
_BATCH = typer.Option(8, "--batch-size", help="bags per optimiser step (per process)")
_MAX_PATCHES = typer.Option(2048, "--max-patches", help="patches sampled per bag in training")
_CKPT = typer.Option(50, "--checkpoint-every", help="full-state checkpoint every N steps")
_DEVICES = typer.Option(1, "--devices", help="processes (one per GPU, or CPU processes)")
_NODES = typer.Option(1, "--num-nodes", help="machines (Lightning multi-node)")
_SEED = typer.Option(0, "--seed", help="random seed (weights, masks, data order)")
_RESUME = typer.Option(True, "--resume/--no-resume", help="continue from --out's checkpoint")
_LR = typer.Option(1e-3, "--lr", help="peak learning rate (AdamW, warm-up then cosine)")
_PROBE = typer.Option(64, "--probe-size", help="bags whose embeddings' RankMe is logged")
_ACCEL = typer.Option("auto", "--accelerator", help="auto, cpu or gpu")
_THREADS = typer.Option(None, "--threads", help="torch CPU threads [default: usable cores]")
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="progress bars or lines")


@pretrain_app.command("pama")
@_friendly
def pretrain_pama(
    features: Path = _FEATURES,
    out: Path = _OUT,
    cohort: Path | None = _COHORT,
    epochs: int = _EPOCHS,
    max_steps: int | None = _MAX_STEPS,
    batch_size: int = _BATCH,
    max_patches: int = _MAX_PATCHES,
    checkpoint_every: int = _CKPT,
    devices: int = _DEVICES,
    num_nodes: int = _NODES,
    seed: int = _SEED,
    resume: bool = _RESUME,
    lr: float = _LR,
    probe_size: int = _PROBE,
    accelerator: str = _ACCEL,
    num_threads: int | None = _THREADS,
    progress: bool = _PROGRESS,
    width: int = typer.Option(64, "--width", help="token width (paper: 1024)"),
    depth: int = typer.Option(2, "--depth", help="encoder PACA blocks (paper: 4)"),
    heads: int = typer.Option(4, "--heads", help="attention heads (paper: 8)"),
    mlp_ratio: float = typer.Option(2.0, "--mlp-ratio", help="MLP width / token width (paper: 4)"),
    decoder_width: int = typer.Option(32, "--decoder-width", help="decoder width (paper: 512)"),
    decoder_depth: int = typer.Option(1, "--decoder-depth", help="decoder blocks (paper: 2)"),
    max_anchors: int = typer.Option(128, "--max-anchors", help="anchors per slide at most"),
    patches_per_anchor: int = typer.Option(
        18,
        "--patches-per-anchor",
        help="anchor density: N / this + 1 anchors per slide (the paper's 18; lower is denser)",
    ),
    recipe: str = typer.Option(
        "paper",
        "--recipe",
        help="named settings of the pretext and readout, overridden by the options given: "
        "paper (masked-feature MSE, 75 % masked, no local mixing, cls+mean) or codes (masked "
        "k-means codes, 50 %, --local-neighbours 8, cls+mean+pairs on codes: beats mean "
        "pooling on the spatial preset over four fresh worlds; docs/pretrain.md)",
    ),
    local_neighbours: int | None = typer.Option(
        None,
        "--local-neighbours",
        help="short-range mixing: each patch attends to its K nearest patches before each PACA "
        "block (0: off, the paper's encoder; 8: the 8-neighbourhood) [default: the recipe's]",
    ),
    pool: str | None = typer.Option(
        None,
        "--pool",
        help="slide embedding: cls+mean (the paper's), cls, mean, or cls+mean+pairs (adds the "
        "mean over 4-neighbour patch pairs of their tokens' products on label-free axes or "
        "codes) [default: the recipe's]",
    ),
    pair_readout: str | None = typer.Option(
        None,
        "--pair-readout",
        help="with --pool cls+mean+pairs: the tokens on 8 principal axes (axes) or their "
        "posterior over 16 k-means codes of the tokens (codes); both fitted without labels "
        "[default: the recipe's]",
    ),
    pair_dim: int | None = typer.Option(
        None, "--pair-dim", help="axes or codes of the pairs readout [default: 8 axes, 16 codes]"
    ),
    mask_ratio: float | None = typer.Option(
        None, "--mask-ratio", help="share of patches masked [default: the recipe's]"
    ),
    kro: bool = typer.Option(True, "--kro/--no-kro", help="kernel reorientation (ablation)"),
    anchor_dropout: float = typer.Option(0.2, "--anchor-dropout", help="0 ablates AD"),
    positions: str = typer.Option(
        "on", "--positions", help="on, off (ablation: no positions) or shuffled (ablation)"
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        help="what masked patches are predicted as: features (MSE, the paper's) or codes "
        "(cross-entropy on a label-free k-means tokenizer of the bags' patches) [default: the "
        "recipe's]",
    ),
    codebook_size: int = typer.Option(16, "--codebook-size", help="k-means codes (--target codes)"),
    masking: str = typer.Option(
        "patches", "--masking", help="mask patches at random (the paper's) or whole anchor regions"
    ),
) -> None:
    """Pre-train a PAMA slide encoder on unlabelled feature bags, one slide per bag."""
    from oncoslide.pretrain.pama import pama_recipe

    chosen = pama_recipe(recipe, target=target, mask_ratio=mask_ratio,
                         local_neighbours=local_neighbours, pool=pool,
                         pair_readout=pair_readout)  # fmt: skip
    _run_pretraining(
        "pama",
        dict(
            width=width,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            decoder_width=decoder_width,
            decoder_depth=decoder_depth,
            max_anchors=max_anchors,
            patches_per_anchor=patches_per_anchor,
            local_neighbours=chosen["local_neighbours"],
            pool=chosen["pool"],
            pair_readout=chosen["pair_readout"],
            pair_dim=(
                pair_dim
                if pair_dim is not None
                else (16 if chosen["pair_readout"] == "codes" else 8)
            ),
            mask_ratio=chosen["mask_ratio"],
            kro=kro,
            anchor_dropout=anchor_dropout,
            positions=positions,
            target=chosen["target"],
            codebook_size=codebook_size,
            masking=masking,
            lr=lr,
        ),
        features=features,
        out=out,
        cohort=cohort,
        per="slide",  # PAMA: each slide is its own coordinate frame
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        max_patches=max_patches,
        checkpoint_every=checkpoint_every,
        devices=devices,
        num_nodes=num_nodes,
        seed=seed,
        resume=resume,
        probe_size=probe_size,
        accelerator=accelerator,
        num_threads=num_threads,
        progress=progress,
    )


@pretrain_app.command("threads")
@_friendly
def pretrain_threads(
    features: Path = _FEATURES,
    out: Path = _OUT,
    cohort: Path = typer.Option(
        ..., "--cohort", "-c", help="cohort table of the PRE-TRAINING patients (never test ones)"
    ),
    omics: Path = typer.Option(..., "--omics", help="expression table (patient_id + genes)"),
    mutations: Path | None = typer.Option(
        None, "--mutations", help="0/1 mutation table (patient_id + genes)"
    ),
    epochs: int = _EPOCHS,
    max_steps: int | None = _MAX_STEPS,
    batch_size: int = typer.Option(
        32, "--batch-size", help="slides per step (per process): the InfoNCE negatives"
    ),
    max_patches: int = typer.Option(512, "--max-patches", help="patches sampled per slide"),
    checkpoint_every: int = _CKPT,
    devices: int = _DEVICES,
    num_nodes: int = _NODES,
    seed: int = _SEED,
    resume: bool = _RESUME,
    lr: float = _LR,
    probe_size: int = _PROBE,
    accelerator: str = _ACCEL,
    num_threads: int | None = _THREADS,
    progress: bool = _PROGRESS,
    embed_dim: int = typer.Option(128, "--embed-dim", help="slide embedding size (paper: 1024)"),
    hidden_dim: int = typer.Option(256, "--hidden-dim", help="patch projection width"),
    heads: int = typer.Option(4, "--heads", help="gated attention heads"),
    temperature: float = typer.Option(0.1, "--temperature", help="InfoNCE temperature (start)"),
    learn_temperature: bool = typer.Option(
        True, "--learn-temperature/--fixed-temperature", help="learn the temperature"
    ),
    mutation_weight: float = typer.Option(
        1.0, "--mutation-weight", help="weight of the mutation InfoNCE (expression: 1)"
    ),
) -> None:
    """Pre-train a Threads-style slide encoder contrastively against expression (and mutation)
    profiles; every slide of a patient pairs with the patient's profile."""
    from oncoslide.cohort.omics import load_omics
    from oncoslide.cohort.table import load_cohort
    from oncoslide.pretrain.threads import build_profiles, load_mutations

    ids = load_cohort(cohort, check_features=False).patient_ids
    profiles = build_profiles(
        ids, load_omics(omics), load_mutations(mutations) if mutations is not None else None
    )
    info = profiles.summary()
    left_out = len(ids) - len(profiles.usable)
    console.print(
        f"profiles: {info['with_expression']} of {len(ids)} patients with expression "
        f"({info['genes']} genes)"
        + (
            f", {info['with_mutations']} with mutations ({info['mutation_genes']} genes)"
            if "with_mutations" in info
            else ""
        )
        + (f"; {left_out} without any profile left out" if left_out else ""),
        highlight=False,
    )
    _run_pretraining(
        "threads",
        dict(
            **profiles.method_kwargs(),
            embed_dim=embed_dim,
            hidden_dim=hidden_dim,
            heads=heads,
            temperature=temperature,
            learn_temperature=learn_temperature,
            mutation_weight=mutation_weight,
            lr=lr,
        ),
        features=features,
        out=out,
        cohort=cohort,
        per="slide",  # items are slides, each paired with its patient's profile
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        max_patches=max_patches,
        checkpoint_every=checkpoint_every,
        devices=devices,
        num_nodes=num_nodes,
        seed=seed,
        resume=resume,
        probe_size=probe_size,
        accelerator=accelerator,
        num_threads=num_threads,
        progress=progress,
        extras=profiles.extras(),
        patients=profiles.usable,
    )


def _run_pretraining(
    method_name: str,
    method_kwargs: dict[str, Any],
    *,
    features: Path,
    out: Path,
    cohort: Path | None,
    per: Literal["slide", "patient"],
    epochs: int,
    max_steps: int | None,
    batch_size: int,
    max_patches: int,
    checkpoint_every: int,
    devices: int,
    num_nodes: int,
    seed: int,
    resume: bool,
    probe_size: int,
    accelerator: str,
    num_threads: int | None,
    progress: bool,
    extras: dict[str, Any] | None = None,
    patients: list[str] | None = None,
) -> None:
    """The run options every method shares: bags, seed, runner, the closing lines.
    ``patients``: only these patients of the cohort table become bags (Threads: those with a
    molecular profile)."""
    import lightning.pytorch as pl

    from oncoslide._threads import apply_num_threads
    from oncoslide.pretrain import PretrainBags, create_method, run_pretraining
    from oncoslide.training.progress import make_progress

    apply_num_threads(num_threads, workers=devices)
    table = None
    if cohort is not None:
        from oncoslide.cohort.table import load_cohort

        table = load_cohort(cohort, features)
        if patients is not None:
            table = table.subset([p for p in table.patient_ids if p in set(patients)])
    bags = PretrainBags.from_features(
        features,
        cohort=table,
        per=per,
        max_patches=max_patches,
        seed=seed,
        extras=extras,  # type: ignore[arg-type]
    )
    pl.seed_everything(seed, workers=True, verbose=False)
    method = create_method(method_name, in_dim=bags.feature_dim, **method_kwargs)
    n_params = sum(p.numel() for p in method.encoder.parameters())
    console.print(
        f"pre-training {escape(method_name)} on {len(bags)} bags from {escape(str(features))}: "
        f"encoder {n_params:,} parameters, embedding {method.encoder.embed_dim}",
        highlight=False,
    )
    view = _progress_view(progress)
    bar = make_progress(console, enabled=view == "bars")
    with bar, _shown(view):
        result = run_pretraining(
            method,
            bags,
            out,
            epochs=None if max_steps is not None else epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            checkpoint_every_n_steps=checkpoint_every,
            devices=devices,
            num_nodes=num_nodes,
            seed=seed,
            resume=resume,
            probe_size=probe_size,
            accelerator=accelerator,
            progress=bar if view == "bars" else None,
        )
    resumed = f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else ""
    console.print(
        f"[green]done[/]{resumed}: {result.steps} steps in {result.seconds:.0f} s, "
        f"{result.bags_per_second:.1f} bags/s; encoder of epoch {result.chosen_epoch} "
        f"(highest RankMe {result.rankme:.2f}) -> {escape(str(out))}/",
        highlight=False,
    )
    console.print(
        f"next: oncoslide embed-slides {escape(str(out))} --features {escape(str(features))} "
        "--out slide_emb/",
        highlight=False,
    )


@_friendly
def embed_slides_cmd(
    enc_dir: Path = typer.Argument(..., help="encoder folder (oncoslide pretrain ... --out)"),
    features: Path = typer.Option(..., "--features", "-f", help="feature folder"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for one embedding file per slide"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    num_threads: int | None = _THREADS,
    progress: bool = _PROGRESS,
) -> None:
    """Write one embedding per slide (a benchmark's level: slide feature set reads them)."""
    from oncoslide._threads import apply_num_threads
    from oncoslide.pretrain.embed import embed_slides
    from oncoslide.training.progress import make_progress

    apply_num_threads(num_threads)
    view = _progress_view(progress)
    bar = make_progress(console, enabled=view == "bars")
    with bar:
        task = bar.add_task("embedding slides", total=None)

        def advance(done: int, total: int, slide_id: str) -> None:
            bar.update(task, completed=done, total=total)

        result = embed_slides(enc_dir, features, out, device=device, on_slide=advance)
    console.print(
        f"[green]done[/]: {len(result.slide_ids)} slides ({result.written} embedded, "
        f"{result.skipped} already there), {result.embed_dim} dimensions -> "
        f"{escape(str(out))}/ (use it as a level: slide feature set)",
        highlight=False,
    )


__all__ = ["embed_slides_cmd", "pretrain_app"]
