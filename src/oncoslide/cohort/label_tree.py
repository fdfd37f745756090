"""A two-level label tree (coarse -> fine, e.g. histological family -> subtype).

The file is YAML (or JSON), the format the simulator's ``hierarchical`` preset writes::

    levels: [histology_coarse, histology_fine]   # optional: the cohort columns of the levels
    tree:
      glandular: [acinar, papillary, solid]
      squamous: [keratinising, basaloid]

A bare mapping ``{coarse: [fine, ...]}`` is accepted too. Every problem of a tree (a fine class
under two parents, a class named at both levels, an empty family, ...) and of its fit to a
cohort (labels the tree does not know, a coarse column that contradicts the tree) is listed at
once in one :class:`LabelTreeError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from oncoslide.errors import ConfigError, ProblemsError


class LabelTreeError(ProblemsError, ConfigError):
    """A label tree is malformed, or does not fit the cohort's labels (a ConfigError too)."""

    what = "label tree"


def _label(value: object) -> str:
    # as training.tasks.label_str: 1, 1.0 and True name the same class
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True, kw_only=True)
class LabelTree:
    """Coarse classes and their fine children, in file order; every fine class has one parent.

    Attributes:
        tree: ``((coarse, (fine, ...)), ...)``.
        levels: the cohort columns of the (coarse, fine) levels, when the file names them.
    """

    tree: tuple[tuple[str, tuple[str, ...]], ...]
    levels: tuple[str, str] | None = None

    @property
    def coarse_classes(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.tree)

    @property
    def fine_classes(self) -> tuple[str, ...]:
        return tuple(f for _, fines in self.tree for f in fines)

    @property
    def parent(self) -> dict[str, str]:
        """Fine class -> its coarse class."""
        return {f: c for c, fines in self.tree for f in fines}

    def to_dict(self) -> dict[str, list[str]]:
        """``{coarse: [fine, ...]}`` (JSON-ready; the form configs and model.json keep)."""
        return {c: list(fines) for c, fines in self.tree}

    def restricted(self, fine_classes: Iterable[str]) -> LabelTree:
        """The tree with only these fine classes (coarse classes left without one dropped)."""
        keep = set(fine_classes)
        tree = tuple(
            (c, tuple(f for f in fines if f in keep))
            for c, fines in self.tree
            if any(f in keep for f in fines)
        )
        return LabelTree(tree=tree, levels=self.levels)

    def parent_index(self, fine_classes: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
        """For fine classes in a given order (a task's classes): the coarse classes that have
        one of them (tree order) and, per fine class, the index of its coarse class."""
        parent = self.parent
        unknown = [f for f in fine_classes if f not in parent]
        if unknown:
            raise LabelTreeError([f"classes not in the tree: {', '.join(unknown)}"])
        coarse = tuple(c for c in self.coarse_classes if c in {parent[f] for f in fine_classes})
        lookup = {c: i for i, c in enumerate(coarse)}
        return coarse, np.asarray([lookup[parent[f]] for f in fine_classes], dtype=np.int64)

    def cohort_problems(
        self,
        labels: Iterable[object],
        *,
        task: str | None = None,
        coarse_pairs: Iterable[tuple[object, object]] = (),
    ) -> list[str]:
        """Every way the tree does not fit a cohort.

        Args:
            labels: the fine labels of the task's patients.
            task: the task's label column (checked against the fine level's column).
            coarse_pairs: (coarse, fine) label pairs of patients whose cohort table has the
                coarse level's column too; each must follow the tree.
        """
        problems = []
        if task is not None and self.levels is not None and self.levels[1] != task:
            problems.append(
                f"the tree's fine level is column {self.levels[1]!r} but the task is {task!r}"
            )
        parent = self.parent
        seen = sorted({_label(v) for v in labels})
        unknown = [v for v in seen if v not in parent]
        if unknown:
            problems.append(
                f"{len(unknown)} label(s) of the cohort are not fine classes of the tree: "
                f"{', '.join(unknown)} (tree: {', '.join(self.fine_classes)})"
            )
        bad: dict[tuple[str, str], int] = {}
        for coarse, fine in coarse_pairs:
            c, f = _label(coarse), _label(fine)
            if f in parent and parent[f] != c:
                bad[(c, f)] = bad.get((c, f), 0) + 1
        for (c, f), n in sorted(bad.items()):
            problems.append(
                f"{n} patient(s) have coarse label {c!r} with fine label {f!r}, whose parent in "
                f"the tree is {parent[f]!r}"
            )
        return problems


def tree_problems(data: object) -> list[str]:
    """Every structural problem of a parsed tree file (empty list: a valid tree)."""
    if not isinstance(data, Mapping):
        return [f"must be a mapping, got {type(data).__name__}"]
    problems: list[str] = []
    raw: object = data.get("tree", data) if "tree" in data or "levels" in data else data
    if "levels" in data:
        levels = data["levels"]
        if (
            not isinstance(levels, list | tuple)
            or len(levels) != 2
            or not all(isinstance(v, str) and v for v in levels)
        ):
            problems.append(f"levels must be two column names [coarse, fine], got {levels!r}")
        unknown_keys = sorted(set(map(str, data)) - {"levels", "tree"})
        if unknown_keys:
            problems.append(f"unknown keys {unknown_keys} (expected levels and tree)")
    if not isinstance(raw, Mapping) or not raw:
        return [*problems, "tree must map each coarse class to a list of fine classes"]
    parents: dict[str, list[str]] = {}
    coarse_names = [_label(c) for c in raw]
    for coarse, fines in raw.items():
        c = _label(coarse)
        if not c.strip():
            problems.append("class names must be non-empty")
        if not isinstance(fines, list | tuple) or not fines:
            problems.append(f"coarse class {c!r} needs a non-empty list of fine classes")
            continue
        names = [_label(f) for f in fines]
        for f in sorted({f for f in names if names.count(f) > 1}):
            problems.append(f"fine class {f!r} is listed twice under {c!r}")
        for f in dict.fromkeys(names):
            if not f.strip():
                problems.append(f"coarse class {c!r} has an empty fine class name")
            parents.setdefault(f, []).append(c)
    for f, ps in parents.items():
        if len(ps) > 1:
            problems.append(f"fine class {f!r} has {len(ps)} parents: {', '.join(ps)}")
    both = sorted(set(coarse_names) & set(parents))
    if both:
        problems.append(f"names used at both levels: {', '.join(both)}")
    if len(coarse_names) < 2:
        problems.append("a tree needs at least 2 coarse classes")
    return problems


def parse_label_tree(data: object, source: str | None = None) -> LabelTree:
    """A :class:`LabelTree` from a parsed mapping; every problem listed in one error."""
    problems = tree_problems(data)
    if problems:
        raise LabelTreeError(problems, source)
    assert isinstance(data, Mapping)
    raw = data.get("tree", data) if "tree" in data or "levels" in data else data
    levels = data.get("levels")
    return LabelTree(
        tree=tuple((_label(c), tuple(_label(f) for f in fines)) for c, fines in raw.items()),
        levels=None if levels is None else (str(levels[0]), str(levels[1])),
    )


def load_label_tree(path: str | os.PathLike[str]) -> LabelTree:
    """Read and validate a label tree file (YAML or JSON)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise LabelTreeError([f"cannot be read: {exc.strerror or exc}"], str(p)) from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LabelTreeError([f"is not valid YAML: {exc}"], str(p)) from None
    return parse_label_tree(data, str(p))


__all__ = ["LabelTree", "LabelTreeError", "load_label_tree", "parse_label_tree", "tree_problems"]
