"""The simulated world: cohorts with planted, documented ground truth (docs/simulator.md).

Named presets plant the truths each method is judged on::

    from oncoslide.simulate import make_simulation_config, simulate_cohort

    config = make_simulation_config("pan-cancer", {"seed": 1})
    result = simulate_cohort("sim/", config)   # cohort.csv, features/, omics, truth.json, ...

Modules follow the data flow: ``config`` (knobs and constants), ``presets``, ``world``
(morphologies, geometry, prognosis, calibration), ``patients``, ``outcomes``, ``slides``
(arrangement and feature files), ``omics`` (expression and mutations), ``truth`` (planted
quantities and oracles), ``control`` (negative controls) and ``run`` (writing it all).
"""

from oncoslide.simulate.config import (
    ENCODER_NAME,
    LATENT_NAMES,
    SUBTYPES,
    SimulationConfig,
)
from oncoslide.simulate.control import permute_outcomes, write_permuted_cohort
from oncoslide.simulate.presets import (
    PRESETS,
    Preset,
    list_presets,
    make_simulation_config,
    parse_assignments,
)
from oncoslide.simulate.run import SimulationResult, run_simulation, simulate_cohort
from oncoslide.simulate.truth import oracle_predictions

__all__ = [
    "ENCODER_NAME",
    "LATENT_NAMES",
    "PRESETS",
    "SUBTYPES",
    "Preset",
    "SimulationConfig",
    "SimulationResult",
    "list_presets",
    "make_simulation_config",
    "oracle_predictions",
    "parse_assignments",
    "permute_outcomes",
    "run_simulation",
    "simulate_cohort",
    "write_permuted_cohort",
]
