"""Patient bags: every patch of every slide of one patient, the unit of prediction and splitting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oncoslide.cohort.table import Cohort, _examples
from oncoslide.errors import FeatureFileError
from oncoslide.features.cache import FeatureCache
from oncoslide.features.schema import SlideFeatures


@dataclass(frozen=True, eq=False)
class PatientBag:
    """All patches of one patient, slides concatenated in ``slide_ids`` order.

    Arrays are read-only: for single-slide patients they are the cached arrays themselves.
    """

    patient_id: str
    features: np.ndarray  # (N, D) float16 or float32
    coords: np.ndarray  # (N, 2) int64, level-0 px; -1 where the file had no coordinates
    slide_index: np.ndarray  # (N,) int64 index into slide_ids
    slide_ids: list[str]

    @property
    def n_patches(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def has_coords(self) -> bool:
        """False when some slide came without coordinates (coords filled with -1)."""
        return not bool((self.coords == -1).all(axis=1).any())


def load_bag(cohort: Cohort, patient_id: str, cache: FeatureCache) -> PatientBag:
    """Read (through ``cache``) and concatenate the patient's slides.

    Raises:
        FeatureFileError: a slide has no feature file, cannot be read, or its feature dimension
            differs from the patient's other slides.
    """
    slide_ids = cohort.slide_ids(patient_id)
    paths = cohort.slide_paths(patient_id)
    slides = [cache.get(p) for p in paths]
    dims = {s.dim for s in slides}
    if len(dims) > 1:
        shown = ", ".join(f"{sid}: D={s.dim}" for sid, s in zip(slide_ids, slides, strict=True))
        raise FeatureFileError(paths[0], f"slides of patient {patient_id} disagree: {shown}")
    if len(slides) == 1:
        return _single(patient_id, slide_ids, slides[0])
    features = np.concatenate(
        [s.features for s in slides], axis=0, dtype=np.result_type(*(s.features for s in slides))
    )
    coords = np.concatenate([s.coords for s in slides], axis=0).astype(np.int64, copy=False)
    slide_index = np.repeat(np.arange(len(slides), dtype=np.int64), [s.n_patches for s in slides])
    for arr in (features, coords, slide_index):
        arr.setflags(write=False)
    return PatientBag(patient_id, features, coords, slide_index, slide_ids)


def _single(patient_id: str, slide_ids: list[str], sf: SlideFeatures) -> PatientBag:
    """A one-slide bag shares the cached arrays (no copy)."""
    slide_index = np.zeros(sf.n_patches, dtype=np.int64)
    slide_index.setflags(write=False)
    return PatientBag(patient_id, sf.features, sf.coords, slide_index, slide_ids)


def empty_slides(cohort: Cohort) -> list[str]:
    """Slides whose feature file holds no patch, sorted: they add nothing to their patient's bag.

    Only slides whose files were checked count (``load_cohort`` with a feature folder). Their
    patients have patches in other slides: ``load_cohort`` refuses a patient with none at all,
    and ``bad_features="drop"`` leaves empty slides out (listed in ``Cohort.dropped``) instead.
    """
    unchecked = -1  # n_patches is NA where the file was not opened
    empty = cohort.slides.loc[cohort.slides["n_patches"].fillna(unchecked) == 0, "slide_id"]
    return sorted(str(sid) for sid in empty.unique())


def empty_slides_note(cohort: Cohort) -> str:
    """One line naming the :func:`empty_slides` ("" when there are none)."""
    empty = empty_slides(cohort)
    if not empty:
        return ""
    return (
        f"{len(empty)} slide(s) have an empty feature file (no patches) and add nothing to their "
        f"patient's bag; their patients keep their other slides: {_examples(empty)}"
    )
