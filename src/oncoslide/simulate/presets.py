"""Named worlds (presets) and the one way to turn a preset, a YAML file and ``key=value`` settings
into a checked ``SimulationConfig``.

Each preset plants the truth one family of methods is judged on; docs/simulator.md states the
planted quantities and the oracle scores that check them. Presets are set so that the planted
truth stands (checked by oracles that know it), never so that a particular method wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from oncoslide._io import read_mapping_file
from oncoslide.errors import ConfigError
from oncoslide.simulate.config import SimulationConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: Mapping[str, Any]


def _preset(name: str, description: str, **settings: Any) -> Preset:
    return Preset(name, description, MappingProxyType(settings))


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in (
            _preset(
                "demo",
                "the default world: 240 patients in 3 cancers sharing one prognosis, survival, "
                "MSI and subtype read off tissue composition and cell state",
            ),
            _preset(
                "pan-cancer",
                "9 cancers from 400 down to 25 patients in 3 prognostic families: cancers of a "
                "family share tumour morphologies and similar hazards; across families some "
                "coefficients are absent or reversed (truth: the similarity matrix)",
                n_patients=1310,
                n_cohorts=9,
                cohort_size_ratio=16.0,
                prognosis_families=3,
                patches_median=60,
                patches_min=20,
            ),
            _preset(
                "spatial",
                "survival and the 'inflamed' label depend on where immune cells sit (at the "
                "tumour or away from it) at fixed composition: counts cannot see it",
                n_patients=400,
                n_cohorts=1,
                patches_median=300,
                patches_min=100,
                survival_signal=0.0,
                interface_coupling=2.0,
                interface_hazard=-1.2,
                interface_label_signal=2.5,
            ),
            _preset(
                "histogenomic",
                "a prognostic genomic programme that the slides barely show (omics_hidden 0.9), "
                "omics nuisance factors, a mutation table and 20 % of patients without omics",
                n_patients=500,
                n_cohorts=2,
                patches_median=100,
                patches_min=30,
                genomic_signal=1.2,
                omics_hidden=0.9,
                omics_nuisance_latents=2,
                n_mutation_genes=300,
                omics_missing_fraction=0.2,
            ),
            _preset(
                "site-shift",
                "one cancer, 5 sites; the last site is scanned and stained differently (a "
                "rotation, gains and an offset of the feature space)",
                n_patients=500,
                n_cohorts=1,
                sites_per_cohort=5,
                patches_median=100,
                patches_min=30,
                site_shift_sites=1,
            ),
            _preset(
                "hierarchical",
                "one cancer with a histology label tree (3 families -> 7 subtypes, written to "
                "label_tree.yaml); patterns of sibling subtypes look alike",
                n_patients=500,
                n_cohorts=1,
                patches_median=100,
                patches_min=30,
                hierarchical_labels=True,
            ),
        )
    }
)


def list_presets() -> list[str]:
    return list(PRESETS)


def make_simulation_config(
    preset: str = "demo",
    settings: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
) -> SimulationConfig:
    """The config of ``preset``, updated by a YAML file, then by ``settings`` (later wins).

    The YAML file is a mapping of knobs and may name its own ``preset`` (used when ``preset`` is
    the default). Values are converted to each knob's type; every unknown knob and bad value is
    reported at once in one ``ConfigError``.
    """
    from_file: dict[str, Any] = {}
    if config_file is not None:
        from_file = read_mapping_file(
            config_file, "simulation config file", "knobs", allow_empty=True
        )
        file_preset = from_file.pop("preset", None)
        if file_preset is not None and preset == "demo":
            preset = str(file_preset)
    if preset not in PRESETS:
        known = ", ".join(PRESETS)
        raise ConfigError(f"unknown simulation preset {preset!r}; known: {known}")
    merged = {**PRESETS[preset].settings, **from_file, **dict(settings or {})}
    values, problems = coerce_settings(merged)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"simulation settings have {len(problems)} problem(s):\n{lines}")
    return SimulationConfig(**values)


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """``["n_patients=400", "cohort_names=[A, B]"]`` -> a dict; values are read as YAML."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"{item!r} is not key=value")
            continue
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"{key.strip()}: cannot read {text!r} ({exc.__class__.__name__})")
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"--set has {len(problems)} problem(s):\n{lines}")
    return out


_FIELDS = {f.name: f for f in dataclasses.fields(SimulationConfig)}


def coerce_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Convert values (e.g. read from YAML) to the knobs' types; (values, problems)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in settings.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown knob {key!r}{hint}")
            continue
        try:
            values[key] = _coerce(key, str(_FIELDS[key].type), value)
        except (TypeError, ValueError) as exc:
            problems.append(f"{key}: {exc}")
    return values, problems


def _coerce(key: str, kind: str, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected an integer, got {value!r}")
        if float(value) != int(value):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if kind == "tuple[float, float]":
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise TypeError(f"expected [low, high], got {value!r}")
        return tuple(float(_coerce(key, "float", v)) for v in value)
    if kind.startswith("tuple[str, ...]"):
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list of names, got {value!r}")
        return tuple(str(v) for v in value)
    if key == "hierarchy_tree":
        if isinstance(value, Mapping):
            value = list(value.items())
        if not isinstance(value, list | tuple) or not all(
            isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[1], list | tuple)
            for pair in value
        ):
            raise TypeError("expected a mapping {coarse class: [fine classes]}")
        return tuple((str(c), tuple(str(f) for f in fines)) for c, fines in value)
    if isinstance(value, str):
        return value
    raise TypeError(f"expected text, got {value!r}")
