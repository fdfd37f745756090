"""The ``oncoslide`` command line. Library errors become messages and exit codes here only."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

from oncoslide.errors import OncoslideError

app = typer.Typer(
    name="oncoslide",
    help="Whole-slide images and patient tables to validated survival and molecular predictions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_INPUT = 2  # bad input or configuration: the message says what to fix

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """Turn the library's typed errors, and failed file operations (a full disk, a file where a
    folder should be), into a message on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_out_folder(kwargs.get("out"))
            return fn(*args, **kwargs)
        except OncoslideError as exc:
            _error(str(exc))
        except OSError as exc:  # not a bug to show a traceback for: the file system said no
            from oncoslide.errors import describe_os_error

            where = f"{exc.filename}: " if exc.filename else ""
            _error(f"{where}{describe_os_error(exc)}")
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]: finished work (folds, cells, slides) is kept; rerun the same command to resume"
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _error(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INPUT) from None


def _check_out_folder(out: object) -> None:
    """Every command's ``out`` is a folder: refuse a file there before any work is done."""
    if isinstance(out, Path) and out.exists() and not out.is_dir():
        from oncoslide.errors import ConfigError

        raise ConfigError(f"output folder {out} is a file, not a folder: name another folder")


# --------------------------------------------------------------------------------- simulate


@app.command()
@_friendly
def simulate(
    out: Path | None = typer.Argument(None, help="folder to write the cohort into"),
    preset: str = typer.Option(
        "demo", "--preset", "-p", help="named world (see --list-presets; docs/simulator.md)"
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="any knob, e.g. --set n_patients=400 --set omics_hidden=0.5"
    ),
    config_file: Path | None = typer.Option(
        None, "--config", help="YAML mapping of knobs (may name its own preset)"
    ),
    patients: int | None = typer.Option(None, "--patients", "-n", help="number of patients"),
    cohorts: int | None = typer.Option(None, "--cohorts", "-k", help="number of cancer types"),
    seed: int | None = typer.Option(None, "--seed", "-s"),
    dim: int | None = typer.Option(None, "--dim", help="feature dimension (<= 1536)"),
    patches: int | None = typer.Option(None, "--patches", help="median patches per slide"),
    dtype: str | None = typer.Option(None, "--dtype", help="feature storage: float16 or float32"),
    permuted_copy: bool = typer.Option(
        True, help="also write cohort_permuted.csv (outcomes shuffled across patients)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    list_presets: bool = typer.Option(False, "--list-presets", help="list the presets and exit"),
) -> None:
    """Simulate a cohort with planted, documented ground truth (truth.json).

    Settings apply in order: the preset, the --config file, --set, then the shortcut options.
    """
    from oncoslide.errors import ConfigError
    from oncoslide.simulate import (
        PRESETS,
        make_simulation_config,
        parse_assignments,
        run_simulation,
    )

    if list_presets:
        for p in PRESETS.values():
            console.print(f"[bold]{p.name}[/]: {p.description}", highlight=False)
        return
    if out is None:
        raise ConfigError("name the folder to write the cohort into: oncoslide simulate OUT")
    overrides = parse_assignments(settings)
    shortcuts = {
        "n_patients": patients,
        "n_cohorts": cohorts,
        "seed": seed,
        "feature_dim": dim,
        "feature_dtype": dtype,
    }
    overrides.update({k: v for k, v in shortcuts.items() if v is not None})
    if patches is not None:
        # keep the default spread around a smaller or larger median
        overrides.update(
            patches_median=patches,
            patches_min=min(40, max(4, patches // 4)),
            patches_max=max(3000, 4 * patches),
        )
    config = make_simulation_config(preset, overrides, config_file=config_file)
    result = run_simulation(
        out, config, overwrite=overwrite, permuted_copy=permuted_copy, console=console
    )
    _print_simulation(result)


def _print_simulation(result: Any) -> None:
    s = result.summary
    console.print(
        f"[green]simulated[/] {s.get('n_patients')} patients, {s.get('n_slides')} slides, "
        f"{s.get('n_patches')} patches in {result.out_dir} "
        f"({s.get('disk_mb')} MB, {s.get('seconds')} s)"
    )
    console.print(f"  cohort table  {result.cohort_table}")
    console.print(f"  features      {result.features_dir}")
    console.print(f"  omics         {result.omics_table} + {result.gene_groups.name}")
    for label, path in (("mutations", result.mutations_table), ("label tree", result.label_tree)):
        if path is not None:
            console.print(f"  {label:<13} {path}")
    console.print(f"  ground truth  {result.truth}")


# --------------------------------------------------------------------------------- validate


def _load_cohort(table: Path, features: Path | None, **kwargs: Any) -> Any:
    """load_cohort with a progress bar over the feature files it checks."""
    from oncoslide.cohort.table import load_cohort
    from oncoslide.training.progress import make_progress

    progress = make_progress(console, enabled=kwargs.pop("show_progress", True))
    with progress:
        task = progress.add_task("checking feature files", total=None)
        return load_cohort(
            table,
            features,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            **kwargs,
        )


@app.command()
@_friendly
def validate(
    cohort: Path = typer.Option(..., "--cohort", "-c", help="cohort table (CSV or Parquet)"),
    features: Path | None = typer.Option(None, "--features", "-f", help="feature folder"),
    omics: Path | None = typer.Option(None, "--omics", help="omics table keyed by patient_id"),
    gene_groups: Path | None = typer.Option(None, "--gene-groups", help="gene-group file"),
    stamp_mpp: float | None = typer.Option(None, help="µm/px for STAMP files without it"),
) -> None:
    """Check a cohort table (and its feature files, omics table) and report every problem."""
    c = _load_cohort(cohort, features, stamp_mpp=stamp_mpp)
    console.print(
        f"[green]ok[/] {len(c.patient_ids)} patients, {len(c.slides)} slides"
        + (f", feature dim {c.feature_dim}" if c.feature_dim else "")
    )
    for note in c.notes:
        console.print(f"  note: {note}")
    _print_empty_slides(c, "  note:")
    if omics is not None:
        from oncoslide.cohort.omics import load_omics

        o = load_omics(omics, gene_groups)
        console.print(
            f"[green]ok[/] omics: {len(o.values)} patients x {len(o.genes)} genes, "
            f"{len(o.groups)} groups"
        )


def _print_empty_slides(c: Any, prefix: str) -> None:
    """Name the slides with no patch: accepted (the patient has others) but worth knowing."""
    from oncoslide.cohort.bags import empty_slides_note

    note = empty_slides_note(c)
    if note:
        console.print(f"{prefix} {note}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------- train


def _read_config_file(path: Path) -> dict[str, Any]:
    from oncoslide._io import read_mapping_file

    data = read_mapping_file(path, "config file", "settings")
    return data.get("config", data) if "run_key" in data else data


# Options of `train` that are not TrainConfig fields, and aliases kept from earlier releases.
_TRAIN_ALIASES: dict[str, tuple[str, ...]] = {
    "task": ("-t",),
    "model": ("-m",),
    "survival_loss": ("--loss",),
    "n_bins": ("--bins",),
    "early_stopping_patience": ("--patience",),
    "batch_size": (),
}
# TrainConfig fields given another way on the command line
_TRAIN_SPECIAL = {"model_kwargs", "aux_weights", "freeze", "progress", "cache_dtype"}


def _config_option(name: str, field: Any) -> inspect.Parameter:
    """A typer option for one TrainConfig field (type, help and default from the model)."""
    import types
    import typing

    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        help_text = (field.description or "") + f" [{' | '.join(map(str, choices))}]"
        annotation = str
    else:
        help_text = field.description or ""
    flag = "--" + name.replace("_", "-")
    decls: tuple[str, ...] = (flag, *_TRAIN_ALIASES.get(name, ()))
    if annotation is bool:
        decls = (f"{flag}/--no-{name.replace('_', '-')}",)
    option = typer.Option(None, *decls, help=help_text.strip() or None, show_default=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation | None
    )


def _parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    """``key=value`` items (values read as YAML) into a mapping; every bad item reported."""
    from oncoslide.errors import ConfigError
    from oncoslide.simulate import parse_assignments

    try:
        return parse_assignments(items)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--set", what)) from None


def _train(
    *,
    cohort: Path,
    features: Path,
    out: Path,
    config: Path | None,
    splits: Path | None,
    overwrite: bool,
    skip_bad_features: bool,
    fit_all: bool,
    omics: Path | None,
    gene_groups: Path | None,
    mutations: Path | None,
    model_arg: list[str],
    aux_weight: list[str],
    freeze: list[str],
    cache_float16: bool | None,
    progress: bool,
    **fields: Any,
) -> None:
    """Cross-validate a MIL model (patient-level folds, validation carved from training), or
    with --fit-all train one model on every patient and write it as a model folder."""
    from oncoslide.cohort.splits import load_splits
    from oncoslide.training.config import make_config

    settings = _read_config_file(config) if config else {}
    settings.update({k: v for k, v in fields.items() if v is not None})
    if model_arg:
        settings["model_kwargs"] = {
            **settings.get("model_kwargs", {}),
            **_parse_assignments(model_arg, "--model-arg"),
        }
    if aux_weight:
        settings["aux_weights"] = {
            **settings.get("aux_weights", {}),
            **_parse_assignments(aux_weight, "--aux-weight"),
        }
    if freeze:
        settings["freeze"] = list(freeze)
    if cache_float16 is not None:
        settings["cache_dtype"] = "float16" if cache_float16 else "stored"
    settings["progress"] = progress
    if "task" not in settings:
        settings["task"] = "survival"
    cfg = make_config(**settings)
    side = _side_inputs(omics, gene_groups, mutations)
    started = time.perf_counter()
    c = _load_cohort(
        cohort,
        features,
        show_progress=progress,
        time_col=cfg.time_col,
        event_col=cfg.event_col,
        require_survival=cfg.is_survival,
        label_cols=() if cfg.is_survival else (cfg.task,),
        bad_features="drop" if skip_bad_features else "error",
    )
    if c.drop_note:
        console.print(f"[yellow]note:[/] {c.drop_note}")
    _print_empty_slides(c, "[yellow]note:[/]")
    if fit_all:
        from oncoslide.training.fit_all import fit_all as run_fit_all

        if splits is not None:
            from oncoslide.errors import ConfigError

            raise ConfigError("--fit-all trains on every patient: it takes no --splits")
        result = run_fit_all(c, cfg, out, overwrite=overwrite, console=console, side=side)
        _print_fit_all(result, time.perf_counter() - started)
        return
    given = load_splits(splits) if splits else None
    from oncoslide.training.cv import cross_validate  # imports Lightning: after the checks

    run = cross_validate(c, cfg, out, splits=given, overwrite=overwrite, console=console, side=side)
    print_run_summary(run, time.perf_counter() - started)


def _side_inputs(
    omics: Path | None, gene_groups: Path | None, mutations: Path | None
) -> dict[str, Any]:
    """Side-input tables named on the command line (every problem of each listed)."""
    from oncoslide.cohort.omics import load_omics
    from oncoslide.errors import ConfigError

    if gene_groups is not None and omics is None:
        raise ConfigError("--gene-groups describes the --omics table: give --omics too")
    side: dict[str, Any] = {}
    if omics is not None:
        side["omics"] = load_omics(omics, gene_groups)
    if mutations is not None:
        side["mutations"] = load_omics(mutations)
    return side


def _train_signature() -> inspect.Signature:
    from oncoslide.training.config import TrainConfig

    P = inspect.Parameter
    kw = P.KEYWORD_ONLY
    fixed = [
        P("cohort", kw, annotation=Path, default=typer.Option(..., "--cohort", "-c", help="cohort table (CSV or Parquet)")),
        P("features", kw, annotation=Path, default=typer.Option(..., "--features", "-f", help="folder of per-slide features")),
        P("out", kw, annotation=Path, default=typer.Option(..., "--out", "-o", help="run folder (a model folder with --fit-all)")),
        P("fit_all", kw, annotation=bool, default=typer.Option(False, "--fit-all", help="train one model on every patient (no test part) and write a model folder")),
        P("omics", kw, annotation=Path | None, default=typer.Option(None, "--omics", help="expression table keyed by patient_id, for models that use it")),
        P("gene_groups", kw, annotation=Path | None, default=typer.Option(None, "--gene-groups", help="gene groups of --omics: JSON, CSV or GMT")),
        P("mutations", kw, annotation=Path | None, default=typer.Option(None, "--mutations", help="0/1 mutation table keyed by patient_id")),
        P("model_arg", kw, annotation=list[str], default=typer.Option([], "--model-arg", help="model keyword, e.g. --model-arg hidden_dim=256 (repeatable)")),
        P("aux_weight", kw, annotation=list[str], default=typer.Option([], "--aux-weight", help="weight of a model's auxiliary loss, e.g. --aux-weight recon=0.3")),
        P("freeze", kw, annotation=list[str], default=typer.Option([], "--freeze", help="parameter group kept fixed with --init: encoder, projection, aggregator, head (repeatable)")),
        P("cache_float16", kw, annotation=bool | None, default=typer.Option(None, "--cache-float16/--cache-stored", help="hold features as float16 in memory")),
        P("config", kw, annotation=Path | None, default=typer.Option(None, "--config", help="YAML/JSON file of settings")),
        P("splits", kw, annotation=Path | None, default=typer.Option(None, "--splits", help="reuse a splits.csv")),
        P("overwrite", kw, annotation=bool, default=typer.Option(False, "--overwrite", help="replace another run in --out")),
        P("skip_bad_features", kw, annotation=bool, default=typer.Option(False, "--skip-bad-features", help="leave out slides whose feature file is missing, unreadable or empty (listed)")),
        P("progress", kw, annotation=bool, default=typer.Option(True, "--progress/--no-progress")),
    ]  # fmt: skip
    generated = [
        _config_option(name, field)
        for name, field in TrainConfig.model_fields.items()
        if name not in _TRAIN_SPECIAL
    ]
    return inspect.Signature(fixed + generated)


_train.__signature__ = _train_signature()  # type: ignore[attr-defined]
app.command("train")(_friendly(_train))


def _print_fit_all(result: Any, seconds: float) -> None:
    trained = result.model
    parts = result.splits["part"].value_counts().to_dict()
    console.print(
        f"[green]trained[/] {trained.name} · {trained.task.name} ({trained.task.kind}) on "
        f"{parts.get('train', 0)} patients, validation {parts.get('val', 0)}"
        + (" (already trained: nothing to do)" if result.resumed else f" in {seconds:.0f} s")
    )
    console.print(
        f"  model folder {result.out_dir} (model.json, weights.pt, patients.csv, history.csv); "
        f"apply it with `oncoslide predict {result.out_dir} --cohort ... --features ...`"
    )


def print_run_summary(result: Any, seconds: float | None = None) -> None:
    cfg, task = result.config, result.task
    title = f"{cfg.model} · {task.name} ({task.kind}) · {cfg.folds}-fold x {cfg.repeats} seed(s)"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("sd over folds", justify="right")
    for row in result.summary.itertuples():
        ci = "-" if row.n_boot == 0 else f"[{row.ci_lower:.3f}, {row.ci_upper:.3f}]"
        table.add_row(row.metric, f"{row.mean:.3f}", ci, f"{row.std:.3f}")
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    stats = result.cache_stats
    if stats:
        console.print(
            f"feature files read {stats.get('reads', '?')} time(s) for "
            f"{len(set(result.splits['patient_id']))} patients"
        )
    tail = f" in {seconds:.0f} s" if seconds is not None else ""
    console.print(
        f"[green]done[/]{tail}: {result.out_dir}/ (metrics.csv, predictions.parquet, splits.csv, summary.csv, config.json)"
    )


# --------------------------------------------------------------------------------- predict


@app.command()
@_friendly
def predict(
    model: Path = typer.Argument(..., help="a model folder, or a run folder with --fold"),
    cohort: Path = typer.Option(..., "--cohort", "-c", help="cohort table (CSV or Parquet)"),
    features: Path = typer.Option(..., "--features", "-f", help="folder of per-slide features"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for predictions and embeddings"),
    seed: int | None = typer.Option(None, "--seed", help="run folder: the seed (default: first)"),
    fold: int | None = typer.Option(None, "--fold", help="run folder: the fold's model"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="bags per forward pass"),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings"),
    skip_bad_features: bool = typer.Option(False, "--skip-bad-features"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    omics: Path | None = typer.Option(
        None, "--omics", help="expression table, for models that read omics at test time"
    ),
    gene_groups: Path | None = typer.Option(None, "--gene-groups", help="gene groups of --omics"),
) -> None:
    """Apply a trained model to a cohort: predictions, patient and slide embeddings."""
    from oncoslide.errors import ConfigError
    from oncoslide.training.model_folder import is_model_folder, load_model_folder
    from oncoslide.training.predict import predict_cohort
    from oncoslide.training.run_folder import RunFolder

    folder = model
    if not is_model_folder(model):
        run = RunFolder(model)
        run.check()
        if fold is None:
            raise ConfigError(f"{model} is a run folder: name the fold's model with --fold K")
        config, _ = run.read()
        folder = run.fold(config.seed if seed is None else seed, fold).model_dir
        if not is_model_folder(folder):
            raise ConfigError(f"{model} has no model for seed {seed} fold {fold} ({folder})")
    elif seed is not None or fold is not None:
        raise ConfigError("--seed and --fold name a fold of a run folder, not of a model folder")
    trained = load_model_folder(folder)
    task = trained.task
    columns = _table_columns(cohort)
    has_targets = (
        {task.time_col, task.event_col} <= columns if task.is_survival else task.name in columns
    )
    c = _load_cohort(
        cohort,
        features,
        show_progress=progress,
        time_col=task.time_col,
        event_col=task.event_col,
        label_cols=(task.name,) if has_targets and not task.is_survival else (),
        bad_features="drop" if skip_bad_features else "error",
    )
    side = _side_inputs(omics, gene_groups, None)
    result = predict_cohort(
        trained, c, out, batch_size=batch_size, embeddings=embeddings, side=side
    )
    console.print(
        f"[green]predicted[/] {len(result.predictions)} patients with {trained.name} "
        f"({task.name}) -> {out}/predictions.parquet"
    )
    if embeddings:
        console.print(
            f"  embeddings ({trained.model.embed_dim}-d): {result.patient_embeddings_dir}, "
            f"{result.slide_embeddings_dir} (slide-level feature files: a benchmark "
            "`level: slide` feature set reads them)"
        )
    if has_targets:
        _print_scores(result.predictions, task)


def _table_columns(path: Path) -> set[str]:
    import pandas as pd

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
        return set(pd.read_csv(path, nrows=0, sep="\t" if path.suffix == ".tsv" else ",").columns)
    except Exception:  # the cohort loader reports unreadable tables with every other problem
        return set()


def _print_scores(preds: Any, task: Any) -> None:
    """The cohort's metric when it has targets (Harrell's C, or the AUC)."""
    import numpy as np

    from oncoslide.evaluation.classification import roc_auc
    from oncoslide.survival.metrics import concordance_index_censored

    if task.is_survival:
        ok = preds["time"].notna() & preds["event"].notna()
        c = concordance_index_censored(
            preds.loc[ok, "event"].astype(bool), preds.loc[ok, "time"], preds.loc[ok, "risk"]
        ).cindex
        console.print(f"  Harrell's C on this cohort: {c:.3f} ({int(ok.sum())} patients)")
        return
    ok = preds["label"].notna()
    probs = np.column_stack([preds.loc[ok, f"prob_{k}"] for k in task.classes])
    auc = roc_auc(preds.loc[ok, "label"].astype(str), probs, classes=list(task.classes))
    console.print(f"  AUC on this cohort: {auc:.3f} ({int(ok.sum())} patients)")


# --------------------------------------------------------------------------------- extract


@app.command()
@_friendly
def extract(
    slides: Path = typer.Option(..., "--slides", "-s", help="folder of slides, or a CSV list"),
    out: Path = typer.Option(..., "--out", "-o", help="feature folder to write"),
    encoder: str = typer.Option(
        "efficientnet-lite0", "--encoder", "-e", help="see `oncoslide encoders`"
    ),
    weights: Path | None = typer.Option(None, "--weights", help="local weights for the encoder"),
    mpp: float = typer.Option(0.5, "--mpp", help="target µm per pixel of the patches"),
    patch_size: int = typer.Option(224, "--patch-size", help="patch side in pixels at --mpp"),
    overlap: int = typer.Option(0, "--overlap", help="overlap between patches, px at --mpp"),
    min_tissue: float = typer.Option(
        0.25, "--min-tissue", help="minimum tissue fraction per patch"
    ),
    mpp_override: float | None = typer.Option(
        None, "--mpp-override", help="level-0 µm/px for EVERY slide (for slides without metadata)"
    ),
    dtype: str = typer.Option("float32", "--dtype", help="feature storage: float32 or float16"),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int | None = typer.Option(
        None, "--workers", help="patch-reading processes per slide (default: by device and cores)"
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    backend: str = typer.Option("auto", "--backend", help="auto, openslide or tiffslide"),
    executor: str = typer.Option("local", "--executor", help="local, or ray for a Ray cluster"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address"),
    gpus_per_slide: float = typer.Option(
        0.0, "--gpus-per-slide", help="ray: GPUs each slide's task reserves (e.g. 1 or 0.5)"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Cut tissue into patches at a physical resolution and embed them: one feature file per slide."""
    from oncoslide.features.extract import (
        ExtractConfig,
        extract_slides,
        find_slides,
        settings_notes,
        summarise_manifest,
    )
    from oncoslide.training.progress import make_progress

    config = ExtractConfig(
        encoder=encoder, weights=None if weights is None else str(weights), target_mpp=mpp,
        patch_size=patch_size, overlap=overlap, min_tissue_fraction=min_tissue, dtype=dtype,  # type: ignore[arg-type]
        backend=backend, mpp_override=mpp_override, batch_size=batch_size,  # type: ignore[arg-type]
        num_workers=workers, device=device,
    )  # fmt: skip
    jobs = find_slides(slides)
    for note in settings_notes(config):
        console.print(f"[yellow]note:[/] {note}")
    started = time.perf_counter()
    bar = make_progress(console, enabled=progress)
    with bar:
        manifest = extract_slides(
            jobs,
            out,
            config,
            executor=cast(Literal["local", "ray"], executor),  # checked by extract_slides
            address=address,
            gpus_per_slide=gpus_per_slide,
            progress=bar,
        )
    counts = summarise_manifest(manifest)
    console.print(
        f"[green]extracted[/] {counts['done']} slide(s), skipped {counts['skipped']} already done, "
        f"{counts['no_tissue']} without tissue, [red]{counts['failed']} failed[/] "
        f"in {time.perf_counter() - started:.0f} s -> {out}/ (manifest.csv, thumbnails/, masks/)"
    )
    for row in manifest[manifest["status"] == "failed"].itertuples():
        err_console.print(f"[red]failed[/] {row.slide_id}: {row.error}", highlight=False)
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
@_friendly
def heatmap(
    run: Path = typer.Argument(..., help="run folder written by `oncoslide train`"),
    cohort: Path = typer.Option(..., "--cohort", "-c", help="the run's cohort table"),
    features: Path = typer.Option(..., "--features", "-f", help="the run's feature folder"),
    patient: list[str] = typer.Option(..., "--patient", "-p", help="patient id (repeatable)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the images and tables"),
    seed: int = typer.Option(0, "--seed", help="which seed's models"),
    fold: int | None = typer.Option(
        None, "--fold", help="default: the fold that held the patient out (out-of-fold)"
    ),
    slides: Path | None = typer.Option(
        None, "--slides", help="folder of the slide files (default: the path recorded by extract)"
    ),
    max_side: int = typer.Option(2048, "--max-side", help="image size (longer side, px)"),
    stamp_mpp: float | None = typer.Option(
        None, help="level-0 µm/px of the slides, for STAMP files that do not record it"
    ),
) -> None:
    """Draw a trained attention model's attention on a patient's slides (out-of-fold)."""
    from oncoslide.report.attention import attention_heatmaps, read_run

    config, _ = read_run(run)
    c = _load_cohort(
        cohort,
        features,
        time_col=config.time_col,
        event_col=config.event_col,
        label_cols=() if config.is_survival else (config.task,),
        stamp_mpp=stamp_mpp,
    )
    for pid in patient:
        result = attention_heatmaps(
            run,
            c,
            pid,
            out / pid,
            seed=seed,
            fold=fold,
            slides_dir=slides,
            max_side=max_side,
            stamp_mpp=stamp_mpp,
        )
        att = result.attention
        view = "out-of-fold" if att.out_of_fold else "[yellow]trained on this patient[/]"
        prediction = ", ".join(f"{k} {v:.3g}" for k, v in att.prediction.items())
        console.print(
            f"[green]{pid}[/]: seed {att.seed} fold {att.fold} ({view}), {len(att.table)} "
            f"patches, prediction {prediction} -> {out / pid}/ "
            f"({len(result.images)} image(s), attention.csv)"
        )
        for note in result.notes:
            console.print(f"[dim]note:[/] {note}")


@app.command("encoders")
def list_encoders_cmd(pattern: str = typer.Argument("*", help="fnmatch pattern")) -> None:
    """List the patch encoders and what each needs."""
    from oncoslide.encoders import encoder_info, list_encoders

    table = Table()
    for col in ("name", "dim", "input", "native µm/px", "needs"):
        table.add_column(col)
    for name in list_encoders(pattern):
        info = encoder_info(name)
        table.add_row(
            name, str(info.out_dim), str(info.input_size),
            "-" if info.native_mpp is None else str(info.native_mpp), info.weights_description,
        )  # fmt: skip
    console.print(table)


# --------------------------------------------------------------------------------- models


@app.command("models")
def list_models_cmd(pattern: str = typer.Argument("*", help="fnmatch pattern")) -> None:
    """List the registered MIL models."""
    from oncoslide.models import MODELS, list_models

    for name in list_models(pattern):
        meta = MODELS.metadata(name)
        desc = meta.get("description", "") if isinstance(meta, dict) else ""
        console.print(f"{name:14s} {desc}")


# --------------------------------------------------------------------------------- bench

bench_app = typer.Typer(
    help="Benchmarks: tasks x feature sets x models, a results store and a leaderboard.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("run")
@_friendly
def bench_run(
    spec: Path = typer.Argument(..., help="benchmark YAML (see docs/bench.md)"),
    out: Path = typer.Option(..., "--out", "-o", help="benchmark folder (results.sqlite, ...)"),
    executor: str = typer.Option("local", "--executor", help="local (processes) or ray"),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="local worker processes (0: in this process)"
    ),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address"),
    cache_gb: float = typer.Option(4.0, "--cache-gb", help="feature cache limit"),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        help="local: CUDA devices for the workers, e.g. 0,1 (default: all visible; none: CPU)",
    ),
    gpus_per_cell: float = typer.Option(
        0.0, "--gpus-per-cell", help="ray: GPUs each cell reserves (e.g. 1 or 0.5)"
    ),
) -> None:
    """Run the cells of a benchmark that its folder does not hold yet."""
    from oncoslide.bench.runner import run_benchmark
    from oncoslide.bench.spec import load_spec

    if executor not in ("local", "ray"):
        raise typer.BadParameter("use 'local' or 'ray'", param_hint="--executor")
    gpu_ids: list[int] | None = None
    if gpus is not None:
        try:
            gpu_ids = [] if gpus.strip() == "none" else [int(g) for g in gpus.split(",") if g]
        except ValueError:
            raise typer.BadParameter(
                "a comma-separated list of device numbers, or none", param_hint="--gpus"
            ) from None
    started = time.perf_counter()
    bench_spec = load_spec(spec)
    run = run_benchmark(
        bench_spec,
        out,
        executor=cast(Literal["local", "ray"], executor),
        workers=workers,
        address=address,
        cache_gb=cache_gb,
        gpus=gpu_ids,
        gpus_per_cell=gpus_per_cell,
        console=console,
    )
    for note in run.notes:
        console.print(f"[dim]note:[/] {note}")
    console.print(
        f"{run.n_cells} cells: {run.n_already_done} already done, {run.n_ran} run now, "
        f"{len(run.failures)} failed ({time.perf_counter() - started:.0f} s); "
        f"leaderboard: oncoslide bench leaderboard {out}"
    )
    if run.failures:
        err_console.print(f"[red]{len(run.failures)} cell(s) failed[/]: see {out / 'failures.csv'}")
        raise typer.Exit(1)


@bench_app.command("leaderboard")
@_friendly
def bench_leaderboard(
    folder: Path = typer.Argument(..., help="benchmark folder written by `bench run`"),
    html: Path | None = typer.Option(
        None, "--html", help="page to write (default FOLDER/index.html)"
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="tidy scores CSV (default beside the page)"
    ),
    n_boot: int | None = typer.Option(
        None, "--n-boot", help="bootstrap replicates (default: spec)"
    ),
) -> None:
    """Statistics and the static leaderboard page of a benchmark folder."""
    from oncoslide.bench.report import build_leaderboard, print_leaderboard

    board = build_leaderboard(folder, html=html, csv=csv, n_boot=n_boot)
    print_leaderboard(board, console)
    console.print(f"leaderboard: {board.html_path}  (scores: {board.csv_path})")


@bench_app.command("shuffle-features")
@_friendly
def bench_shuffle_features(
    cohort: Path = typer.Option(..., "--cohort", help="cohort table (one row per slide)"),
    features: Path = typer.Option(..., "--features", help="folder of feature files"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the shuffled feature set"),
    seed: int = typer.Option(0, "--seed", "-s"),
    copy: bool = typer.Option(False, "--copy", help="copy files instead of symbolic links"),
) -> None:
    """A negative-control feature set: each slide gets another patient's features."""
    from oncoslide.bench.shuffle import shuffle_features

    mapping = shuffle_features(cohort, features, out, seed=seed, copy=copy)
    console.print(
        f"{len(mapping)} slides shuffled across patients into {out} (map: shuffle_map.csv)"
    )


# --------------------------------------------------------------------------------- demo


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="a smaller cohort, fewer epochs"),
) -> None:
    """The main job on embedded data: simulate a cohort, cross-validate models, print results."""
    from oncoslide.demo import run_demo

    run_demo(out, quick=quick, console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------------- transfer

zoo_app = typer.Typer(
    help="A zoo of per-cancer survival models (CROPKT's off-the-shelf models).",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")
transfer_app = typer.Typer(
    help="Cross-cancer transfer: how each cancer's model does on the others.",
    no_args_is_help=True,
)
app.add_typer(transfer_app, name="transfer")


@zoo_app.command("train")
@_friendly
def zoo_train(
    cohort: Path = typer.Option(..., "--cohort", help="pan-cancer cohort table"),
    features: Path = typer.Option(..., "--features", help="feature folder"),
    out: Path = typer.Option(..., "--out", "-o", help="zoo folder"),
    by: str = typer.Option("cohort", "--by", help="patient-level column naming the cancer"),
    min_patients: int = typer.Option(200, "--min-patients", help="inclusion: patients"),
    min_event_rate: float = typer.Option(0.05, "--min-event-rate", help="inclusion: events/n"),
    config_file: Path | None = typer.Option(
        None, "--config", help="YAML/JSON training settings (docs/training.md)"
    ),
    model: str = typer.Option("abmil", "--model", "-m"),
    folds: int | None = typer.Option(None, "--folds"),
    epochs: int | None = typer.Option(None, "--epochs"),
    seed: int | None = typer.Option(None, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train one survival model per cancer that meets the inclusion rule."""
    from oncoslide.training import make_config
    from oncoslide.transfer import build_zoo

    settings: dict[str, Any] = _read_config_file(config_file) if config_file else {}
    settings.update({"task": "survival", "model": model, "progress": progress})
    for key, value in (("folds", folds), ("epochs", epochs), ("seed", seed)):
        if value is not None:
            settings[key] = value
    config = make_config(**settings)
    c = _load_cohort(cohort, features, show_progress=progress)
    zoo, notes = build_zoo(
        c,
        config,
        out,
        by=by,
        min_patients=min_patients,
        min_event_rate=min_event_rate,
        overwrite=overwrite,
        on_step=lambda cancer: console.print(f"training the {cancer} model"),
    )
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    _print_zoo(zoo)


@zoo_app.command("list")
@_friendly
def zoo_list(zoo_dir: Path = typer.Argument(..., help="zoo folder")) -> None:
    """The zoo's models: cancer, patients, events, encoder, CV C-index with interval."""
    from oncoslide.transfer import load_zoo

    _print_zoo(load_zoo(zoo_dir))


def _print_zoo(zoo: Any) -> None:
    from rich.table import Table

    table = Table(title=f"model zoo {zoo.path} (by {zoo.by}; encoder {zoo.contract.encoder})")
    for col in ("cancer", "patients", "events", "CV C-index [95% CI]"):
        table.add_column(col)
    for e in zoo.entries:
        table.add_row(
            e.cancer,
            str(e.n_patients),
            str(e.n_events),
            f"{e.c_index:.3f} [{e.lower:.2f}, {e.upper:.2f}]",
        )
    console.print(table)


@transfer_app.command("matrix")
@_friendly
def transfer_matrix_cmd(
    zoo_dir: Path = typer.Option(..., "--zoo", help="zoo folder (oncoslide zoo train)"),
    cohort: Path = typer.Option(..., "--cohort", help="cohort table with the target cancers"),
    features: Path = typer.Option(..., "--features", help="feature folder"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    n_boot: int = typer.Option(500, "--n-boot", help="bootstrap replicates per cell"),
) -> None:
    """Score every zoo model, unchanged, on every cancer's patients it never saw."""
    from oncoslide.transfer import load_zoo, transfer_matrix

    zoo = load_zoo(zoo_dir)
    c = _load_cohort(cohort, features)
    result = transfer_matrix(zoo, c, out, n_boot=n_boot)
    console.print(result.wide.round(3).to_string(), highlight=False)
    console.print(
        f"[green]written[/] {out / 'matrix.csv'}, {out / 'matrix.png'}, {out / 'index.html'}"
    )
