"""The command line: real subprocesses for exit codes and messages, CliRunner for the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from oncoslide.cli import app

runner = CliRunner()


def _oncoslide(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "oncoslide.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_malformed_cohort_lists_every_problem_and_exits_2_without_traceback(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    table["time"] = table["time"].astype(object)
    table.loc[0, "time"] = -5  # negative time
    table.loc[1, "event"] = 2  # event not 0/1
    table.loc[2, "time"] = "soon"  # non-numeric time
    table = pd.concat([table, table.iloc[[3]]])  # duplicate slide id
    extra = table.iloc[[4]].copy()
    extra["slide_id"] = "TCGA-XX-NOPE-01Z-00-DX1"  # no feature file
    extra["patient_id"] = "TCGA-XX-NOPE"
    table = pd.concat([table, extra])
    bad = tmp_path / "bad.csv"
    table.to_csv(bad, index=False)

    proc = _oncoslide(
        "train", "--cohort", str(bad), "--features", str(tiny_cohort / "features"),
        "--out", str(tmp_path / "run"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    err = " ".join(proc.stderr.split())
    for needle in ("negative", "not 0/1", "non-numeric", "duplicate", "TCGA-XX-NOPE-01Z-00-DX1"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_train_command_is_deterministic_and_writes_outputs(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    args = [
        "train", "--cohort", str(tiny_cohort / "cohort.csv"), "--features",
        str(tiny_cohort / "features"), "--task", "survival", "--model", "abmil", "--folds", "3",
        "--epochs", "2", "--seed", "7", "--no-progress",
    ]  # fmt: skip
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    a, b = (tmp_path / d / "metrics.csv" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    assert "c_index" in first.output and "95% CI" in first.output
    for name in ("splits.csv", "predictions.parquet", "summary.csv", "config.json"):
        assert (tmp_path / "a" / name).is_file()


def test_train_into_a_file_logs_each_epoch_while_it_runs_and_writes_run_log(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """`oncoslide train ... > log 2>&1` (a batch job): a line per epoch and fold reaches the
    file while the run goes on, not at its end, and the run folder keeps them in run.log."""
    out, log = tmp_path / "run", tmp_path / "log"
    epochs, folds = 2, 5
    cmd = [
        sys.executable, "-m", "oncoslide.cli", "train", "--cohort", str(tiny_cohort / "cohort.csv"),
        "--features", str(tiny_cohort / "features"), "--out", str(out), "--folds", str(folds),
        "--epochs", str(epochs), "--seed", "3",  # the seed names the split: "seed 3 fold k"
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    first_line = f"seed 3 fold 0 epoch 1/{epochs}:"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        seen_early = False
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if first_line in log.read_text():
                # four more folds to train: the run cannot have ended in between
                seen_early = proc.poll() is None and not (out / "summary.csv").exists()
                break
            time.sleep(0.02)
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert seen_early, f"no epoch line before the run ended:\n{text}"
    saved = (out / "run.log").read_text()
    for fold in range(folds):
        for epoch in range(1, epochs + 1):
            line = f"seed 3 fold {fold} epoch {epoch}/{epochs}: train loss "
            assert text.count(line) == 1 and saved.count(line) == 1, (line, text)
        assert f"seed 3 fold {fold} done ({fold + 1}/{folds}): c_index " in saved
    # plain lines: no bar drawn into the file (the summary table follows the last line)
    progress = text[: text.index("finished: c_index")]
    assert f"fold {folds - 1} epoch {epochs}/" in progress
    assert "━" not in progress and "\x1b" not in text
    assert "==== cross-validation" in saved and "command: oncoslide train" in saved


def test_train_classification_by_label_column(tiny_cohort: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            "--cohort",
            str(tiny_cohort / "cohort.csv"),
            "--features",
            str(tiny_cohort / "features"),
            "--task",
            "msi",
            "--model",
            "mean",
            "--folds",
            "3",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    preds = pd.read_parquet(tmp_path / "r" / "predictions.parquet")
    assert {"prob_0", "prob_1", "label"} <= set(preds.columns)


def test_train_reads_a_yaml_config_and_flags_override_it(tiny_cohort: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("task: survival\nmodel: mean\nfolds: 3\nepochs: 1\nsurvival_loss: nll\n")
    result = runner.invoke(
        app,
        [
            "train",
            "--cohort",
            str(tiny_cohort / "cohort.csv"),
            "--features",
            str(tiny_cohort / "features"),
            "--config",
            str(cfg),
            "--model",
            "abmil",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    resolved = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert resolved["model"] == "abmil" and resolved["survival_loss"] == "nll"
    assert resolved["epochs"] == 1


def test_bad_settings_are_reported_together(tiny_cohort: Path, tmp_path: Path) -> None:
    proc = _oncoslide(
        "train", "--cohort", str(tiny_cohort / "cohort.csv"), "--features",
        str(tiny_cohort / "features"), "--out", str(tmp_path / "r"), "--folds", "1",
        "--lr", "-1", "--model", "abmil",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "folds" in proc.stderr and "lr" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _oncoslide(
        "train", "--cohort", str(tiny_cohort / "cohort.csv"), "--features",
        str(tiny_cohort / "features"), "--out", str(tmp_path / "r"), "--model", "nosuchmodel",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown model 'nosuchmodel'" in proc.stderr and "abmil" in proc.stderr


def test_simulate_and_validate_commands(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    result = runner.invoke(
        app,
        [
            "simulate",
            str(out),
            "--patients",
            "12",
            "--cohorts",
            "2",
            "--dim",
            "8",
            "--patches",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "cohort.csv").is_file() and (out / "cohort_permuted.csv").is_file()
    result = runner.invoke(
        app,
        [
            "validate",
            "--cohort",
            str(out / "cohort.csv"),
            "--features",
            str(out / "features"),
            "--omics",
            str(out / "omics.csv"),
            "--gene-groups",
            str(out / "gene_groups.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "12 patients" in result.output
    again = runner.invoke(app, ["simulate", str(out), "--patients", "12"])
    assert again.exit_code == 2  # refuses to overwrite without --overwrite


def test_models_command_lists_the_registry() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("abmil", "abmil_plain", "mean", "max", "transmil"):
        assert name in result.output


def test_train_options_come_from_the_config_model() -> None:
    """Every TrainConfig field has its --option (or its documented special form)."""
    from oncoslide.training.config import TrainConfig

    help_text = " ".join(_oncoslide("train", "--help").stdout.split())
    special = {
        "model_kwargs": "--model-arg",
        "aux_weights": "--aux-weight",
        "freeze": "--freeze",
        "progress": "--no-progress",
        "cache_dtype": "--cache-float16",
    }
    for name in TrainConfig.model_fields:
        flag = special.get(name, "--" + name.replace("_", "-"))
        assert flag in help_text, flag
    for alias in ("--loss", "--bins", "--patience", "-t", "-m"):  # earlier releases' names
        assert alias in help_text


def test_fit_all_predict_and_init_from_the_command_line(tiny_cohort: Path, tmp_path: Path) -> None:
    common = [
        "--cohort", str(tiny_cohort / "cohort.csv"), "--features", str(tiny_cohort / "features"),
    ]  # fmt: skip
    fit = runner.invoke(
        app,
        ["train", *common, "--out", str(tmp_path / "model"), "--fit-all", "--epochs", "1",
         "--model-arg", "hidden_dim=32"],
    )  # fmt: skip
    assert fit.exit_code == 0, fit.output
    assert "oncoslide predict" in " ".join(fit.output.split())
    # not a terminal: a plain line per epoch on the console, and in the model folder's run.log
    assert "all patients epoch 1/1: train loss" in fit.output
    assert "all patients epoch 1/1: train loss" in (tmp_path / "model" / "run.log").read_text()
    import json

    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["model"]["kwargs"] == {"hidden_dim": 32} and meta["model"]["embed_dim"] == 32
    pred = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "model"),
            *common,
            "--out",
            str(tmp_path / "p"),
            "--no-progress",
        ],
    )
    assert pred.exit_code == 0, pred.output
    assert "Harrell's C on this cohort" in pred.output
    assert (tmp_path / "p" / "predictions.parquet").is_file()
    tuned = runner.invoke(
        app,
        ["train", *common, "--out", str(tmp_path / "tuned"), "--task", "msi", "--folds", "2",
         "--epochs", "1", "--init", str(tmp_path / "model"), "--freeze", "encoder",
         "--model-arg", "hidden_dim=32", "--no-progress"],
    )  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    # --no-progress: no epoch lines on the console; run.log has them all the same
    assert "epoch 1/1" not in tuned.output
    assert "seed 0 fold 1 epoch 1/1:" in (tmp_path / "tuned" / "run.log").read_text()
    run_pred = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "tuned"),
            *common,
            "--out",
            str(tmp_path / "q"),
            "--no-progress",
        ],
    )
    assert run_pred.exit_code == 2 and "--fold" in run_pred.output
    run_pred = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "tuned"),
            *common,
            "--fold",
            "1",
            "--out",
            str(tmp_path / "q"),
            "--no-progress",
        ],
    )
    assert run_pred.exit_code == 0, run_pred.output
    assert "AUC on this cohort" in run_pred.output
    bad = _oncoslide(
        "train", *common, "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "model"),
        "--freeze", "decoder", "--model-arg", "hidden_dim=32", "--epochs", "1", "--no-progress",
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "decoder" in bad.stderr and "encoder" in bad.stderr


class _Pickled:
    """A Python object in a .pt feature file: refused, it is not tensors or arrays."""


def test_validate_refuses_a_pt_file_with_python_code_and_says_how_to_resave(
    tmp_path: Path,
) -> None:
    import pickle

    import torch

    features = tmp_path / "features"
    features.mkdir()
    torch.save({"features": _Pickled()}, features / "s1.pt", pickle_module=pickle)
    pd.DataFrame({"patient_id": ["p1"], "slide_id": ["s1"]}).to_csv(tmp_path / "c.csv")
    proc = _oncoslide("validate", "--cohort", str(tmp_path / "c.csv"), "--features", str(features))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    err = " ".join(proc.stderr.split())
    assert "s1: contains Python code" in err and "was not loaded, for safety" in err
    assert "torch.save(features_tensor, path)" in err
    assert "weights_only=False" not in err and "set to `False`" not in err


def test_stamp_files_as_stamp_writes_them_validate_and_train(
    stamp_cohort: Path, tmp_path: Path
) -> None:
    # STAMP records no slide resolution and nothing asks for one; P00's second slide is empty:
    # the patient is kept with its other slide, and both commands name the empty slide.
    common = ["--cohort", str(stamp_cohort / "cohort.csv")]
    common += ["--features", str(stamp_cohort / "features")]
    checked = runner.invoke(app, ["validate", *common])
    assert checked.exit_code == 0, checked.output
    assert "12 patients, 13 slides" in checked.output
    assert "1 slide(s) have an empty feature file (no patches)" in checked.output
    assert "P00-S2" in checked.output
    trained = runner.invoke(
        app,
        [
            "train", *common, "--model", "abmil", "--folds", "2", "--epochs", "1",
            "--out", str(tmp_path / "run"), "--no-progress",
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "empty feature file" in trained.output and "P00-S2" in trained.output
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert sorted(preds["patient_id"]) == [f"P{i:02d}" for i in range(12)]


# ------------------------------------------------------------------ help, version, listings


def _commands(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, object]]:
    """Every command of the click tree typer builds, with its name path."""
    subs = getattr(command, "commands", None)
    if not subs:
        return [(" ".join(path), command)]
    found = []
    for name, sub in subs.items():
        found += _commands(sub, (*path, name))
    return found


def test_every_option_with_a_default_shows_it_in_help() -> None:
    import typer

    from oncoslide.training.config import TrainConfig

    tree = _commands(typer.main.get_command(app))
    assert {"extract", "train", "bench run", "zoo train"} <= {name for name, _ in tree}
    fields = TrainConfig.model_fields
    for name, command in tree:
        for param in command.params:  # type: ignore[attr-defined]
            if param.param_type_name != "option" or param.name == "help":
                continue
            field = fields.get(param.name) if name == "train" else None
            if field is not None and param.default is None and not field.is_required():
                # generated train options default to None ("not given": a --config file's value
                # stands); help shows the field's default instead
                default = field.get_default(call_default_factory=True)
                if default not in (None, [], {}):
                    assert isinstance(param.show_default, str), (name, param.name)
            elif param.default not in (None, False, (), []):
                assert param.show_default, (name, param.name, param.default)


def test_train_help_shows_generated_defaults_and_keeps_bracketed_text() -> None:
    text = " ".join(_oncoslide("train", "--help").stdout.split())
    assert "[cox | nll] [default: (cox)]" in text  # the choices were once dropped as markup
    assert "[loss | metric] [default: (loss)]" in text
    assert "[default: (20)]" in text and "[default: (prefetch)]" in text


def test_version_prints_the_package_version() -> None:
    from oncoslide import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"oncoslide {__version__}"


def test_models_says_which_models_have_attention() -> None:
    from oncoslide.models import MODELS

    lines = _oncoslide("models").stdout.splitlines()
    assert "attention" in lines[1] and "inputs" in lines[1]
    rows = {line.split()[1]: line.split()[3] for line in lines if line.startswith("│ ")}
    rows = {k: v for k, v in rows.items() if k in MODELS}
    assert rows == {
        name: "yes" if MODELS.metadata(name).get("has_attention") else "no" for name in MODELS
    }
    assert rows["abmil"] == "yes" and rows["mean"] == "no"
    assert "oncoslide heatmap" in lines[-1]


def test_validate_ends_with_a_summary(tiny_cohort: Path, tmp_path: Path) -> None:
    # a folder name with square brackets is printed whole (not read as markup)
    features = tmp_path / "features[efficientnet]"
    features.symlink_to(tiny_cohort / "features", target_is_directory=True)
    table = pd.read_csv(tiny_cohort / "cohort.csv")
    patients = table.drop_duplicates("patient_id")
    events = int(patients["event"].sum())
    result = runner.invoke(
        app,
        ["validate", "--cohort", str(tiny_cohort / "cohort.csv"), "--features", str(features),
         "--task", "survival", "--task", "subtype"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tail = " ".join(result.output[result.output.index("summary") :].split())
    counts = patients["subtype"].value_counts()
    classes = ", ".join(
        f"{k} {counts[k]} ({counts[k] / len(patients):.0%})" for k in sorted(counts.index)
    )
    assert tail == (
        f"summary patients {len(patients)} ({len(table)} slides) "
        f"survival {events} events ({events / len(patients):.0%}), "
        f"{len(patients) - events} censored "
        f"classes of subtype {classes} "
        f"features oncoslide layout, encoder simulated, dim 16, 224 px patches at 0.5 µm/px "
        f"in {features}"
    )
