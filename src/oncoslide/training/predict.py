"""Apply a trained model to any cohort: predictions, and patient and slide embeddings.

``predict_cohort(trained, cohort, out)`` writes::

    OUT/
      predictions.parquet     patient_id, the model's outputs (risk, risk_threshold, surv_bin*,
                              or prob_<class>), the targets when the cohort has them, and
                              detail_<name> columns of models that describe their patients
                              (ROUPKT's routing weights; not with ``adapt``)
      patient_embeddings/     <slide_id>.h5 per slide: the embedding of its patient's whole bag
      slide_embeddings/       <slide_id>.h5 per slide: the embedding of the slide alone
      prediction.json         the model, its feature contract, counts
      predictions_unadapted.parquet, adaptation.json, adaptation.csv
                              with ``adapt``: the outputs before test-time adaptation, what
                              adapting did per site, and the metrics before / after

Both embedding folders are slide-level feature files (dataset ``features`` of shape (E,), as
TRIDENT writes slide embeddings) that a benchmark ``level: slide`` feature set reads; with
``patient_embeddings/`` every slide of a patient carries the same vector, so pooling a patient's
slides gives back the patient embedding.

The feature contract is checked first: features from another encoder, with other weights, of
another dimension or patch grid are refused with a message naming both sides. Bags are
predicted whole (no patch sampling), in eval mode, one bag per forward pass as training predicts
its test part, so a fold model reproduces its run's test predictions exactly on the CPU
whatever else the cohort holds (a larger ``batch_size`` is faster on GPUs and equal up to
floating-point rounding).

Models that read omics at test time (``side_inputs={"omics": "always"}``: ``omics_snn``,
``fusion_late``, ``mome``) need the table (``side={"omics": ...}``, ``predict --omics``); it is
standardised with the fold's own fitted scaler and gene selection, and patients without a row
are predicted as missing (see docs/models.md). A slide's embedding then uses its patient's row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from oncoslide._io import atomic_path, check_folder_target, write_json, write_table
from oncoslide._threads import apply_num_threads
from oncoslide.cohort.omics import Omics
from oncoslide.cohort.table import Cohort
from oncoslide.errors import ConfigError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.schema import FeatureContract
from oncoslide.models import MODELS
from oncoslide.training.adapt import (
    AdaptConfig,
    adapt_and_predict,
    adapted_slide_embeddings,
    write_adaptation,
)
from oncoslide.training.cv import PREDICT_BATCH
from oncoslide.training.data import BagDataset, BagTargets, collate_bags, length_sorted_order
from oncoslide.training.details import patient_details, with_details
from oncoslide.training.model_folder import TrainedModel
from oncoslide.training.module import model_inputs
from oncoslide.training.side_inputs import declared_side_inputs, part_side_arrays
from oncoslide.training.tasks import label_str

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Predictions:
    """What :func:`predict_cohort` wrote, and the tables it holds."""

    out_dir: Path
    predictions: pd.DataFrame
    patient_embeddings: pd.DataFrame  # index patient_id, one column per dimension
    slide_embeddings: pd.DataFrame  # index slide_id

    @property
    def patient_embeddings_dir(self) -> Path:
        return self.out_dir / "patient_embeddings"

    @property
    def slide_embeddings_dir(self) -> Path:
        return self.out_dir / "slide_embeddings"


def cohort_contract(cohort: Cohort, cache: FeatureCache) -> FeatureContract:
    """The feature contract of a cohort's files, read from its first slide's file."""
    if not cohort.patient_ids:
        raise ConfigError("the cohort has no patients")
    first = cohort.slide_paths(cohort.patient_ids[0])[0]
    return FeatureContract.of(cache.get(first))


def check_contract(trained: TrainedModel, cohort: Cohort, cache: FeatureCache) -> None:
    """Refuse features the model was not trained on, naming both sides of every difference."""
    problems = trained.contract.mismatches(cohort_contract(cohort, cache))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"the model in {trained.path} does not fit these features "
            f"({len(problems)} difference(s)):\n{lines}"
        )


def prediction_side(
    trained: TrainedModel, side: Mapping[str, Omics] | None, patient_ids: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The side arrays a model reads at prediction time, standardised with its fold's scalers.

    Only inputs declared ``"always"`` are read (``"train"`` ones are privileged: prediction never
    uses them). Each must be given; a given table the model does not read at prediction time is
    an error, as in training. Patients without a row get zeros and ``present = False``.
    """
    declared = declared_side_inputs(trained.name)
    needed = [k for k, when in declared.items() if when == "always"]
    given = dict(side or {})
    problems = [
        f"model {trained.name!r} reads the side input {k!r} at prediction time (e.g. --{k})"
        for k in needed
        if k not in given
    ]
    problems += [
        f"side input {k!r} is given but model {trained.name!r} does not read it when predicting"
        + (" (it is used in training only)" if k in declared else "")
        for k in given
        if k not in needed
    ]
    scalers = trained.fold_task.side_scalers
    for k in needed:
        if k not in scalers:
            problems.append(f"the model in {trained.path} has no fitted standardisation for {k!r}")
        elif k in given:
            absent = [c for c in scalers[k].columns if c not in given[k].values.columns]
            if absent:
                problems.append(
                    f"side input {k!r} lacks {len(absent)} column(s) the model was trained on: "
                    f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
                )
    if problems:
        raise ConfigError("; ".join(problems))
    return part_side_arrays(
        {k: scalers[k] for k in needed}, given, declared, list(patient_ids), "predict"
    )


def _run_batches(
    trained: TrainedModel,
    items: Callable[[int], dict[str, object]],
    order: Sequence[int],
    n: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and embeddings of n bags, computed in ``order`` in batches, returned in index order."""
    n_out, dim = trained.model.n_outputs, trained.model.embed_dim
    logits = torch.empty(n, n_out)
    embeddings = torch.empty(n, dim)
    model = trained.model.eval()
    uses_slide_index = bool(MODELS.metadata(trained.name).get("uses_slide_index", False))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate_bags([items(i) for i in order[start : start + batch_size]])
            out = model(
                batch["features"],
                batch["mask"],
                batch["coords"],
                **model_inputs(batch, uses_slide_index),
            )
            logits[batch["index"]] = out.logits.float()
            embeddings[batch["index"]] = out.embedding.float()
    return logits, embeddings


def predict_cohort(
    trained: TrainedModel,
    cohort: Cohort,
    out_dir: PathLike,
    *,
    cache: FeatureCache | None = None,
    batch_size: int | None = None,
    embeddings: bool = True,
    side: Mapping[str, Omics] | None = None,
    num_threads: int | None = None,
    adapt: AdaptConfig | None = None,
) -> Predictions:
    """Predict every patient of ``cohort`` with ``trained`` and write the outputs (see above).

    ``adapt``: adapt the model to each site's unlabelled slides first (test-time adaptation,
    :mod:`oncoslide.training.adapt`); the outputs are then the adapted model's, and the folder
    also gets the unadapted predictions and ``adaptation.json`` (with targets: before / after
    metrics in ``adaptation.csv``).

    ``side`` holds the tables a model reads at prediction time (``side_inputs`` declared
    ``"always"``, e.g. ``{"omics": load_omics(...)}``); other models take none.
    ``num_threads``: torch CPU threads (default: as training, see :mod:`oncoslide._threads`).
    """
    if cohort.feature_dim is None:
        raise ConfigError("load the cohort with its feature files to predict")
    out = check_folder_target(out_dir)
    patients = cohort.patient_ids
    arrays = prediction_side(trained, side, patients)
    apply_num_threads(num_threads)
    own = cache is None
    cache = cache or FeatureCache()
    try:
        check_contract(trained, cohort, cache)
        size = batch_size or PREDICT_BATCH
        adapted = None
        if adapt is None:
            logits, patient_emb = predict_logits(trained, cohort, patients, cache, arrays, size)
        else:
            adapted = adapt_and_predict(trained, cohort, patients, cache, arrays, size, adapt)
            logits, patient_emb = adapted.logits, adapted.embeddings
        frame = pd.concat(
            [pd.DataFrame({"patient_id": patients}), trained.fold_task.prediction_frame(logits)],
            axis=1,
        )
        frame = _with_targets(frame, trained, cohort)
        if adapt is None:  # per-patient details (e.g. ROUPKT's routing weights), if any
            ds = BagDataset(cohort, patients, cache, BagTargets(), max_patches=None, side=arrays)
            details = patient_details(trained.model, trained.name, ds.__getitem__, len(ds))
            frame = with_details(frame, details)
        slides = [(pid, sid, path) for pid in patients for sid, path in _slides(cohort, pid)]
        slide_emb = torch.empty(0, trained.model.embed_dim)
        if embeddings:
            rows = {pid: i for i, pid in enumerate(patients)}
            slide_emb = (
                _slide_embeddings(trained, slides, cache, size, arrays, rows)
                if adapted is None
                else adapted_slide_embeddings(adapted, slides, cache, size, arrays, rows)
            )
    finally:
        if own:
            cache.close()

    patient_table = pd.DataFrame(patient_emb.numpy(), index=pd.Index(patients, name="patient_id"))
    slide_ids = [s for _, s, _ in slides] if embeddings else []
    slide_table = pd.DataFrame(slide_emb.numpy(), index=pd.Index(slide_ids, name="slide_id"))
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "predictions.parquet", frame)
    if adapted is not None:
        before = pd.concat(
            [
                pd.DataFrame({"patient_id": patients}),
                trained.fold_task.prediction_frame(adapted.before_logits),
            ],
            axis=1,
        )
        write_adaptation(out, adapted, _with_targets(before, trained, cohort), frame, trained)
    if embeddings:
        row = {pid: i for i, pid in enumerate(patients)}
        for k, (pid, sid, _) in enumerate(slides):
            _write_vector(out / "patient_embeddings" / f"{sid}.h5", patient_emb[row[pid]], trained)
            _write_vector(out / "slide_embeddings" / f"{sid}.h5", slide_emb[k], trained)
    write_json(
        out / "prediction.json",
        {
            "model": str(trained.path),
            "model_name": trained.name,
            "task": trained.task.to_dict(),
            "features": trained.contract.to_dict(),
            "patients": len(patients),
            "slides": len(slides),
            "embedding_dim": int(trained.model.embed_dim),
            # patients whose row of each side input was read (the others predicted as missing)
            "side_inputs": {k: int(present.sum()) for k, (_, present) in arrays.items()},
            # adapted to each site's slides before predicting (see adaptation.json)
            **({"adapted": True} if adapted is not None else {}),
        },
    )
    return Predictions(out, frame, patient_table, slide_table)


def _slides(cohort: Cohort, patient_id: str) -> list[tuple[str, Path]]:
    return list(zip(cohort.slide_ids(patient_id), cohort.slide_paths(patient_id), strict=True))


def predict_logits(
    trained: TrainedModel,
    cohort: Cohort,
    patient_ids: Sequence[str],
    cache: FeatureCache,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and patient embeddings of ``patient_ids`` (in that order): whole bags, eval mode,
    with the side arrays of :func:`prediction_side` (rows aligned with ``patient_ids``)."""
    ds = BagDataset(
        cohort, list(patient_ids), cache, BagTargets(), max_patches=None, side=dict(side or {})
    )
    size = batch_size or PREDICT_BATCH
    return _run_batches(trained, ds.__getitem__, length_sorted_order(ds), len(ds), size)


def _slide_embeddings(
    trained: TrainedModel,
    slides: list[tuple[str, str, Path]],
    cache: FeatureCache,
    batch_size: int,
    side: Mapping[str, tuple[np.ndarray, np.ndarray]],
    rows: Mapping[str, int],
) -> torch.Tensor:
    """Each slide alone as a bag (with its patient's side inputs, for models that read them)."""

    def item(k: int) -> dict[str, object]:
        sf = cache.get(slides[k][2])
        out: dict[str, object] = {
            "index": k,
            "features": sf.features,
            "coords": sf.coords,
            "slide_index": np.zeros(sf.n_patches, dtype=np.int64),
        }
        row = rows[slides[k][0]]
        for name, (values, present) in side.items():
            out[f"side:{name}"] = values[row]
            out[f"side_present:{name}"] = bool(present[row])
        return out

    sizes = np.array([cache.get(path).n_patches for _, _, path in slides])
    order = [int(i) for i in np.argsort(sizes, kind="stable")]
    _, emb = _run_batches(trained, item, order, len(slides), batch_size)
    return emb


def _with_targets(frame: pd.DataFrame, trained: TrainedModel, cohort: Cohort) -> pd.DataFrame:
    """Add the cohort's targets (where it has them) so the predictions can be scored."""
    task = trained.task
    p = cohort.patients.loc[frame["patient_id"]]
    if task.is_survival:
        if task.time_col in p.columns and task.event_col in p.columns:
            frame["time"] = p[task.time_col].to_numpy()
            frame["event"] = p[task.event_col].to_numpy()
    elif task.name in p.columns:
        frame["label"] = [None if pd.isna(v) else label_str(v) for v in p[task.name]]
    return frame


def _write_vector(target: Path, vector: torch.Tensor, trained: TrainedModel) -> None:
    with atomic_path(target, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset("features", data=vector.numpy().astype(np.float32))
        dset.attrs["encoder"] = f"oncoslide:{trained.name}"
        dset.attrs["model"] = str(trained.path)
