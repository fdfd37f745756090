"""The ``oncoslide`` command line. Library errors become messages and exit codes here only."""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from oncoslide.errors import OncoslideError


def _plain_help(command: Any) -> Any:
    """Make a command's help texts plain text, once. Typer renders them as rich markup, which
    drops anything in square brackets that looks like a tag: `pip install 'oncoslide[timm]'`,
    "[cox | nll]", "[default: paths.slides]"."""
    if getattr(command, "_plain_help", False):
        return command
    for attr in ("help", "short_help", "epilog"):
        text = getattr(command, attr, None)
        if isinstance(text, str):
            setattr(command, attr, escape(text))
    for param in command.params:
        text = getattr(param, "help", None)
        if isinstance(text, str):
            param.help = escape(text)
    command._plain_help = True
    return command


class _PlainHelpGroup(TyperGroup):
    """A command group whose commands' help texts are plain text (see ``_plain_help``)."""

    # (typer's own copy of click types the arguments: Any keeps this file off its private modules)
    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else _plain_help(command)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_help(self)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="oncoslide",
    help="Whole-slide images and patient tables to validated survival and molecular predictions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_PlainHelpGroup,
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
    # the message is the library's text, file names included: printed as it is, never as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INPUT) from None


def _show_version(value: bool) -> None:
    if value:
        from oncoslide import __version__

        console.print(f"oncoslide {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_show_version,
        help="print the version and exit",
    ),
) -> None:
    """Whole-slide images and patient tables to validated survival and molecular predictions."""


def _check_out_folder(out: object) -> None:
    """Every command's ``out`` is a folder: refuse a file there before any work is done."""
    if isinstance(out, Path) and out.exists() and not out.is_dir():
        from oncoslide.errors import ConfigError

        raise ConfigError(f"output folder {out} is a file, not a folder: name another folder")


# Progress views of long commands (train, bench run, zoo train, extract).
ProgressView = Literal["bars", "lines", "none"]


def _progress_view(progress: bool) -> ProgressView:
    """Rich bars on a terminal; plain lines (one per epoch, fold, benchmark cell or slide,
    timestamped and flushed at once) when the output is a file or a pipe (a batch scheduler's
    log, ``> log 2>&1``), where bars would print nothing until the end; neither with
    --no-progress. The output folder's run.log has the lines in every view."""
    if not progress:
        return "none"
    # both must agree: FORCE_COLOR makes rich treat a file as a terminal, and bars drawn into a
    # file are a screenful of control codes that say nothing until the end
    isatty = getattr(console.file, "isatty", None)
    terminal = console.is_terminal and callable(isatty) and bool(isatty())
    return "bars" if terminal else "lines"


@contextlib.contextmanager
def _shown(view: ProgressView) -> Iterator[None]:
    """Show the library's progress records as plain lines on stdout in the "lines" view."""
    if view != "lines":
        yield
        return
    from oncoslide._log import console_lines

    with console_lines(console.file):
        yield


# --------------------------------------------------------------------------------- study

_CONFIG_HELP = "study file (oncoslide init) for the paths and settings not given here"


def _study(config: Path | None) -> Any:
    """The study file given with --config; without one, an empty study (names nothing)."""
    from oncoslide.study import Study, load_study

    return load_study(config) if config is not None else Study()


def _given(ctx: typer.Context | None, name: str) -> bool:
    """Whether option ``name`` was typed on the command line rather than left at its default
    (without a command line, e.g. a call from Python, every value counts as given)."""
    source = None if ctx is None else ctx.get_parameter_source(name)
    return source is None or source.name not in ("DEFAULT", "DEFAULT_MAP")


def _pick(ctx: typer.Context | None, name: str, value: Any, from_study: Any) -> Any:
    """The command line's value when given there, else the study's, else the default."""
    return value if _given(ctx, name) or from_study is None else from_study


def _need(value: Path | None, option: str, study: Any, key: str) -> Path:
    """A path the command cannot do without: the option's, else the study's ``paths.<key>``."""
    from oncoslide.errors import ConfigError

    if value is not None:
        return value
    found: Path | None = study.path(key)
    if found is not None:
        return found
    raise ConfigError(_missing(option, study, key))


def _missing(option: str, study: Any, key: str) -> str:
    if study.source is not None:
        return f"give {option}: {study.source} names no paths.{key}"
    return f"give {option}, or a study file naming paths.{key} with --config"


def _optional(value: Path | None, study: Any, key: str) -> Path | None:
    return value if value is not None else study.path(key)


def _output(value: Path | None, option: str, study: Any, key: str) -> Path:
    """An output folder: the option's, else the study's ``paths.<key>``."""
    from oncoslide._io import check_folder_target
    from oncoslide.errors import ConfigError

    if value is not None:
        return value
    found: Path | None = getattr(study.paths, key)
    if found is None:
        raise ConfigError(_missing(option, study, key))
    return check_folder_target(found)


# --------------------------------------------------------------------------------- init


@app.command()
@_friendly
def init(
    folder: Path = typer.Argument(
        Path("."), help="study folder (study.yaml is written in it), or the .yaml file to write"
    ),
    slides: Path | None = typer.Option(None, "--slides", "-s", help="folder of the slides"),
    features: Path | None = typer.Option(None, "--features", "-f", help="feature folder"),
    cohort: Path | None = typer.Option(None, "--cohort", "-c", help="cohort table"),
    omics: Path | None = typer.Option(None, "--omics", help="omics table"),
    gene_groups: Path | None = typer.Option(None, "--gene-groups", help="gene groups of omics"),
    mutations: Path | None = typer.Option(None, "--mutations", help="mutation table"),
    runs: Path | None = typer.Option(None, "--runs", help="folder for the training runs"),
    encoder: str | None = typer.Option(None, "--encoder", "-e", help="patch encoder"),
    task: list[str] = typer.Option(
        [], "--task", "-t", help="survival or a label column (repeatable: a run each)"
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="MIL model"),
    force: bool = typer.Option(False, "--force", help="replace an existing study file"),
) -> None:
    """Write a commented study.yaml: the study's slides, features, tables, encoder, tasks and
    output folders. Then every command takes --config study.yaml (the command line wins).

    Paths given here are relative to the current folder; the file holds them relative to its
    own folder when inside it.
    """
    from oncoslide.study import INPUT_PATHS, load_study, write_study

    paths = {
        "slides": slides, "features": features, "cohort": cohort, "omics": omics,
        "gene_groups": gene_groups, "mutations": mutations, "runs": runs,
    }  # fmt: skip
    file = write_study(
        folder,
        force=force,
        paths=paths,
        extract={"encoder": encoder} if encoder else None,
        tasks=task,
        train={"model": model} if model else None,
    )
    study = load_study(file)  # what the commands will read
    console.print(
        f"[green]wrote[/] {escape(str(file))}: check its paths, then e.g.", highlight=False
    )
    for command in ("extract", "validate", "train"):
        console.print(f"  oncoslide {command} --config {escape(str(file))}", highlight=False)
    absent = [
        f"{key} ({value})"
        for key in INPUT_PATHS
        if (value := getattr(study.paths, key)) is not None and not value.exists()
    ]
    if absent:
        console.print(f"[dim]note:[/] not there yet: {escape(', '.join(absent))}", highlight=False)


# --------------------------------------------------------------------------------- simulate


@app.command()
@_friendly
def simulate(
    ctx: typer.Context,
    out: Path | None = typer.Argument(None, help="folder to write the cohort into"),
    preset: str = typer.Option(
        "demo", "--preset", "-p", help="named world (see --list-presets; docs/simulator.md)"
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="any knob, e.g. --set n_patients=400 --set omics_hidden=0.5"
    ),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="YAML mapping of knobs (may name its own preset), or a study file: its simulate "
        "section, and OUT where its paths.cohort and paths.features are",
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
    from oncoslide.study import is_study_file

    if list_presets:
        for p in PRESETS.values():
            console.print(f"[bold]{escape(p.name)}[/]: {escape(p.description)}", highlight=False)
        return
    knobs: dict[str, Any] = {}
    if config_file is not None and is_study_file(config_file):
        study = _study(config_file)
        knobs = dict(study.simulate)
        study_preset = knobs.pop("preset", None)
        preset = str(_pick(ctx, "preset", preset, study_preset))
        out = out or _simulated_folder(study)
        config_file = None
    if out is None:
        raise ConfigError("name the folder to write the cohort into: oncoslide simulate OUT")
    overrides = {**knobs, **parse_assignments(settings)}
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


def _simulated_folder(study: Any) -> Path:
    """Where `simulate --config study.yaml` writes: the folder of the study's cohort table,
    when the study names the paths a simulation writes there (cohort.csv, features/)."""
    from oncoslide.errors import ConfigError

    cohort, features = study.paths.cohort, study.paths.features
    if cohort is None:
        raise ConfigError(f"name the folder to write the cohort into: {study.source} names no "
                          "paths.cohort")  # fmt: skip
    if cohort.name != "cohort.csv" or features != cohort.parent / "features":
        raise ConfigError(
            f"simulate writes OUT/cohort.csv and OUT/features/, but {study.source} names "
            f"paths.cohort {cohort} and paths.features {features}: name the folder OUT"
        )
    return cohort.parent


def _print_simulation(result: Any) -> None:
    s = result.summary
    console.print(
        f"[green]simulated[/] {s.get('n_patients')} patients, {s.get('n_slides')} slides, "
        f"{s.get('n_patches')} patches in {escape(str(result.out_dir))} "
        f"({s.get('disk_mb')} MB, {s.get('seconds')} s)"
    )
    omics = f"{result.omics_table} + {result.gene_groups.name}"
    rows = [("cohort table", result.cohort_table), ("features", result.features_dir)]
    rows += [("omics", omics), ("mutations", result.mutations_table)]
    rows += [("label tree", result.label_tree), ("ground truth", result.truth)]
    for label, path in rows:
        if path is not None:
            console.print(f"  {label:<13} {escape(str(path))}", highlight=False)


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
    cohort: Path | None = typer.Option(
        None, "--cohort", "-c", help="cohort table (CSV or Parquet) [default: paths.cohort]"
    ),
    features: Path | None = typer.Option(None, "--features", "-f", help="feature folder"),
    omics: Path | None = typer.Option(None, "--omics", help="omics table keyed by patient_id"),
    gene_groups: Path | None = typer.Option(None, "--gene-groups", help="gene-group file"),
    stamp_mpp: float | None = typer.Option(None, help="µm/px for STAMP files without it"),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    task: list[str] = typer.Option(
        [],
        "--task",
        "-t",
        help="survival or a label column (repeatable): its columns are checked and its events "
        "or classes summarised [default: the study's tasks]",
    ),
) -> None:
    """Check a cohort table (and its feature files, omics table) and report every problem.

    With --config study.yaml, also the columns of the study's training tasks. Ends with a
    summary: patients, events or class balance, and the features' layout, encoder and size."""
    from oncoslide.cohort.summary import summarise_cohort

    study = _study(config)
    cohort = _need(cohort, "--cohort", study, "cohort")
    features = _optional(features, study, "features")
    omics = _optional(omics, study, "omics")
    gene_groups = _optional(gene_groups, study, "gene_groups")
    columns = _task_columns(study)
    if task:
        columns = {
            **columns,
            "require_survival": "survival" in task,
            "label_cols": tuple(t for t in task if t != "survival"),
        }
    c = _load_cohort(cohort, features, stamp_mpp=stamp_mpp, **columns)
    console.print(
        f"[green]ok[/] {len(c.patient_ids)} patients, {len(c.slides)} slides"
        + (f", feature dim {c.feature_dim}" if c.feature_dim else "")
    )
    for note in c.notes:
        console.print(f"  note: {escape(note)}", highlight=False)
    _print_empty_slides(c, "  note:")
    if omics is not None:
        from oncoslide.cohort.omics import load_omics

        o = load_omics(omics, gene_groups)
        console.print(
            f"[green]ok[/] omics: {len(o.values)} patients x {len(o.genes)} genes, "
            f"{len(o.groups)} groups"
        )
    _print_summary(summarise_cohort(c, stamp_mpp=stamp_mpp), features)


def _print_summary(summary: Any, features: Path | None) -> None:
    from oncoslide.cohort.summary import summary_lines

    rows = summary_lines(summary)
    width = max(len(label) for label, _ in rows)
    console.print("[bold]summary[/]")
    for label, text in rows:
        where = f" in {features}" if label == "features" and summary.feature_dim else ""
        console.print(
            f"  {escape(label.ljust(width))}  {escape(text + where)}",
            highlight=False,
            soft_wrap=True,
        )


def _task_columns(study: Any) -> dict[str, Any]:
    """load_cohort's arguments that check the columns of the study's training tasks."""
    if not study.tasks:
        return {}
    return {
        "time_col": study.train.get("time_col", "time"),
        "event_col": study.train.get("event_col", "event"),
        "require_survival": "survival" in study.tasks,
        "label_cols": tuple(t for t in study.tasks if t != "survival"),
    }


def _print_empty_slides(c: Any, prefix: str) -> None:
    """Name the slides with no patch: accepted (the patient has others) but worth knowing."""
    from oncoslide.cohort.bags import empty_slides_note

    note = empty_slides_note(c)
    if note:
        console.print(f"{prefix} {escape(note)}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------- train


# Options of `train` that are not TrainConfig fields, and aliases kept from earlier releases.
_TRAIN_ALIASES: dict[str, tuple[str, ...]] = {
    "task": ("-t",),
    "model": ("-m",),
    "survival_loss": ("--loss",),
    "n_bins": ("--bins",),
    "early_stopping_patience": ("--patience",),
    "batch_size": (),
    "num_threads": ("--threads",),
}
# TrainConfig fields given another way on the command line
_TRAIN_SPECIAL = {
    "model_kwargs", "aux_weights", "freeze", "progress", "cache_dtype", "hierarchy", "choose",
}  # fmt: skip


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
    # None: "not given", so a --config file's value is kept; the help shows the field's default
    option = typer.Option(
        None, *decls, help=help_text.strip() or None, show_default=_default_text(name, field)
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation | None
    )


def _default_text(name: str, field: Any) -> str | bool:
    """What `train --help` shows as the default of a TrainConfig field (False: none)."""
    if field.is_required():
        return False
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or default == {}:
        return False
    if isinstance(default, bool):
        flag = name.replace("_", "-")
        return flag if default else f"no-{flag}"
    return str(default)


def _parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    """``key=value`` items (values read as YAML) into a mapping; every bad item reported."""
    from oncoslide.errors import ConfigError
    from oncoslide.simulate import parse_assignments

    try:
        return parse_assignments(items)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--set", what)) from None


def _merge_assignments(settings: dict[str, Any], key: str, items: list[str], what: str) -> None:
    """``key=value`` items of option ``what`` over the mapping ``settings[key]`` already holds
    (e.g. ``--model-arg`` over the study file's ``model_kwargs``)."""
    if items:
        settings[key] = {**settings.get(key, {}), **_parse_assignments(items, what)}


def _train(
    *,
    cohort: Path | None,
    features: Path | None,
    out: Path | None,
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
    hierarchy: Path | None = None,
    choose: list[str] | None = None,
    **fields: Any,
) -> None:
    """Cross-validate a MIL model (patient-level folds, validation carved from training), or
    with --fit-all train one model on every patient and write it as a model folder.

    With --config study.yaml, the study's paths and train settings fill what is not given
    here, and each of its tasks is trained in turn (into paths.runs/<task>/).
    """
    from oncoslide.cohort.splits import load_splits
    from oncoslide.errors import ConfigError
    from oncoslide.training.config import make_config
    from oncoslide.training.side_inputs import declared_side_inputs

    study = _study(config)
    settings = study.train_settings()
    settings.update({k: v for k, v in fields.items() if v is not None})
    _merge_assignments(settings, "model_kwargs", model_arg, "--model-arg")
    _merge_assignments(settings, "aux_weights", aux_weight, "--aux-weight")
    if freeze:
        settings["freeze"] = list(freeze)
    if choose:  # candidate values chosen on validation (oncoslide.training.choose)
        from oncoslide.training.choose import parse_choose

        settings["choose"] = {**settings.get("choose", {}), **parse_choose(choose)}
    if hierarchy is not None:  # read (and validated) by the config: the run keeps the tree
        settings["hierarchy"] = str(hierarchy)
    if cache_float16 is not None:
        settings["cache_dtype"] = "float16" if cache_float16 else "stored"
    view = _progress_view(progress)
    settings["progress"] = view == "bars"
    tasks = [settings.pop("task")] if "task" in settings else (study.tasks or ["survival"])
    try:  # every task's configuration checked before any training starts
        configs = [make_config(**settings, task=task) for task in tasks]
    except ConfigError as exc:
        if study.source is None or not study.train:
            raise
        raise ConfigError(f"{exc}\n(settings from {study.source}, then the command line)") from None
    if fit_all and splits is not None:
        raise ConfigError("--fit-all trains on every patient: it takes no --splits")
    cohort = _need(cohort, "--cohort", study, "cohort")
    features = _need(features, "--features", study, "features")
    outs = _run_folders(out, study, tasks, fit_all)
    # the study's side tables go to the models that use them (one named here must be used)
    if study.paths.omics is not None or study.paths.mutations is not None:
        declared = declared_side_inputs(configs[0].model)
        if omics is None and "omics" in declared:
            omics = study.path("omics")
            gene_groups = gene_groups or study.path("gene_groups")
        if mutations is None and "mutations" in declared:
            mutations = study.path("mutations")
    side = _side_inputs(omics, gene_groups, mutations)
    given = load_splits(splits) if splits else None
    for cfg, run_out in zip(configs, outs, strict=True):
        if len(configs) > 1:
            console.print(
                f"[bold]task {escape(cfg.task)}[/] -> {escape(str(run_out))}", highlight=False
            )
        _train_one(cfg, cohort, features, run_out, view, side, study, given, fit_all=fit_all,
                   overwrite=overwrite, skip_bad_features=skip_bad_features)  # fmt: skip


def _run_folders(out: Path | None, study: Any, tasks: list[str], fit_all: bool) -> list[Path]:
    """Where each task's run goes: --out (OUT/<task> for several tasks), else the study's
    paths.runs/<task> (<task>-fit-all with --fit-all)."""
    from oncoslide.errors import ConfigError

    if out is not None:
        return [out] if len(tasks) == 1 else [out / task for task in tasks]
    runs = study.paths.runs
    if runs is None:
        raise ConfigError(_missing("--out (the run folder)", study, "runs"))
    return [runs / (f"{task}-fit-all" if fit_all else task) for task in tasks]


def _train_one(
    cfg: Any,
    cohort: Path,
    features: Path,
    out: Path,
    view: ProgressView,
    side: dict[str, Any],
    study: Any,
    given_splits: Any,
    *,
    fit_all: bool,
    overwrite: bool,
    skip_bad_features: bool,
) -> None:
    started = time.perf_counter()
    c = _load_cohort(
        cohort,
        features,
        show_progress=view == "bars",
        time_col=cfg.time_col,
        event_col=cfg.event_col,
        require_survival=cfg.is_survival,
        label_cols=() if cfg.is_survival else (cfg.task,),
        bad_features="drop" if skip_bad_features else "error",
    )
    if c.drop_note:
        console.print(f"[yellow]note:[/] {escape(c.drop_note)}", highlight=False)
    _print_empty_slides(c, "[yellow]note:[/]")
    # recorded for heatmaps (not read by training): only a folder that is there
    slides = study.paths.slides if study.paths.slides and study.paths.slides.exists() else None
    if cfg.model == "slide-finetune" and c.feature_dim is not None:  # the trainable share
        from oncoslide.models.slide_finetune import trainable_summary

        line = trainable_summary(c.feature_dim, cfg.model_kwargs, cfg.init, lr=cfg.lr)
        console.print(escape(line))
    if fit_all:
        from oncoslide.training.fit_all import fit_all as run_fit_all

        with _shown(view):
            result = run_fit_all(
                c, cfg, out, overwrite=overwrite, console=console, side=side, slides_dir=slides
            )
        _print_fit_all(result, time.perf_counter() - started)
        return
    from oncoslide.training.cv import cross_validate  # imports Lightning: after the checks

    with _shown(view):
        run = cross_validate(
            c, cfg, out, splits=given_splits, overwrite=overwrite, console=console, side=side,
            slides_dir=slides,
        )  # fmt: skip
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
        P("cohort", kw, annotation=Path | None, default=typer.Option(None, "--cohort", "-c", help="cohort table (CSV or Parquet) [default: paths.cohort of --config]")),
        P("features", kw, annotation=Path | None, default=typer.Option(None, "--features", "-f", help="folder of per-slide features [default: paths.features of --config]")),
        P("out", kw, annotation=Path | None, default=typer.Option(None, "--out", "-o", help="run folder (a model folder with --fit-all) [default: paths.runs/<task> of --config]")),
        P("fit_all", kw, annotation=bool, default=typer.Option(False, "--fit-all", help="train one model on every patient (no test part) and write a model folder")),
        P("omics", kw, annotation=Path | None, default=typer.Option(None, "--omics", help="expression table keyed by patient_id, for models that use it")),
        P("gene_groups", kw, annotation=Path | None, default=typer.Option(None, "--gene-groups", help="gene groups of --omics: JSON, CSV or GMT")),
        P("mutations", kw, annotation=Path | None, default=typer.Option(None, "--mutations", help="0/1 mutation table keyed by patient_id")),
        P("model_arg", kw, annotation=list[str], default=typer.Option([], "--model-arg", help="model keyword, e.g. --model-arg hidden_dim=256 (repeatable)")),
        P("aux_weight", kw, annotation=list[str], default=typer.Option([], "--aux-weight", help="weight of a model's auxiliary loss, e.g. --aux-weight recon=0.3")),
        P("hierarchy", kw, annotation=Path | None, default=typer.Option(None, "--hierarchy", help="label tree (YAML: coarse class -> fine classes, e.g. label_tree.yaml) over the task's classes: metrics at both levels; needed by hmil")),
        P("freeze", kw, annotation=list[str], default=typer.Option([], "--freeze", help="parameter group kept fixed with --init: encoder, projection, aggregator, head (repeatable)")),
        P("choose", kw, annotation=list[str], default=typer.Option([], "--choose", help="candidate values chosen per fold on the validation part, e.g. --choose top_k=1,2,5 --choose lr=1e-4,5e-4 (model keywords; lr, weight_decay, warmup_epochs, epochs, batch_size, max_patches, grad_clip, optimizer, sampler)")),
        P("cache_float16", kw, annotation=bool | None, default=typer.Option(None, "--cache-float16/--cache-stored", help="hold features as float16 in memory")),
        P("config", kw, annotation=Path | None, default=typer.Option(None, "--config", help="study file (oncoslide init): its paths and train settings fill what is not given here; or a YAML/JSON file of settings")),
        P("splits", kw, annotation=Path | None, default=typer.Option(None, "--splits", help="reuse a splits.csv")),
        P("overwrite", kw, annotation=bool, default=typer.Option(False, "--overwrite", help="replace another run in --out")),
        P("skip_bad_features", kw, annotation=bool, default=typer.Option(False, "--skip-bad-features", help="leave out slides whose feature file is missing, unreadable or empty (listed)")),
        P("progress", kw, annotation=bool, default=typer.Option(True, "--progress/--no-progress", help="bars on a terminal, else a line per epoch and fold; run.log has the lines either way")),
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
    what = escape(f"{trained.name} · {trained.task.name} ({trained.task.kind})")
    console.print(
        f"[green]trained[/] {what} on "
        f"{parts.get('train', 0)} patients, validation {parts.get('val', 0)}"
        + (" (already trained: nothing to do)" if result.resumed else f" in {seconds:.0f} s")
    )
    if trained.config.choose == {} and (result.out_dir / "choices.csv").is_file():
        import pandas as pd

        from oncoslide.training.choose import kept_summary

        kept = kept_summary(pd.read_csv(result.out_dir / "choices.csv")).split(" in ")[0]
        console.print(f"  chosen on validation: {escape(kept)} (choices.csv)", highlight=False)
    folder = escape(str(result.out_dir))
    console.print(
        f"  model folder {folder} (model.json, weights.pt, patients.csv, history.csv); "
        f"apply it with `oncoslide predict {folder} --cohort ... --features ...`",
        highlight=False,
    )


def print_run_summary(result: Any, seconds: float | None = None) -> None:
    cfg, task = result.config, result.task
    title = f"{cfg.model} · {task.name} ({task.kind}) · {cfg.folds}-fold x {cfg.repeats} seed(s)"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("sd over folds", justify="right")
    for row in result.summary.itertuples():
        ci = "-" if row.n_boot == 0 else f"[{row.ci_lower:.3f}, {row.ci_upper:.3f}]"
        table.add_row(escape(str(row.metric)), f"{row.mean:.3f}", escape(ci), f"{row.std:.3f}")
    console.print(table)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    stats = result.cache_stats
    if stats:
        console.print(
            f"feature files read {stats.get('reads', '?')} time(s) for "
            f"{len(set(result.splits['patient_id']))} patients"
        )
    if result.config.choose and (result.out_dir / "choices.csv").exists():
        import pandas as pd

        from oncoslide.training.choose import kept_summary

        kept = kept_summary(pd.read_csv(result.out_dir / "choices.csv"))
        console.print(f"chosen on validation: {escape(kept)} (choices.csv)", highlight=False)
    tail = f" in {seconds:.0f} s" if seconds is not None else ""
    console.print(
        f"[green]done[/]{tail}: {escape(str(result.out_dir))}/ (metrics.csv, predictions.parquet, "
        "splits.csv, summary.csv, config.json)"
    )


# --------------------------------------------------------------------------------- predict


@app.command()
@_friendly
def predict(
    model: Path = typer.Argument(..., help="a model folder, or a run folder with --fold"),
    cohort: Path | None = typer.Option(
        None, "--cohort", "-c", help="cohort table (CSV or Parquet) [default: paths.cohort]"
    ),
    features: Path | None = typer.Option(
        None, "--features", "-f", help="folder of per-slide features [default: paths.features]"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="folder for predictions and embeddings"),
    seed: int | None = typer.Option(None, "--seed", help="run folder: the seed (default: first)"),
    fold: int | None = typer.Option(None, "--fold", help="run folder: the fold's model"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="bags per forward pass"),
    num_threads: int | None = typer.Option(
        None,
        "--num-threads",
        "--threads",
        min=1,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)",
    ),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings"),
    skip_bad_features: bool = typer.Option(False, "--skip-bad-features"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    omics: Path | None = typer.Option(
        None, "--omics", help="expression table, for models that read omics at test time"
    ),
    gene_groups: Path | None = typer.Option(None, "--gene-groups", help="gene groups of --omics"),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    adapt: bool = typer.Option(
        False,
        "--adapt",
        help="adapt the model to each site's unlabelled slides first: by default a "
        "per-tissue feature alignment (optionally entropy steps and decision matching; labels "
        "are never read; see docs/training.md)",
    ),
    adapt_steps: int = typer.Option(
        0, "--adapt-steps", min=0, help="entropy steps per site (0: align only; default)"
    ),
    adapt_lr: float = typer.Option(0.01, "--adapt-lr", min=0.0, help="learning rate of --adapt"),
    adapt_diversity: float = typer.Option(
        1.0, "--adapt-diversity", min=0.0, help="weight of --adapt's diversity term (0: Tent)"
    ),
    adapt_restandardise: bool = typer.Option(
        True,
        "--adapt-restandardise/--adapt-no-restandardise",
        help="--adapt: map each site's feature statistics onto training's first "
        "(--adapt-no-restandardise: --adapt-align none)",
    ),
    adapt_align: str | None = typer.Option(
        None,
        "--adapt-align",
        help="--adapt: auto (default: tissues when the model stores tissue clusters, else "
        "standardise), tissues (standardise, then a shift per tissue cluster, clusters paired "
        "with training's without labels), standardise (per-dimension mean and sd), coral "
        "(full covariance) or none",
    ),
    adapt_prior: str = typer.Option(
        "uniform",
        "--adapt-prior",
        help="--adapt: target of the diversity term, uniform or training (class frequencies)",
    ),
    adapt_match: str = typer.Option(
        "none",
        "--adapt-match",
        help="--adapt, classification: decisions (predict the site's patients in the shares "
        "the model predicted its training part) or none (default)",
    ),
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
    study = _study(study_file)
    cohort = _need(cohort, "--cohort", study, "cohort")
    features = _need(features, "--features", study, "features")
    if omics is None and study.paths.omics is not None:
        from oncoslide.training.side_inputs import declared_side_inputs

        # the study's omics table only for a model that reads omics when predicting
        if declared_side_inputs(trained.name).get("omics") == "always":
            omics = study.path("omics")
            gene_groups = _optional(gene_groups, study, "gene_groups")
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
        trained,
        c,
        out,
        batch_size=batch_size,
        embeddings=embeddings,
        side=side,
        num_threads=num_threads,
        adapt=_adapt_config(
            adapt,
            adapt_steps,
            adapt_lr,
            adapt_diversity,
            adapt_restandardise,
            align=adapt_align,
            prior=adapt_prior,
            match=adapt_match,
        ),
    )
    console.print(
        f"[green]predicted[/] {len(result.predictions)} patients with "
        + escape(f"{trained.name} ({task.name}) -> {out}/predictions.parquet")
    )
    if embeddings:
        console.print(
            f"  embeddings ({trained.model.embed_dim}-d): "
            f"{escape(str(result.patient_embeddings_dir))}, "
            f"{escape(str(result.slide_embeddings_dir))} (slide-level feature files: a benchmark "
            "`level: slide` feature set reads them)"
        )
    if has_targets:
        _print_scores(result.predictions, task)
    if adapt:
        from oncoslide.cli_adapt import print_adaptation

        print_adaptation(console, result.out_dir)


def _adapt_config(
    adapt: bool,
    steps: int,
    lr: float,
    diversity: float,
    restandardise: bool,
    *,
    align: str | None = None,
    prior: str = "uniform",
    match: str = "none",
) -> Any:
    from oncoslide.errors import ConfigError
    from oncoslide.training.adapt import AdaptConfig

    if not restandardise and align not in (None, "none"):
        raise ConfigError(f"--adapt-no-restandardise contradicts --adapt-align {align}")
    chosen = align or ("auto" if restandardise else "none")
    config = AdaptConfig(
        steps=steps, lr=lr, diversity=diversity, prior=prior, align=chosen, match=match
    )
    if not adapt:
        if config != AdaptConfig():
            raise ConfigError("the --adapt-... options need --adapt")
        return None
    return config


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
    ctx: typer.Context,
    slides: Path | None = typer.Option(
        None, "--slides", "-s", help="folder of slides, or a CSV list [default: paths.slides]"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="feature folder to write [default: paths.features]"
    ),
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
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="bars on a terminal, else a line per slide; OUT/run.log has the lines either way",
    ),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="replace the features in --out that were extracted with other settings "
        "(those of the same settings are kept)",
    ),
) -> None:
    """Cut tissue into patches at a physical resolution and embed them: one feature file per slide.

    --out holds one extraction (its settings in OUT/extraction.json): the same command resumes
    it; other settings are refused unless --overwrite."""
    from oncoslide.features.extract import (
        ExtractConfig,
        extract_slides,
        find_slides,
        settings_notes,
        summarise_manifest,
    )
    from oncoslide.training.progress import make_progress

    study = _study(study_file)
    slides = _need(slides, "--slides", study, "slides")
    out = _output(out, "--out", study, "features")
    given = study.extract  # the study's extraction settings, under the command line's
    encoder = _pick(ctx, "encoder", encoder, given.encoder)
    weights = _pick(ctx, "weights", weights, given.weights)
    mpp = _pick(ctx, "mpp", mpp, given.mpp)
    patch_size = _pick(ctx, "patch_size", patch_size, given.patch_size)
    overlap = _pick(ctx, "overlap", overlap, given.overlap)
    min_tissue = _pick(ctx, "min_tissue", min_tissue, given.min_tissue)
    mpp_override = _pick(ctx, "mpp_override", mpp_override, given.mpp_override)
    dtype = _pick(ctx, "dtype", dtype, given.dtype)
    config = ExtractConfig(
        encoder=encoder, weights=None if weights is None else str(weights), target_mpp=mpp,
        patch_size=patch_size, overlap=overlap, min_tissue_fraction=min_tissue, dtype=dtype,  # type: ignore[arg-type]
        backend=backend, mpp_override=mpp_override, batch_size=batch_size,  # type: ignore[arg-type]
        num_workers=workers, device=device,
    )  # fmt: skip
    jobs = find_slides(slides)
    for note in settings_notes(config):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    started = time.perf_counter()
    view = _progress_view(progress)
    bar = make_progress(console, enabled=view == "bars")
    with bar, _shown(view):
        manifest = extract_slides(
            jobs,
            out,
            config,
            executor=cast(Literal["local", "ray"], executor),  # checked by extract_slides
            address=address,
            gpus_per_slide=gpus_per_slide,
            progress=bar,
            overwrite=overwrite,
        )
    counts = summarise_manifest(manifest)
    console.print(
        f"[green]extracted[/] {counts['done']} slide(s), skipped {counts['skipped']} already done, "
        f"{counts['no_tissue']} without tissue, [red]{counts['failed']} failed[/] "
        f"in {time.perf_counter() - started:.0f} s -> {escape(str(out))}/ (extraction.json, "
        "manifest.csv, thumbnails/, masks/)"
    )
    for row in manifest[manifest["status"] == "failed"].itertuples():
        err_console.print(
            f"[red]failed[/] {escape(str(row.slide_id))}: {escape(str(row.error))}",
            highlight=False,
        )
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
@_friendly
def heatmap(
    run: Path = typer.Argument(..., help="run folder written by `oncoslide train`"),
    cohort: Path | None = typer.Option(
        None, "--cohort", "-c", help="the run's cohort table [default: the one it recorded]"
    ),
    features: Path | None = typer.Option(
        None, "--features", "-f", help="the run's feature folder [default: the one it recorded]"
    ),
    patient: list[str] = typer.Option(..., "--patient", "-p", help="patient id (repeatable)"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="folder for the images and tables [default: RUN/heatmaps]"
    ),
    seed: int = typer.Option(0, "--seed", help="which seed's models"),
    fold: int | None = typer.Option(
        None, "--fold", help="default: the fold that held the patient out (out-of-fold)"
    ),
    slides: Path | None = typer.Option(
        None,
        "--slides",
        help="folder of the slide files (default: the run's, else the path extract recorded)",
    ),
    max_side: int = typer.Option(
        2048, "--max-side", min=1, help="PNG size (longer side, px; at most the slide's level 0)"
    ),
    full_resolution: bool = typer.Option(
        False,
        "--full-resolution",
        help="also write <slide>.ome.tif: the overlay at level 0, tiled and pyramidal",
    ),
    tiff_mpp: float | None = typer.Option(
        None, "--tiff-mpp", help="µm/px of that TIFF instead of level 0 (implies --full-resolution)"
    ),
    geojson: bool = typer.Option(
        True, "--geojson/--no-geojson", help="<slide>.geojson: one QuPath detection per patch"
    ),
    stamp_mpp: float | None = typer.Option(
        None, help="level-0 µm/px of the slides, for STAMP files that do not record it"
    ),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Draw a trained attention model's attention on a patient's slides (out-of-fold).

    Per slide: <slide>.png (the overlay, --max-side px), figures/<slide>.png (with title and
    colour bar), <slide>.geojson (for QuPath) and, with --full-resolution, <slide>.ome.tif.

    The cohort table, features and slides default to those the run was trained on (it records
    them); --config study.yaml or the options name others.
    """
    from oncoslide.report.attention import attention_heatmaps, read_run

    config, _ = read_run(run)
    cohort, features, slides = _run_data(run, cohort, features, slides, _study(study_file))
    out = out or run / "heatmaps"
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
            geojson=geojson,
            full_resolution=full_resolution,
            tiff_mpp=tiff_mpp,
        )
        att = result.attention
        view = "out-of-fold" if att.out_of_fold else "[yellow]trained on this patient[/]"
        prediction = ", ".join(f"{k} {v:.3g}" for k, v in att.prediction.items())
        console.print(
            f"[green]{escape(pid)}[/]: seed {att.seed} fold {att.fold} ({view}), {len(att.table)} "
            f"patches, prediction {escape(prediction)} -> {escape(str(out / pid))}/ "
            f"({_heatmap_files(result)})"
        )
        for note in result.notes:
            console.print(f"[dim]note:[/] {escape(note)}", highlight=False)


def _heatmap_files(result: Any) -> str:
    """What attention_heatmaps wrote, counted: "2 image(s), 1 GeoJSON, attention.csv"."""
    parts = [f"{len(result.images)} image(s)"]
    if result.geojson:
        parts.append(f"{len(result.geojson)} GeoJSON")
    if result.tiffs:
        parts.append(f"{len(result.tiffs)} OME-TIFF")
    return ", ".join([*parts, "attention.csv"])


def _run_data(
    run: Path, cohort: Path | None, features: Path | None, slides: Path | None, study: Any
) -> tuple[Path, Path, Path | None]:
    """A run's cohort table, features and slides: the command line's, else the study's
    (--config), else the paths the run recorded when it was trained (paths.json)."""
    from oncoslide.errors import ConfigError
    from oncoslide.study import DATA_PATHS_FILE, read_data_paths

    recorded = read_data_paths(run)
    record = run / DATA_PATHS_FILE
    used: list[str] = []

    def pick(value: Path | None, option: str, key: str, what: str) -> Path | None:
        if value is not None:
            return value
        kept = None if recorded is None else getattr(recorded, key)
        for candidate, source in (
            (getattr(study.paths, key), study.where(f"paths.{key}")),
            (None if kept is None else Path(kept), f"recorded in {record}"),
        ):
            if candidate is None:
                continue
            if candidate.exists():
                if source.startswith("recorded"):
                    used.append(f"{key} {candidate}")
                return candidate
            if key == "slides":  # optional: the feature files name their slides too
                console.print(
                    f"[dim]note:[/] the slides folder {escape(f'{candidate} ({source})')} "
                    "does not exist: "
                    "the slide paths in the feature files are tried (or pass --slides)",
                    highlight=False,
                )
                return None
            if source.startswith("recorded"):
                raise ConfigError(
                    f"the {what} the run was trained on, {candidate} ({source}), no longer "
                    f"exists: give {option}"
                )
            raise ConfigError(f"the {what} {candidate} ({source}) does not exist: give {option}")
        return None

    found_cohort = pick(cohort, "--cohort", "cohort", "cohort table")
    found_features = pick(features, "--features", "features", "feature folder")
    for value, option, what in (
        (found_cohort, "--cohort", "cohort table"),
        (found_features, "--features", "feature folder"),
    ):
        if value is None:
            why = (
                f"{run} does not record its data paths (trained by an earlier release)"
                if recorded is None
                else f"{record} records no {what} (the run was given it as data, not a path)"
            )
            raise ConfigError(f"give {option}: {why}")
    found_slides = pick(slides, "--slides", "slides", "slides folder")
    if used:
        console.print(f"[dim]as recorded by the run:[/] {escape('; '.join(used))}", highlight=False)
    return cast(Path, found_cohort), cast(Path, found_features), found_slides


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
            escape(name), str(info.out_dim), str(info.input_size),
            "-" if info.native_mpp is None else str(info.native_mpp),
            escape(info.weights_description),
        )  # fmt: skip
    console.print(table)


# --------------------------------------------------------------------------------- models


@app.command("models")
def list_models_cmd(pattern: str = typer.Argument("*", help="fnmatch pattern")) -> None:
    """List the registered MIL models: attention (what `oncoslide heatmap` draws), inputs."""
    from oncoslide.models import MODELS, list_models

    table = Table()
    for col in ("name", "attention", "inputs", "description"):
        table.add_column(col)
    for name in list_models(pattern):
        meta = MODELS.metadata(name)
        table.add_row(
            escape(name),
            "yes" if meta.get("has_attention") else "no",
            escape(_model_inputs(meta)),
            escape(str(meta.get("description", ""))),
        )
    console.print(table)
    console.print(
        "attention yes: `oncoslide heatmap` draws where the model looks on the slides",
        highlight=False,
    )


def _model_inputs(meta: dict[str, Any]) -> str:
    """What a model reads, from its registry metadata: "patches + omics (training only)"."""
    parts = ["patches"] if meta.get("uses_patches", True) else []
    for name, when in (meta.get("side_inputs") or {}).items():
        parts.append(f"{name} (training only)" if when == "train" else str(name))
    if meta.get("needs_experts"):
        parts.append("a model zoo")
    return " + ".join(parts) or "-"


# --------------------------------------------------------------------------------- bench

bench_app = typer.Typer(
    help="Benchmarks: tasks x feature sets x models, a results store and a leaderboard.",
    no_args_is_help=True,
    cls=_PlainHelpGroup,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("run")
@_friendly
def bench_run(
    spec: Path | None = typer.Argument(
        None, help="benchmark YAML (see docs/bench.md) [default: paths.bench_spec]"
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="benchmark folder (results.sqlite, ...) [default: paths.bench]"
    ),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
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
    num_threads: int | None = typer.Option(
        None,
        "--num-threads",
        "--threads",
        min=1,
        help="torch threads per worker (default: OMP_NUM_THREADS, else usable cores / workers; "
        "ray: the CPUs each cell reserves, default 1)",
    ),
    progress: bool = typer.Option(
        True,
        "--progress/--no-progress",
        help="bars on a terminal, else a line per cell; OUT/run.log has the lines either way",
    ),
) -> None:
    """Run the cells of a benchmark that its folder does not hold yet."""
    from oncoslide.bench.runner import run_benchmark

    study = _study(study_file)
    spec = _need(spec, "the benchmark YAML (SPEC)", study, "bench_spec")
    out = _output(out, "--out", study, "bench")
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
    view = _progress_view(progress)
    with _shown(view):
        run = run_benchmark(
            bench_spec,
            out,
            executor=cast(Literal["local", "ray"], executor),
            workers=workers,
            address=address,
            cache_gb=cache_gb,
            gpus=gpu_ids,
            gpus_per_cell=gpus_per_cell,
            num_threads=num_threads,
            # the lines view: the per-cell lines say what the library would print (failures)
            console=None if view == "lines" else console,
            progress=view == "bars",
        )
    for note in run.notes:
        console.print(f"[dim]note:[/] {escape(note)}", highlight=False)
    console.print(
        f"{run.n_cells} cells: {run.n_already_done} already done, {run.n_ran} run now, "
        f"{len(run.failures)} failed ({time.perf_counter() - started:.0f} s); "
        f"leaderboard: oncoslide bench leaderboard {escape(str(out))}"
    )
    if run.failures:
        err_console.print(
            f"[red]{len(run.failures)} cell(s) failed[/]: see {escape(str(out / 'failures.csv'))}"
        )
        raise typer.Exit(1)


@bench_app.command("leaderboard")
@_friendly
def bench_leaderboard(
    folder: Path | None = typer.Argument(
        None, help="benchmark folder written by `bench run` [default: paths.bench]"
    ),
    html: Path | None = typer.Option(
        None, "--html", help="page to write (default FOLDER/index.html)"
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="tidy scores CSV (default beside the page)"
    ),
    n_boot: int | None = typer.Option(
        None, "--n-boot", help="bootstrap replicates (default: spec)"
    ),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Statistics and the static leaderboard page of a benchmark folder."""
    from oncoslide.bench.report import build_leaderboard, print_leaderboard

    folder = _output(folder, "the benchmark FOLDER", _study(study_file), "bench")

    board = build_leaderboard(folder, html=html, csv=csv, n_boot=n_boot)
    print_leaderboard(board, console)
    console.print(
        escape(f"leaderboard: {board.html_path}  (scores: {board.csv_path})"), highlight=False
    )


@bench_app.command("shuffle-features")
@_friendly
def bench_shuffle_features(
    cohort: Path | None = typer.Option(
        None, "--cohort", help="cohort table (one row per slide) [default: paths.cohort]"
    ),
    features: Path | None = typer.Option(
        None, "--features", help="folder of feature files [default: paths.features]"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the shuffled feature set"),
    seed: int = typer.Option(0, "--seed", "-s"),
    copy: bool = typer.Option(False, "--copy", help="copy files instead of symbolic links"),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """A negative-control feature set: each slide gets another patient's features."""
    from oncoslide.bench.shuffle import shuffle_features

    study = _study(study_file)
    cohort = _need(cohort, "--cohort", study, "cohort")
    features = _need(features, "--features", study, "features")

    mapping = shuffle_features(cohort, features, out, seed=seed, copy=copy)
    console.print(
        f"{len(mapping)} slides shuffled across patients into {escape(str(out))} "
        "(map: shuffle_map.csv)"
    )


# --------------------------------------------------------------------------------- demo


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o"),
    quick: bool = typer.Option(False, "--quick", help="a smaller cohort, fewer epochs"),
    heatmap: bool = typer.Option(
        False,
        "--heatmap",
        help="instead: attention heatmaps on the bundled real slide (docs/heatmaps.md)",
    ),
) -> None:
    """The main job on embedded data: simulate a cohort, cross-validate models, print results.

    With --heatmap: extract the bundled real slide, train ABMIL on simulated patients planted on
    its patches and draw the slide's out-of-fold attention (PNG, GeoJSON, OME-TIFF).
    """
    if heatmap:
        from oncoslide.demo_heatmap import run_heatmap_demo

        run_heatmap_demo(out, console=console)
        return
    from oncoslide.demo import run_demo

    view = _progress_view(True)
    with _shown(view):
        run_demo(out, quick=quick, console=console, bars=view == "bars")


def main() -> None:
    app()


# --------------------------------------------------------------------------------- transfer

zoo_app = typer.Typer(
    help="A zoo of per-cancer survival models (CROPKT's off-the-shelf models).",
    no_args_is_help=True,
    cls=_PlainHelpGroup,
)
app.add_typer(zoo_app, name="zoo")
transfer_app = typer.Typer(
    help="Cross-cancer transfer: how each cancer's model does on the others.",
    no_args_is_help=True,
    cls=_PlainHelpGroup,
)
app.add_typer(transfer_app, name="transfer")


@zoo_app.command("train")
@_friendly
def zoo_train(
    ctx: typer.Context,
    cohort: Path | None = typer.Option(
        None, "--cohort", help="pan-cancer cohort table [default: paths.cohort]"
    ),
    features: Path | None = typer.Option(
        None, "--features", help="feature folder [default: paths.features]"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="zoo folder"),
    by: str = typer.Option("cohort", "--by", help="patient-level column naming the cancer"),
    min_patients: int = typer.Option(200, "--min-patients", help="inclusion: patients"),
    min_event_rate: float = typer.Option(0.05, "--min-event-rate", help="inclusion: events/n"),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="study file (its paths and train settings), or YAML/JSON training settings",
    ),
    model: str = typer.Option("abmil", "--model", "-m"),
    model_arg: list[str] = typer.Option(
        [],
        "--model-arg",
        help="model keyword, e.g. --model-arg attn_dim=384 (repeatable)",
    ),
    folds: int | None = typer.Option(None, "--folds"),
    epochs: int | None = typer.Option(None, "--epochs"),
    seed: int | None = typer.Option(None, "--seed"),
    num_threads: int | None = typer.Option(
        None,
        "--num-threads",
        "--threads",
        min=1,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the cores this process may use)",
    ),
    overwrite: bool = typer.Option(False, "--overwrite"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train one survival model per cancer that meets the inclusion rule."""
    from oncoslide.training import make_config
    from oncoslide.transfer import build_zoo

    view = _progress_view(progress)
    study = _study(config_file)
    settings: dict[str, Any] = study.train_settings()
    model = _pick(ctx, "model", model, settings.get("model"))
    settings.update({"task": "survival", "model": model, "progress": view == "bars"})
    _merge_assignments(settings, "model_kwargs", model_arg, "--model-arg")
    for key, value in (
        ("folds", folds),
        ("epochs", epochs),
        ("seed", seed),
        ("num_threads", num_threads),
    ):
        if value is not None:
            settings[key] = value
    config = make_config(**settings)
    cohort = _need(cohort, "--cohort", study, "cohort")
    features = _need(features, "--features", study, "features")
    c = _load_cohort(cohort, features, show_progress=view == "bars")
    with _shown(view):
        zoo, notes = build_zoo(
            c,
            config,
            out,
            by=by,
            min_patients=min_patients,
            min_event_rate=min_event_rate,
            overwrite=overwrite,
            on_step=lambda cancer: console.print(f"training the {escape(cancer)} model"),
        )
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    _print_zoo(zoo)


@zoo_app.command("list")
@_friendly
def zoo_list(zoo_dir: Path = typer.Argument(..., help="zoo folder")) -> None:
    """The zoo's models: cancer, patients, events, encoder, CV C-index with interval."""
    from oncoslide.transfer import load_zoo

    _print_zoo(load_zoo(zoo_dir))


def _print_zoo(zoo: Any) -> None:
    from rich.table import Table

    table = Table(
        title=escape(f"model zoo {zoo.path} (by {zoo.by}; encoder {zoo.contract.encoder})")
    )
    for col in ("cancer", "patients", "events", "CV C-index [95% CI]"):
        table.add_column(col)
    for e in zoo.entries:
        table.add_row(
            escape(e.cancer),
            str(e.n_patients),
            str(e.n_events),
            f"{e.c_index:.3f} [{e.lower:.2f}, {e.upper:.2f}]",
        )
    console.print(table)


@transfer_app.command("matrix")
@_friendly
def transfer_matrix_cmd(
    zoo_dir: Path = typer.Option(..., "--zoo", help="zoo folder (oncoslide zoo train)"),
    cohort: Path | None = typer.Option(
        None, "--cohort", help="cohort table with the target cancers [default: paths.cohort]"
    ),
    features: Path | None = typer.Option(
        None, "--features", help="feature folder [default: paths.features]"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    n_boot: int = typer.Option(500, "--n-boot", help="bootstrap replicates per cell"),
    study_file: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
) -> None:
    """Score every zoo model, unchanged, on every cancer's patients it never saw."""
    from oncoslide.transfer import load_zoo, transfer_matrix

    study = _study(study_file)
    cohort = _need(cohort, "--cohort", study, "cohort")
    features = _need(features, "--features", study, "features")

    zoo = load_zoo(zoo_dir)
    c = _load_cohort(cohort, features)
    result = transfer_matrix(zoo, c, out, n_boot=n_boot)
    console.print(result.wide.round(3).to_string(), highlight=False, markup=False)
    written = ", ".join(str(out / name) for name in ("matrix.csv", "matrix.png", "index.html"))
    console.print(f"[green]written[/] {escape(written)}", highlight=False)


# Commands defined in their own modules, which import this one's helpers. They register on the
# package module only: run as a script (`python -m oncoslide.cli`, or re-run as __mp_main__ by a
# spawned worker) this file is a second copy, and importing them here would be circular.
if __name__ == "oncoslide.cli":
    # slide-encoder pre-training (issue 14): `pretrain <method>` and `embed-slides`
    from oncoslide.cli_explain import register as _register_explain
    from oncoslide.cli_pretrain import embed_slides_cmd, pretrain_app

    app.add_typer(pretrain_app, name="pretrain")
    app.command("embed-slides")(embed_slides_cmd)
    # explain (prototypes) and report (one page per patient)
    _register_explain(app)
    from oncoslide.cli_fewshot import register as _register_fewshot  # few-shot probes (issue 14)

    _register_fewshot(app)
    from oncoslide.cli_transfer import register as _register_transfer  # transfer report (13)

    _register_transfer(transfer_app)


if __name__ == "__main__":
    from oncoslide.cli import main as _package_main  # the package module, with every command

    _package_main()
