"""One file for a whole study: where its slides, features, tables and outputs are, and its
extraction and training settings. ``oncoslide init`` writes it as a commented ``study.yaml``.

Every command takes ``--config study.yaml`` and uses the file's paths and settings for the
options not given on the command line (the command line wins). Relative paths in the file are
relative to the file's own folder, so a study folder can be moved or shared as a whole.

A file of training settings only (``task: survival``, ``model: abmil``, ...; what
``train --config`` read before studies existed) is still accepted: it is a study with only a
``train`` section, and its values are used exactly as before.

Runs and ``--fit-all`` model folders record the absolute paths of the data they read in
``paths.json`` (:class:`DataPaths`), so ``oncoslide heatmap RUN -p ID`` finds the cohort,
features and slides again without being told.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from oncoslide._io import read_mapping_file, write_json, write_text
from oncoslide.errors import ConfigError, StudyError

if TYPE_CHECKING:
    from oncoslide.cohort.omics import Omics
    from oncoslide.cohort.table import Cohort

STUDY_FILE = "study.yaml"
SECTIONS = ("paths", "extract", "train", "simulate")
#: Paths a study reads (they must exist when a command uses them); the others are outputs.
INPUT_PATHS = ("slides", "features", "cohort", "omics", "gene_groups", "mutations", "bench_spec")


class StudyPaths(BaseModel):
    """Where a study's data and outputs are (absolute once loaded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slides: Path | None = None
    features: Path | None = None
    cohort: Path | None = None
    omics: Path | None = None
    gene_groups: Path | None = None
    mutations: Path | None = None
    runs: Path | None = None
    bench: Path | None = None
    bench_spec: Path | None = None


class ExtractSettings(BaseModel):
    """``oncoslide extract`` settings of the study (None: the command's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str | None = None
    weights: Path | None = None
    mpp: float | None = Field(default=None, gt=0)
    patch_size: int | None = Field(default=None, ge=1)
    overlap: int | None = Field(default=None, ge=0)
    min_tissue: float | None = Field(default=None, ge=0, le=1)
    mpp_override: float | None = Field(default=None, gt=0)
    dtype: Literal["float32", "float16"] | None = None


class Study(BaseModel):
    """A loaded study file. ``train`` holds ``TrainConfig`` settings whose ``task`` may be a
    list (one run per task); ``simulate`` holds ``oncoslide simulate`` knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: StudyPaths = Field(default_factory=StudyPaths)
    extract: ExtractSettings = Field(default_factory=ExtractSettings)
    train: dict[str, Any] = Field(default_factory=dict)
    simulate: dict[str, Any] = Field(default_factory=dict)
    # the file it was read from, named in messages; not a key of the file
    source: Path | None = Field(default=None, exclude=True)

    @property
    def tasks(self) -> list[str]:
        """The training tasks the study names (empty when it names none)."""
        task = self.train.get("task")
        if task is None:
            return []
        return [task] if isinstance(task, str) else [str(t) for t in task]

    def train_settings(self) -> dict[str, Any]:
        """The ``train`` section without ``task`` (the caller picks the task)."""
        return {k: v for k, v in self.train.items() if k != "task"}

    def where(self, key: str) -> str:
        """Where a value came from, for messages: ``paths.cohort in study.yaml``."""
        return f"{key} in {self.source}" if self.source is not None else key

    def path(self, key: str) -> Path | None:
        """The study's ``paths.<key>``; an input that does not exist is refused, naming the
        file it came from."""
        value: Path | None = getattr(self.paths, key)
        if value is not None and key in INPUT_PATHS and not value.exists():
            raise ConfigError(f"{value} does not exist (named by {self.where('paths.' + key)})")
        return value


def is_study_mapping(data: Mapping[str, Any]) -> bool:
    """Whether a settings mapping is a study (has sections) rather than plain training
    settings of earlier releases (``task: survival``, ``model: abmil``)."""
    return any(key in data for key in SECTIONS)


def is_study_file(path: str | os.PathLike[str]) -> bool:
    """Whether a settings file is a study (has sections); ``ConfigError`` when unreadable."""
    data = read_mapping_file(path, "config file", "settings", allow_empty=True)
    return is_study_mapping(data)


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read a study file (YAML, or JSON by suffix), or a plain file of training settings.

    Relative paths are resolved against the file's folder. Raises ``StudyError`` listing every
    unknown key and bad value at once, ``ConfigError`` when the file cannot be read.
    """
    path = Path(path)
    data = read_mapping_file(path, "config file", "settings or study sections")
    if not is_study_mapping(data):
        # training settings only (or a run's config.json): used as before, paths untouched
        settings = data.get("config", data) if "run_key" in data else data
        if not isinstance(settings, dict):
            raise StudyError(["'config' must be a mapping of training settings"], str(path))
        return Study(train=settings, source=path)
    problems: list[str] = []
    raw: dict[str, Any] = {}
    for key, value in data.items():
        if key not in SECTIONS:
            problems.append(f"unknown key {key!r}; the sections are {', '.join(SECTIONS)}")
        elif value is None:  # `paths:` with everything below it commented out
            continue
        elif not isinstance(value, dict):
            problems.append(f"{key}: must be a mapping, not {type(value).__name__}")
        else:
            raw[key] = value
    problems += _train_problems(raw.get("train", {}))
    try:
        study = Study.model_validate({**raw, "source": path})
    except ValidationError as exc:
        problems += [_describe(err) for err in exc.errors()]
        study = None
    if problems or study is None:
        raise StudyError(problems, str(path))
    return _resolved(study, path.parent)


def _describe(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = str(err["loc"][0])
        sections: dict[str, type[BaseModel]] = {"paths": StudyPaths, "extract": ExtractSettings}
        model = sections.get(section)
        known = f"; {section} keys: {', '.join(model.model_fields)}" if model else ""
        return f"unknown key {loc!r}{known}"
    return f"{loc}: {err['msg']}"


def _train_problems(train: Mapping[str, Any]) -> list[str]:
    """Unknown training settings and a malformed ``task``, all at once (values are checked
    with the command line's when the configuration is built)."""
    from oncoslide.training.config import TrainConfig

    problems = [
        f"unknown key 'train.{key}' (see `oncoslide train --help`)"
        for key in train
        if key not in TrainConfig.model_fields
    ]
    task = train.get("task")
    if task is not None:
        tasks = [task] if isinstance(task, str) else task
        if not isinstance(tasks, list) or not tasks:
            problems.append("train.task: 'survival', a label column, or a list of them")
        elif any(not isinstance(t, str) or not t.strip() for t in tasks):
            problems.append("train.task: every task is 'survival' or a label column name")
        elif len(set(tasks)) < len(tasks):
            problems.append(f"train.task: a task is named twice ({', '.join(tasks)})")
    return problems


def _resolved(study: Study, base: Path) -> Study:
    """Relative paths made absolute against the study file's folder (``~`` expanded)."""
    base = Path(os.path.abspath(base))

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else Path(os.path.abspath(base / p.expanduser()))

    paths = {k: absolute(v) for k, v in study.paths.model_dump().items()}
    extract = {"weights": absolute(study.extract.weights)}
    train = dict(study.train)
    if isinstance(train.get("init"), str):  # a model folder to start from
        train["init"] = str(absolute(Path(train["init"])))
    return study.model_copy(
        update={
            "paths": study.paths.model_copy(update=paths),
            "extract": study.extract.model_copy(update=extract),
            "train": train,
        }
    )


# ------------------------------------------------------------------------------ init


# (key, default, comment) of each section; the template is written from these.
_PATH_ENTRIES: tuple[tuple[str, str | None, str], ...] = (
    ("slides", "slides", "whole-slide images (folder, or a CSV list): extract, heatmap"),
    ("features", "features", "per-slide feature files: extract writes them, the rest read"),
    ("cohort", "cohort.csv", "one row per slide: patient_id, slide_id, time, event, labels"),
    ("omics", None, "expression table keyed by patient_id (models that use omics)"),
    ("gene_groups", None, "gene groups of the omics table: JSON, CSV or GMT"),
    ("mutations", None, "0/1 mutation table keyed by patient_id"),
    ("runs", "runs", "train writes runs/<task>/ (with --fit-all: runs/<task>-fit-all/)"),
    ("bench", "bench", "bench run writes its results here, bench leaderboard reads them"),
    ("bench_spec", None, "benchmark YAML that bench run reads (docs/bench.md)"),
)
_EXTRACT_ENTRIES: tuple[tuple[str, object, str], ...] = (
    ("encoder", "efficientnet-lite0", "patch encoder (oncoslide encoders)"),
    ("weights", None, "local weights of a foundation model (UNI, CONCH, ...)"),
    ("mpp", 0.5, "micrometres per pixel of the patches"),
    ("patch_size", 224, "patch side in pixels at that resolution"),
)
_TRAIN_ENTRIES: tuple[tuple[str, object, str], ...] = (
    ("task", "survival", "survival and/or label columns, e.g. [survival, msi]: a run each"),
    ("model", "abmil", "MIL model (oncoslide models)"),
    ("folds", 5, "patient-level cross-validation folds"),
    ("seed", 0, "splits, initialisation and shuffling follow from it"),
)
_HEADER = """\
# study.yaml: one study's data, outputs and settings. Every oncoslide command given
# `--config study.yaml` uses them for the options not given on its command line (the command
# line wins). Relative paths are relative to the folder of this file. See docs/study.md.
#
#   oncoslide extract --config study.yaml     slides -> features
#   oncoslide validate --config study.yaml    every problem of the cohort and features at once
#   oncoslide train --config study.yaml       one cross-validated run per task: runs/<task>/
#   oncoslide heatmap runs/survival -p ID     attention maps (the run recorded its data paths)
"""
_SIMULATE = """\
# simulate:                    # knobs of `oncoslide simulate --config study.yaml`, which then
#   preset: demo               # writes a simulated cohort.csv and features/ here
#   n_patients: 400            # (docs/simulator.md)
"""


def _scalar(value: object) -> str:
    """One YAML value on one line (lists in flow style: ``[survival, msi]``)."""
    if value is None:
        return "null"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _line(key: str, value: object, comment: str, indent: str = "  ") -> str:
    entry = f"{indent}{key}: {_scalar(value)}"
    return f"{entry:<30} # {comment}" if len(entry) < 30 else f"{entry}  # {comment}"


def _section(name: str, comment: str) -> str:
    return f"{name + ':':<30} # {comment}"


def _as_written(value: str | os.PathLike[str], folder: Path) -> str:
    """A path given on the command line as the study file holds it: relative to the study's
    folder when inside it (the folder stays movable), else absolute."""
    target = Path(os.path.abspath(value))
    try:
        return target.relative_to(folder).as_posix() or "."
    except ValueError:
        return str(target)


def study_template(
    folder: str | os.PathLike[str] = ".",
    *,
    paths: Mapping[str, str | os.PathLike[str] | None] | None = None,
    extract: Mapping[str, object] | None = None,
    tasks: Sequence[str] = (),
    train: Mapping[str, object] | None = None,
) -> str:
    """The commented text of a ``study.yaml`` in ``folder``. ``paths`` given (relative to the
    current folder) replace the defaults; ``extract`` and ``train`` values likewise."""
    base = Path(os.path.abspath(folder))
    given = {k: v for k, v in (paths or {}).items() if v is not None}
    unknown = sorted(set(given) - {k for k, _, _ in _PATH_ENTRIES})
    unknown += sorted(set(extract or {}) - {k for k, _, _ in _EXTRACT_ENTRIES})
    unknown += sorted(set(train or {}) - {k for k, _, _ in _TRAIN_ENTRIES} - {"task"})
    if unknown:
        raise ConfigError(f"a study template has no key {', '.join(map(repr, unknown))}")
    lines = [_HEADER, "paths:", "  # inputs"]
    for key, written, comment in _PATH_ENTRIES:
        if key == "runs":
            lines.append("  # outputs")
        value = _as_written(given[key], base) if key in given else written
        lines.append(_line(key, value, comment))
    lines += ["", _section("extract", "oncoslide extract (docs/extraction.md)")]
    for key, default, comment in _EXTRACT_ENTRIES:
        setting = (extract or {}).get(key, default)
        if isinstance(setting, os.PathLike):
            setting = _as_written(setting, base)
        lines.append(_line(key, setting, comment))
    lines += ["", _section("train", "oncoslide train: any of its options (docs/training.md)")]
    chosen = {**{k: d for k, d, _ in _TRAIN_ENTRIES}, **(train or {})}
    if tasks:
        chosen["task"] = tasks[0] if len(tasks) == 1 else list(tasks)
    for key, _, comment in _TRAIN_ENTRIES:
        lines.append(_line(key, chosen[key], comment))
    lines += ["", _SIMULATE]
    return "\n".join(lines)


def write_study(
    target: str | os.PathLike[str],
    *,
    force: bool = False,
    paths: Mapping[str, str | os.PathLike[str] | None] | None = None,
    extract: Mapping[str, object] | None = None,
    tasks: Sequence[str] = (),
    train: Mapping[str, object] | None = None,
) -> Path:
    """Write a commented study file: ``target`` is a folder (``study.yaml`` in it) or a
    ``.yaml`` / ``.yml`` file. An existing file is refused unless ``force``."""
    target = Path(target)
    file = target if target.suffix in (".yaml", ".yml") else target / STUDY_FILE
    if file.exists() and not force:
        raise ConfigError(f"{file} already exists: edit it, or pass --force to replace it")
    if file.exists() and not file.is_file():
        raise ConfigError(f"{file} exists and is not a file")
    text = study_template(file.parent, paths=paths, extract=extract, tasks=tasks, train=train)
    write_text(file, text)
    return file


# ------------------------------------------------------------------------------ recorded paths

DATA_PATHS_FILE = "paths.json"


@dataclass(frozen=True)
class DataPaths:
    """The absolute paths of the data a run or model folder was trained on (None: unknown,
    e.g. a cohort given as a DataFrame). Not part of any key: the data record
    (``data.json``) says whether the data changed, this only where it was."""

    cohort: str | None = None
    features: str | None = None
    omics: str | None = None
    gene_groups: str | None = None
    mutations: str | None = None
    slides: str | None = None

    @classmethod
    def of(
        cls,
        cohort: Cohort,
        side: Mapping[str, Omics] | None = None,
        slides_dir: str | os.PathLike[str] | None = None,
    ) -> DataPaths:
        """Where ``cohort`` (and its side tables) were read from."""
        side = side or {}
        omics, mutations = side.get("omics"), side.get("mutations")
        return cls(
            cohort=_absolute(cohort.table_path),
            features=_absolute(cohort.features_dir),
            omics=_absolute(omics.table_path if omics is not None else None),
            gene_groups=_absolute(omics.groups_path if omics is not None else None),
            mutations=_absolute(mutations.table_path if mutations is not None else None),
            slides=_absolute(slides_dir),
        )

    def known(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _absolute(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def record_data_paths(folder: str | os.PathLike[str], paths: DataPaths) -> None:
    """Write ``folder/paths.json`` (nothing when no path is known: a cohort from a DataFrame
    leaves an earlier record, of the same data by the data record's check, in place)."""
    if paths.known():
        write_json(Path(folder) / DATA_PATHS_FILE, {"format": "oncoslide-paths", **asdict(paths)})


def read_data_paths(folder: str | os.PathLike[str]) -> DataPaths | None:
    """The paths recorded in ``folder/paths.json``; None for folders written before paths were
    recorded. Raises ``ConfigError`` for a damaged file."""
    file = Path(folder) / DATA_PATHS_FILE
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read {file}: not the mapping oncoslide writes")
    names = {f.name for f in fields(DataPaths)}
    return DataPaths(**{k: str(v) for k, v in data.items() if k in names and v is not None})
