"""Hyperparameters chosen on validation: the grid of a run's ``choose`` setting.

``choose: {top_k: [1, 2, 5], lr: [1e-4, 5e-4]}`` (``--choose top_k=1,2,5 --choose lr=1e-4,5e-4``)
names candidate values of model keywords and of some training settings. Per fold, every
combination is trained on the fold's training part with its checkpoint chosen on the fold's
validation part, and the one whose validation score (the quantity the checkpoint choice
monitors, at the chosen epoch) is best is kept; only it predicts the test part
(:func:`oncoslide.training.cv.train_fold`). This module holds what does not need Lightning:
parsing, checking, the combinations and the score.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oncoslide.errors import ConfigError

# Training settings a run may choose on validation. Settings that change the loss itself
# (survival_loss, n_bins, class_weights, ...) are left out: the validation losses of two such
# combinations measure different things and cannot be compared.
CHOOSABLE_SETTINGS = (
    "lr",
    "weight_decay",
    "warmup_epochs",
    "epochs",
    "batch_size",
    "max_patches",
    "grad_clip",
    "optimizer",
    "sampler",
)
# Model keywords the training path fills itself (input and output sizes, side layout, the
# label tree, the target's task): never chosen.
PATH_OWNED_KEYWORDS = frozenset(
    {"in_dim", "n_outputs", "side_layout", "tree", "classes", "target_task"}
)

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def as_number(value: Any) -> Any:
    """``"1e-4"`` -> 1e-4: YAML 1.1 (PyYAML) reads exponents without a dot as strings."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    return value


def parse_choose(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["top_k=1,2,5", "lr=[1e-4, 5e-4]"]`` -> ``{"top_k": [1, 2, 5], "lr": [...]}``.

    Values are comma-separated (or a YAML list), each read as YAML; every bad item is listed in
    one :class:`ConfigError`.
    """
    import yaml

    out: dict[str, list[Any]] = {}
    problems = []
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            problems.append(f"{item!r} is not name=value1,value2,...")
            continue
        if name in out:
            problems.append(f"{name} is given twice (list every value once: {name}=a,b,c)")
            continue
        text = text.strip()
        try:
            if text.startswith("["):
                loaded = yaml.safe_load(text)
                values = loaded if isinstance(loaded, list) else [loaded]
            else:
                values = [yaml.safe_load(part) for part in text.split(",")]
        except yaml.YAMLError as exc:
            problems.append(f"{name}: cannot read {text!r} ({exc.__class__.__name__})")
            continue
        out[name] = [as_number(v) for v in values]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        raise ConfigError(f"--choose has {n} problem{'s' if n != 1 else ''}:\n{lines}")
    return out


def model_keywords(model: str) -> list[str] | None:
    """The keywords a run may choose for a registered model (None: any, or an unknown model)."""
    from oncoslide.models import MODELS

    if model not in MODELS:
        return None
    params = inspect.signature(MODELS.get(model)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in PATH_OWNED_KEYWORDS
    ]


def choose_problems(
    choose: Mapping[str, Any],
    *,
    model: str | None,
    model_kwargs: Mapping[str, Any],
    val_fraction: float | None,
) -> list[str]:
    """Everything wrong with a ``choose`` mapping, checked without data: names (training
    settings, the model's keywords), the shape of the candidate lists, and each candidate of a
    training setting. Model keyword values are checked by building the model
    (:func:`model_value_problems`)."""
    from pydantic import ValidationError

    from oncoslide.training.config import TrainConfig

    if not choose:
        return []
    problems = []
    if val_fraction is not None and val_fraction <= 0:
        problems.append("choosing on validation needs a validation part: set val_fraction > 0")
    keywords = model_keywords(model) if model is not None else None
    unknown = []
    for name, values in choose.items():
        is_setting = name in CHOOSABLE_SETTINGS
        if not is_setting and (
            name in PATH_OWNED_KEYWORDS or (keywords is not None and name not in keywords)
        ):
            unknown.append(name)
        if not isinstance(values, list):
            problems.append(f"{name}: give a list of candidate values, not {values!r}")
            continue
        if not values:
            problems.append(f"{name}: no candidate value")
            continue
        shown = [repr(v) for v in values]
        if len(set(shown)) != len(shown):
            problems.append(f"{name}: candidate values repeat ({', '.join(shown)})")
        if not is_setting and name in model_kwargs:
            problems.append(
                f"{name} is both fixed (model_kwargs / --model-arg {name}=...) and chosen: "
                "give it one way"
            )
        if is_setting:
            for value in values:
                try:
                    TrainConfig.model_validate({"task": "survival", name: value})
                except ValidationError as exc:
                    msgs = [e["msg"] for e in exc.errors() if tuple(e["loc"]) == (name,)]
                    problems.append(f"{name}={value!r}: {'; '.join(msgs) or 'invalid'}")
    if unknown:
        what = f"model {model}" if model is not None else "the model"
        kw = ", ".join(keywords or []) or "none"
        problems.insert(
            0,
            f"cannot choose {', '.join(map(repr, unknown))}: choose training settings "
            f"({', '.join(CHOOSABLE_SETTINGS)}) or keywords of {what} ({kw})",
        )
    return problems


def combinations(choose: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid: names in sorted order, each name's values in the given
    order (the first best combination wins ties, so this order is part of the run)."""
    names = sorted(choose)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(choose[n] for n in names))
    ]


def describe(combo: Mapping[str, Any]) -> str:
    """``top_k=2, lr=0.001``: a combination as progress lines and tables show it."""
    return ", ".join(f"{k}={v}" for k, v in combo.items())


def apply_choice(config: Any, combo: Mapping[str, Any]) -> Any:
    """The configuration of one combination: its values set (settings, or model keywords) and
    no grid left, validated. This is the configuration a plain run with these values fixed
    would have, and the one a saved model folder records."""
    from oncoslide.training.config import make_config

    settings = {k: v for k, v in combo.items() if k in CHOOSABLE_SETTINGS}
    kwargs = {k: v for k, v in combo.items() if k not in CHOOSABLE_SETTINGS}
    payload = config.model_dump()
    payload.update(settings)
    payload["model_kwargs"] = {**payload["model_kwargs"], **kwargs}
    payload["choose"] = {}
    return make_config(**payload)


def model_value_problems(
    choose: Mapping[str, Sequence[Any]], build: Callable[[dict[str, Any]], object]
) -> list[str]:
    """Each candidate of a model keyword, checked by building the model with it (the other
    keywords as configured): one problem per candidate the model refuses."""
    problems = []
    for name in sorted(choose):
        if name in CHOOSABLE_SETTINGS:
            continue
        for value in choose[name]:
            try:
                build({name: value})
            except (ConfigError, TypeError, ValueError) as exc:
                problems.append(f"{name}={value!r}: {str(exc).splitlines()[0]}")
    return problems


def check_model_values(config: Any, build: Callable[[dict[str, Any]], object]) -> None:
    """Raise one :class:`ConfigError` listing every candidate model keyword the model refuses."""
    problems = model_value_problems(config.choose, build)
    if problems:
        n = len(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"choose has {n} value{'s' if n != 1 else ''} the model {config.model} refuses:\n"
            + lines
        )


def choice_score(history: Sequence[Mapping[str, float]], chosen_epoch: int) -> tuple[float, float]:
    """(val_loss, val_score) of the chosen epoch (NaN when it has none)."""
    row = next((h for h in history if int(h.get("epoch", -1)) == chosen_epoch), {})
    return float(row.get("val_loss", math.nan)), float(row.get("val_score", math.nan))


def criterion(monitor: str) -> tuple[str, str]:
    """The column the choice compares and its direction: what the checkpoint choice monitors."""
    return ("val_loss", "min") if monitor == "loss" else ("val_score", "max")


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Strictly better (ties keep the earlier combination); NaN never wins."""
    if not math.isfinite(value) and not (mode == "min" and value == -math.inf):
        return best is None
    if best is None or not math.isfinite(best):
        return True
    return value < best if mode == "min" else value > best


def kept_summary(choices: Any) -> str:
    """``top_k=2 in 3 of 5 folds; top_k=1 in 2``: how often each combination was kept."""
    kept = choices[choices["kept"].astype(bool)]
    names = [
        c
        for c in choices.columns
        if c not in {"seed", "fold", "combination", "val_loss", "val_score", "chosen_epoch"}
        and c not in {"epochs_run", "kept"}
    ]
    counts = kept.groupby("combination").size().sort_values(ascending=False, kind="stable")
    parts = []
    for i, (combination, n) in enumerate(counts.items()):
        row = kept[kept["combination"] == combination].iloc[0]
        text = describe({k: row[k] for k in names})
        parts.append(f"{text} in {n} of {len(kept)} folds" if i == 0 else f"{text} in {n}")
    return "; ".join(parts)
