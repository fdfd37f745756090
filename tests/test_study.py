"""Study files: what `oncoslide init` writes loads back to the same values and text, relative
paths follow the file, every unknown key is reported at once, and runs' recorded data paths
read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from oncoslide.cohort.omics import load_omics
from oncoslide.cohort.table import load_cohort
from oncoslide.errors import ConfigError, StudyError
from oncoslide.study import (
    DATA_PATHS_FILE,
    DataPaths,
    is_study_file,
    load_study,
    read_data_paths,
    record_data_paths,
    study_template,
    write_study,
)


def test_init_writes_a_commented_file_that_loads_and_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    outside = tmp_path / "archive" / "slides"
    file = write_study(
        folder,
        paths={"cohort": folder / "tables" / "c.csv", "slides": outside},
        extract={"encoder": "uni", "mpp": 0.25},
        tasks=["survival", "msi"],
        train={"model": "transmil"},
    )
    assert file == folder / "study.yaml"
    text = file.read_text()
    raw = yaml.safe_load(text)
    # inside the study folder: relative (the folder stays movable); outside: absolute
    assert raw["paths"]["cohort"] == "tables/c.csv"
    assert raw["paths"]["slides"] == str(outside)
    # every key is explained on its line
    for section in ("paths", "extract", "train"):
        for key in raw[section]:
            line = next(ln for ln in text.splitlines() if ln.startswith(f"  {key}:"))
            assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, line
    assert "# simulate:" in text  # the optional section is shown, commented out

    study = load_study(file)
    assert study.paths.cohort == folder / "tables" / "c.csv"
    assert study.paths.slides == outside
    assert study.paths.features == folder / "features" and study.paths.runs == folder / "runs"
    assert study.paths.omics is None and study.paths.bench_spec is None
    assert study.extract.encoder == "uni" and study.extract.mpp == 0.25
    assert study.extract.patch_size == 224
    assert study.tasks == ["survival", "msi"]
    assert study.train_settings() == {"model": "transmil", "folds": 5, "seed": 0}

    # the loaded values write the same file again
    again = study_template(
        folder,
        paths={k: v for k, v in study.paths.model_dump().items() if v is not None},
        extract={k: v for k, v in study.extract.model_dump().items() if v is not None},
        tasks=study.tasks,
        train=study.train_settings(),
    )
    assert again == text


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    file = write_study(tmp_path, tasks=["msi"])
    file.write_text(file.read_text() + "# my edits\n")
    with pytest.raises(ConfigError, match=r"already exists.*--force"):
        write_study(tmp_path, tasks=["survival"])
    assert "# my edits" in file.read_text()
    write_study(tmp_path / "study.yaml", force=True, tasks=["survival"])
    assert load_study(file).tasks == ["survival"] and "# my edits" not in file.read_text()
    named = write_study(tmp_path / "other.yml")  # a file name instead of a folder
    assert named.name == "other.yml" and load_study(named).tasks == ["survival"]


def test_relative_paths_follow_the_file_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "study.yaml").write_text(
        "paths:\n  cohort: ../tables/cohort.csv\n  features: ~/feats\n"
        "extract:\n  weights: w/uni.bin\ntrain:\n  init: models/m\n"
    )
    monkeypatch.chdir("/")  # not the study's folder
    study = load_study(folder / "study.yaml")
    assert study.paths.cohort == tmp_path / "tables" / "cohort.csv"
    assert study.paths.features == Path("~/feats").expanduser()
    assert study.extract.weights == folder / "w" / "uni.bin"
    assert study.train["init"] == str(folder / "models" / "m")


def test_every_unknown_key_and_bad_value_is_listed_at_once(tmp_path: Path) -> None:
    file = tmp_path / "study.yaml"
    file.write_text(
        "pathz: {}\n"
        "paths:\n  cohrt: c.csv\n"
        "extract:\n  encodr: uni\n  mpp: -1\n"
        "train:\n  modle: abmil\n  task: []\n"
        "simulate: 3\n"
    )
    with pytest.raises(StudyError) as caught:
        load_study(file)
    problems = caught.value.problems
    text = str(caught.value)
    assert str(file) in text and len(problems) == 7, problems
    for needle in ("'pathz'", "'paths.cohrt'", "'extract.encodr'", "extract.mpp", "train.modle",
                   "train.task", "simulate: must be a mapping"):  # fmt: skip
        assert any(needle in p for p in problems), (needle, problems)
    assert any("paths keys: slides, features, cohort" in p for p in problems)


def test_a_plain_settings_file_is_a_study_with_only_training_settings(tmp_path: Path) -> None:
    """What `train --config` read before studies existed: values used as they are."""
    file = tmp_path / "run.yaml"
    file.write_text("task: survival\nmodel: mean\ninit: models/m\nnot_a_setting: 1\n")
    assert not is_study_file(file)
    study = load_study(file)
    assert study.train == {"task": "survival", "model": "mean", "init": "models/m",
                           "not_a_setting": 1}  # fmt: skip
    assert study.paths.cohort is None and study.tasks == ["survival"]
    # a run's config.json given back as settings: its "config" mapping
    run_config = tmp_path / "config.json"
    run_config.write_text(json.dumps({"run_key": "abc", "config": {"task": "msi", "folds": 3}}))
    assert load_study(run_config).train == {"task": "msi", "folds": 3}
    (tmp_path / "s.yaml").write_text("paths:\n")  # a study whose sections are all commented out
    assert is_study_file(tmp_path / "s.yaml") and load_study(tmp_path / "s.yaml").train == {}


def test_an_input_the_study_names_must_exist(tmp_path: Path) -> None:
    file = tmp_path / "study.yaml"
    file.write_text("paths:\n  cohort: gone.csv\n  runs: not-yet\n")
    study = load_study(file)
    with pytest.raises(ConfigError, match=r"gone.csv does not exist \(named by paths.cohort in"):
        study.path("cohort")
    assert study.path("runs") == tmp_path / "not-yet"  # outputs need not exist


def test_recorded_data_paths_read_back(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features", check_features=False)
    omics = load_omics(tiny_cohort / "omics.csv", tiny_cohort / "gene_groups.json")
    paths = DataPaths.of(cohort, {"omics": omics.subset(omics.patient_ids[:5])}, "slides")
    assert paths.cohort == str(tiny_cohort / "cohort.csv")
    assert paths.features == str(tiny_cohort / "features")
    assert paths.omics == str(tiny_cohort / "omics.csv")
    assert paths.gene_groups == str(tiny_cohort / "gene_groups.json")
    assert paths.mutations is None and paths.slides == os.path.abspath("slides")
    record_data_paths(tmp_path, paths)
    assert read_data_paths(tmp_path) == paths

    empty = tmp_path / "empty"
    record_data_paths(empty, DataPaths())  # nothing known: nothing written
    assert not (empty / DATA_PATHS_FILE).exists() and read_data_paths(empty) is None
    (tmp_path / DATA_PATHS_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot read .*paths\.json"):
        read_data_paths(tmp_path)


def test_the_documented_file_is_what_init_writes() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "study.md").read_text()
    block = doc.split("## The file\n\n```yaml\n", 1)[1].split("```", 1)[0]
    written = study_template(".")
    assert block.strip() in written, "docs/study.md shows another file than `oncoslide init`"
