"""`--config study.yaml` on the command line: every command takes the study's paths for the
options it is not given (the command line wins), train runs each of the study's tasks, and a
run records its data so that `oncoslide heatmap RUN -p ID` needs nothing else."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from oncoslide.cli import app
from oncoslide.features.schema import PatchGrid, write_feature_file
from oncoslide.training import make_config

runner = CliRunner()


def _invoke(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _set_train(study: Path, **settings: object) -> None:
    """Edit the train section of a study file (comments are not needed by the tests)."""
    data = yaml.safe_load(study.read_text())
    data["train"].update(settings)
    study.write_text(yaml.safe_dump(data, sort_keys=False))


class Reached(Exception):
    """Raised by a stand-in for a library function: the command called it with these."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("reached")
        self.call_args, self.call_kwargs = args, kwargs


def _stand_in(monkeypatch: pytest.MonkeyPatch, target: str, result: Any = Reached) -> None:
    module, name = target.rsplit(".", 1)

    def fake(*args: Any, **kwargs: Any) -> Any:
        if result is Reached:
            raise Reached(*args, **kwargs)
        return result

    monkeypatch.setattr(importlib.import_module(module), name, fake)


# ------------------------------------------------------------------------ every command


@pytest.fixture
def study(tiny_cohort: Path, tmp_path: Path) -> dict[str, Path]:
    """A study naming the tiny cohort's tables and features, a slides folder, a benchmark
    spec and output folders; and another set of the same kinds for the command line."""
    folder = tmp_path / "study"
    (folder / "slides").mkdir(parents=True)
    (folder / "bench.yaml").write_text("name: x\n")
    result = _invoke(
        "init", folder, "--cohort", tiny_cohort / "cohort.csv",
        "--features", tiny_cohort / "features", "--omics", tiny_cohort / "omics.csv",
        "--gene-groups", tiny_cohort / "gene_groups.json", "--encoder", "resnet50-trunc",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = (folder / "study.yaml").read_text()
    text = text.replace("bench_spec: null", "bench_spec: bench.yaml")
    (folder / "study.yaml").write_text(text.replace("mpp: 0.5", "mpp: 1.0"))
    other = tmp_path / "cli"
    (other / "slides").mkdir(parents=True)
    (other / "feats").mkdir()
    (other / "c.csv").write_text("patient_id,slide_id\n")
    (other / "spec.yaml").write_text("name: y\n")
    return {
        "file": folder / "study.yaml", "cohort": tiny_cohort / "cohort.csv",
        "features": tiny_cohort / "features", "slides": folder / "slides",
        "bench_spec": folder / "bench.yaml", "bench": folder / "bench",
        "cli_cohort": other / "c.csv", "cli_features": other / "feats",
        "cli_slides": other / "slides", "cli_spec": other / "spec.yaml", "cli_out": other / "out",
    }  # fmt: skip


def _cohort_call(call: Reached) -> tuple[Path, ...]:
    return (Path(call.call_args[0]), Path(call.call_args[1]))


# command, its arguments besides --config and the paths, the library call stood in for (with
# what it returns, or Reached to stop there), what the call got, and the paths it should get
# from the study / from the command line
Case = tuple[
    str,
    list[str],
    dict[str, Any],
    Callable[[Reached], tuple[Path, ...]],
    Callable[[dict[str, Path]], tuple[list[str], tuple[Path, ...]]],
]
CASES: dict[str, Case] = {
    "validate": (
        "validate", [], {"oncoslide.cli._load_cohort": Reached}, _cohort_call,
        lambda s: (["--cohort", s["cli_cohort"], "--features", s["cli_features"]],
                   (s["cli_cohort"], s["cli_features"])),
    ),
    "train": (
        "train", ["--out", "unused", "--no-progress"], {"oncoslide.cli._load_cohort": Reached},
        _cohort_call,
        lambda s: (["--cohort", s["cli_cohort"], "--features", s["cli_features"]],
                   (s["cli_cohort"], s["cli_features"])),
    ),
    "zoo train": (
        "zoo train", ["--out", "unused"], {"oncoslide.cli._load_cohort": Reached}, _cohort_call,
        lambda s: (["--cohort", s["cli_cohort"], "--features", s["cli_features"]],
                   (s["cli_cohort"], s["cli_features"])),
    ),
    "transfer matrix": (
        "transfer matrix", ["--zoo", "z", "--out", "unused"],
        {"oncoslide.transfer.load_zoo": None, "oncoslide.cli._load_cohort": Reached},
        _cohort_call,
        lambda s: (["--cohort", s["cli_cohort"], "--features", s["cli_features"]],
                   (s["cli_cohort"], s["cli_features"])),
    ),
    "bench shuffle-features": (
        "bench shuffle-features", ["--out", "unused"],
        {"oncoslide.bench.shuffle.shuffle_features": Reached}, _cohort_call,
        lambda s: (["--cohort", s["cli_cohort"], "--features", s["cli_features"]],
                   (s["cli_cohort"], s["cli_features"])),
    ),
    "extract": (
        "extract", [],
        {"oncoslide.features.extract.find_slides": [],
         "oncoslide.features.extract.extract_slides": Reached},
        lambda c: (Path(c.call_args[1]),),
        lambda s: (["--out", s["cli_out"]], (s["cli_out"],)),
    ),
    "bench run": (
        "bench run", [],
        {"oncoslide.bench.spec.load_spec": "the spec",
         "oncoslide.bench.runner.run_benchmark": Reached},
        lambda c: (Path(c.call_args[1]),),
        lambda s: ([s["cli_spec"], "--out", s["cli_out"]], (s["cli_out"],)),
    ),
    "bench leaderboard": (
        "bench leaderboard", [], {"oncoslide.bench.report.build_leaderboard": Reached},
        lambda c: (Path(c.call_args[0]),),
        lambda s: ([s["cli_out"]], (s["cli_out"],)),
    ),
}  # fmt: skip
FROM_STUDY = {
    "extract": lambda s: (s["features"],),  # the feature folder is what extract writes
    "bench run": lambda s: (s["bench"],),
    "bench leaderboard": lambda s: (s["bench"],),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_command_takes_the_study_paths_and_the_command_line_wins(
    name: str, study: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    command, extra, stand_ins, got, cli = CASES[name]
    for target, result in stand_ins.items():
        _stand_in(monkeypatch, target, result)
    want = FROM_STUDY.get(name, lambda s: (s["cohort"], s["features"]))(study)
    result = _invoke(*command.split(), *extra, "--config", study["file"])
    assert isinstance(result.exception, Reached), result.output
    assert got(result.exception) == want

    options, want_cli = cli(study)
    result = _invoke(*command.split(), *options, *extra, "--config", study["file"])
    assert isinstance(result.exception, Reached), result.output
    assert got(result.exception) == want_cli


def test_extract_takes_the_study_settings_and_the_command_line_wins(
    study: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    found: list[Path] = []
    monkeypatch.setattr(
        importlib.import_module("oncoslide.features.extract"),
        "find_slides",
        lambda slides: found.append(Path(slides)) or [],
    )
    _stand_in(monkeypatch, "oncoslide.features.extract.extract_slides")
    result = _invoke("extract", "--config", study["file"])
    config = result.exception.call_args[2]
    assert found == [study["slides"]]
    assert (config.encoder, config.target_mpp, config.patch_size) == ("resnet50-trunc", 1.0, 224)
    result = _invoke(
        "extract", "--config", study["file"], "--slides", study["cli_slides"],
        "--encoder", "efficientnet-lite0", "--mpp", "0.5", "--patch-size", "256",
    )  # fmt: skip
    config = result.exception.call_args[2]
    assert found[-1] == study["cli_slides"]
    assert (config.encoder, config.target_mpp, config.patch_size) == (
        "efficientnet-lite0",
        0.5,
        256,
    )


def test_a_missing_path_names_the_option_and_the_study(study: dict[str, Path]) -> None:
    plain = _invoke("validate")
    assert plain.exit_code == 2
    assert "give --cohort, or a study file naming paths.cohort with --config" in plain.output
    text = study["file"].read_text().replace(f"cohort: {study['cohort']}", "cohort: gone.csv")
    study["file"].write_text(text)
    gone = _invoke("validate", "--config", study["file"])
    assert gone.exit_code == 2
    message = " ".join(gone.output.split())
    assert "gone.csv does not exist (named by paths.cohort in" in message
    assert "study.yaml" in message
    bad = study["file"].parent / "bad.yaml"
    bad.write_text("paths:\n  cohrt: c.csv\ntrain:\n  modle: x\n")
    refused = _invoke("train", "--config", bad)
    assert refused.exit_code == 2
    assert "'paths.cohrt'" in refused.output and "train.modle" in refused.output


# ------------------------------------------------------------------------ real runs


def test_train_runs_each_study_task_into_its_folder_and_predict_uses_the_study(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    made = _invoke(
        "init", folder, "--cohort", tiny_cohort / "cohort.csv", "--features",
        tiny_cohort / "features", "--task", "survival", "--task", "msi", "--model", "mean",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    file = folder / "study.yaml"
    _set_train(file, folds=2, epochs=1, n_boot=0)
    result = _invoke("train", "--config", file, "--no-progress")
    assert result.exit_code == 0, result.output
    for task in ("survival", "msi"):
        run = folder / "runs" / task
        payload = json.loads((run / "config.json").read_text())
        assert payload["config"]["task"] == task and payload["config"]["model"] == "mean"
        # the study's settings make the same run as the same settings given as options
        want = make_config(task=task, model="mean", folds=2, epochs=1, n_boot=0, seed=0)
        assert payload["run_key"] == want.run_key()
        recorded = json.loads((run / "paths.json").read_text())
        assert recorded["cohort"] == str(tiny_cohort / "cohort.csv")
        assert recorded["features"] == str(tiny_cohort / "features")
        assert recorded["slides"] is None  # the study's slides folder does not exist
        assert "paths.json" not in payload  # recorded beside the run, not in its settings

    # the command line wins: one task, another model, another folder
    other = tmp_path / "other"
    result = _invoke(
        "train", "--config", file, "--task", "msi", "--model", "max", "--out", other,
        "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((other / "config.json").read_text())["config"]["model"] == "max"
    assert not (other / "msi").exists() and not (folder / "runs" / "max").exists()

    # --fit-all goes to runs/<task>-fit-all and records its data too; predict reads the study
    fit = _invoke("train", "--config", file, "--task", "survival", "--fit-all", "--no-progress")
    assert fit.exit_code == 0, fit.output
    model = folder / "runs" / "survival-fit-all"
    assert json.loads((model / "paths.json").read_text())["cohort"] == str(
        tiny_cohort / "cohort.csv"
    )
    preds = _invoke("predict", model, "--config", file, "--out", tmp_path / "p", "--no-progress")
    assert preds.exit_code == 0, preds.output
    table = pd.read_parquet(tmp_path / "p" / "predictions.parquet")
    assert len(table) == len(set(pd.read_csv(tiny_cohort / "cohort.csv")["patient_id"]))


def test_validate_checks_the_columns_of_the_study_tasks(tiny_cohort: Path, tmp_path: Path) -> None:
    made = _invoke(
        "init", tmp_path, "--cohort", tiny_cohort / "cohort.csv", "--features",
        tiny_cohort / "features", "--task", "msi", "--task", "no_such_label",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    result = _invoke("validate", "--config", tmp_path / "study.yaml")
    assert result.exit_code == 2 and "no_such_label" in result.output


def test_simulate_writes_the_cohort_the_study_names(tmp_path: Path) -> None:
    assert _invoke("init", tmp_path / "s").exit_code == 0
    file = tmp_path / "s" / "study.yaml"
    file.write_text(
        file.read_text()
        + "simulate:\n  n_patients: 12\n  n_cohorts: 2\n  feature_dim: 8\n"
        + "  patches_median: 10\n  patches_min: 4\n  patches_max: 40\n"
    )
    result = _invoke("simulate", "--config", file)
    assert result.exit_code == 0, result.output
    assert len(set(pd.read_csv(tmp_path / "s" / "cohort.csv")["patient_id"])) == 12
    checked = _invoke("validate", "--config", file)
    assert checked.exit_code == 0 and "12 patients" in checked.output
    # a study whose cohort is not where a simulation writes: the folder must be named
    file.write_text(file.read_text().replace("cohort: cohort.csv", "cohort: tables/c.csv"))
    refused = _invoke("simulate", "--config", file, "--overwrite")
    assert refused.exit_code == 2 and "name the folder OUT" in " ".join(refused.output.split())


# ------------------------------------------------------------------------ heatmap alone

SVS_W, SVS_H, SVS_MPP, PATCH = 2220, 2967, 0.499, 256


@pytest.fixture(scope="module")
def slide_study(svs_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 patients whose feature files describe the bundled slide (and record its path)."""
    out = tmp_path_factory.mktemp("slide-study")
    rng = np.random.default_rng(1)
    xs, ys = np.meshgrid(np.arange(0, SVS_W - PATCH, PATCH), np.arange(0, SVS_H - PATCH, PATCH))
    coords = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)
    grid = PatchGrid(
        patch_size=PATCH, patch_size_level0=PATCH, target_mpp=SVS_MPP, level0_mpp=SVS_MPP,
        level0_width=SVS_W, level0_height=SVS_H,
    )  # fmt: skip
    rows = []
    for i in range(12):
        risk = rng.normal()
        feats = rng.normal(size=(len(coords), 8)).astype(np.float32)
        feats[:, 0] += risk
        sid = f"P{i:02d}-S1"
        write_feature_file(
            out / "features" / f"{sid}.h5", feats, coords, grid=grid, encoder="planted",
            attrs={"slide_path": str(svs_path)},
        )  # fmt: skip
        rows.append({"patient_id": f"P{i:02d}", "slide_id": sid,
                     "time": rng.exponential(np.exp(-risk)), "event": 1})  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "cohort.csv", index=False)
    run = _invoke(
        "train", "--cohort", out / "cohort.csv", "--features", out / "features",
        "--out", out / "runs" / "x", "--model", "abmil", "--folds", "3", "--epochs", "2",
        "--batch-size", "4", "--model-arg", "hidden_dim=16", "--model-arg", "attn_dim=8",
        "--no-progress",
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    return out


def test_heatmap_with_only_the_run_and_a_patient_draws_the_map(slide_study: Path) -> None:
    run = slide_study / "runs" / "x"
    result = _invoke("heatmap", run, "-p", "P03", "--max-side", "300")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "out-of-fold" in output and "as recorded by the run" in output
    assert "slide file not found" not in output  # drawn on the slide itself
    png = run / "heatmaps" / "P03" / "P03-S1.png"
    assert png.is_file() and (run / "heatmaps" / "P03" / "attention.csv").is_file()
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 200 and image.std() > 10  # a picture, not a blank page


def test_heatmap_says_which_recorded_path_is_gone_and_what_to_pass(
    slide_study: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(slide_study / "runs" / "x", run)
    record = json.loads((run / "paths.json").read_text())
    record["cohort"] = str(tmp_path / "moved.csv")
    (run / "paths.json").write_text(json.dumps(record))
    gone = _invoke("heatmap", run, "-p", "P03")
    message = " ".join(gone.output.split())
    assert gone.exit_code == 2
    assert f"{tmp_path / 'moved.csv'}" in message and "no longer exists: give --cohort" in message
    # the option still works, and the recorded features are used beside it
    given = _invoke("heatmap", run, "-p", "P03", "--cohort", slide_study / "cohort.csv",
                    "--max-side", "200", "--out", tmp_path / "maps")  # fmt: skip
    assert given.exit_code == 0, given.output
    assert (tmp_path / "maps" / "P03" / "P03-S1.png").is_file()
    # a run of an earlier release records nothing
    (run / "paths.json").unlink()
    old = _invoke("heatmap", run, "-p", "P03")
    assert old.exit_code == 2
    assert "give --cohort" in old.output and "does not record its data paths" in " ".join(
        old.output.split()
    )
