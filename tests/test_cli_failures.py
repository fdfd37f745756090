"""File-system failures and damaged run folders end in one line and exit code 2, never in a
traceback, and leave nothing half-written marked done."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from oncoslide.cli import app

runner = CliRunner()
QUICK = ["--folds", "2", "--epochs", "1", "--n-boot", "10", "--no-progress"]


def _one_line_error(result: Result) -> str:
    """The only line on stderr, after checking that the command failed cleanly with code 2."""
    assert result.exit_code == 2, result.output
    # CliRunner keeps an escaped exception in .exception (exit code 1): only typer.Exit is clean
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-fold run of the tiny cohort (an attention model, for `heatmap` too)."""
    from oncoslide.cohort import load_cohort
    from oncoslide.training import cross_validate, make_config

    out = tmp_path_factory.mktemp("failures") / "run"
    cohort = load_cohort(tiny_cohort / "cohort.csv", tiny_cohort / "features")
    config = make_config(
        task="survival", model="abmil", folds=2, epochs=1, n_boot=10, progress=False
    )
    cross_validate(cohort, config, out)
    return out


def _data(tiny_cohort: Path) -> list[str]:
    return [
        "--cohort",
        str(tiny_cohort / "cohort.csv"),
        "--features",
        str(tiny_cohort / "features"),
    ]


def _spec(tiny_cohort: Path, folder: Path) -> Path:
    spec = {
        "name": "tiny",
        "cohort": str(tiny_cohort / "cohort.csv"),
        "folds": 2,
        "seeds": [0],
        "feature_sets": [{"name": "real", "features": str(tiny_cohort / "features")}],
        "tasks": [{"name": "os", "kind": "survival"}],
        "models": [{"name": "linear", "protocol": "linear"}],
        "n_boot": 10,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# Each command with an output folder, given a regular file there: (name, arguments).
OUT_COMMANDS: dict[str, Callable[[Path, Path, Path, Path, Path], list[str]]] = {
    "train": lambda data, run, svs, tmp, out: ["train", *_data(data), "--out", str(out), *QUICK],
    "train --fit-all": lambda data, run, svs, tmp, out: [
        "train", *_data(data), "--fit-all", "--out", str(out), *QUICK,
    ],
    "extract": lambda data, run, svs, tmp, out: [
        "extract", "--slides", str(svs), "--out", str(out), "--workers", "0", "--no-progress",
    ],
    "bench run": lambda data, run, svs, tmp, out: [
        "bench", "run", str(_spec(data, tmp)), "--out", str(out), "--workers", "0",
    ],
    "predict": lambda data, run, svs, tmp, out: [
        "predict", str(run), "--fold", "0", *_data(data), "--out", str(out), "--no-progress",
    ],
    "simulate": lambda data, run, svs, tmp, out: ["simulate", str(out), "--patients", "20"],
    "heatmap": lambda data, run, svs, tmp, out: [
        "heatmap", str(run), *_data(data), "--patient", "x", "--out", str(out),
    ],
    "bench shuffle-features": lambda data, run, svs, tmp, out: [
        "bench", "shuffle-features", *_data(data), "--out", str(out),
    ],
    "demo": lambda data, run, svs, tmp, out: ["demo", "--quick", "--out", str(out)],
}  # fmt: skip


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(
    command: str, tiny_cohort: Path, run_dir: Path, svs_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    out.write_text("a file the user keeps\n")
    args = OUT_COMMANDS[command](tiny_cohort, run_dir, svs_path, tmp_path, out)
    line = _one_line_error(runner.invoke(app, args))
    assert str(out) in line and "is a file, not a folder" in line
    assert out.read_text() == "a file the user keeps\n"
    assert not list(tmp_path.rglob(".*.tmp"))


def _fail_in_folds(monkeypatch: pytest.MonkeyPatch, where: str, code: int, text: bool) -> None:
    """Make the writes of the run's fold folders fail like a full (or locked) file system.

    ``write``: while a table is written (pyarrow's error; ``text``: its errno only in the
    message, as pyarrow reports it). ``create``: when the temporary file is made.
    """

    def error() -> OSError:
        if text:
            return OSError(
                f"Error writing bytes to file. Detail: [errno {code}] {os.strerror(code)}"
            )
        return OSError(code, os.strerror(code))

    if where == "write":
        real = pd.DataFrame.to_parquet

        def to_parquet(self: pd.DataFrame, path: Any, *args: Any, **kwargs: Any) -> Any:
            if "folds" in Path(path).parts:
                raise error()
            return real(self, path, *args, **kwargs)

        monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    else:
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> Any:
            if dir is not None and "folds" in Path(dir).parts:
                raise error()
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(
    ("where", "code", "text", "said"),
    [
        ("write", errno.ENOSPC, False, "the disk is full"),
        ("write", errno.ENOSPC, True, "the disk is full"),
        ("write", errno.EDQUOT, False, "the disk quota is exceeded"),
        ("create", errno.EROFS, False, "the file system is read-only"),
        ("create", errno.EACCES, False, "Permission denied"),
    ],
    ids=["disk-full", "disk-full-pyarrow", "quota", "read-only", "permission"],
)
def test_a_failed_write_during_training_is_one_line_and_no_fold_is_done(
    where: str,
    code: int,
    text: bool,
    said: str,
    tiny_cohort: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fail_in_folds(monkeypatch, where, code, text)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *_data(tiny_cohort), "--out", str(out), *QUICK])
    line = _one_line_error(result)
    fold = out / "folds" / "seed0-fold0"
    assert f"cannot write {fold}" in line and said in line, line
    assert not list(out.rglob("done.json"))
    assert not list(out.rglob(".*.tmp"))
    assert not (out / "metrics.csv").exists()


def test_a_full_disk_stops_extraction_in_one_line(
    svs_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "feats"
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> Any:
        # the slide's first file (its tissue mask): every later slide would fail the same way
        if dir is not None and Path(dir) == out / "masks":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    result = runner.invoke(
        app, ["extract", "--slides", str(svs_path), "--out", str(out), "--workers", "0",
              "--no-progress"],
    )  # fmt: skip
    line = _one_line_error(result)
    assert f"cannot write {out / 'masks'}" in line and "the disk is full" in line
    assert not list(out.glob("*.h5")) and not list(out.rglob(".*.tmp"))


# ------------------------------------------------------------------ damaged run folders


def _damage(config: Path, how: str) -> None:
    payload = json.loads(config.read_text())
    if how == "truncated":
        text = config.read_text()
        config.write_text(text[: len(text) // 2])
    elif how == "list":
        config.write_text("[1, 2, 3]\n")
    elif how == "no-config":
        del payload["config"]
        config.write_text(json.dumps(payload))
    else:  # settings of the wrong type, e.g. edited by hand
        payload["config"]["epochs"] = "many"
        config.write_text(json.dumps(payload))


DAMAGE_SAID = {
    "truncated": "not valid JSON",
    "list": "holds a JSON list",
    "no-config": "has no 'config'",
    "bad-settings": "invalid run settings (epochs:",
}
# train reads only the run key to resume: its config entry is rewritten from the command line
READERS = {
    "train": ("truncated", "list"),
    "predict": tuple(DAMAGE_SAID),
    "heatmap": tuple(DAMAGE_SAID),
}


@pytest.mark.parametrize(
    ("command", "how"), [(c, how) for c, hows in READERS.items() for how in hows]
)
def test_a_damaged_run_config_is_named_in_one_line(
    command: str, how: str, tiny_cohort: Path, run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = run / "config.json"
    _damage(config, how)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    args = {
        "train": ["train", *_data(tiny_cohort), "--out", str(run), *QUICK],
        "predict": ["predict", str(run), "--fold", "0", *_data(tiny_cohort), "--out",
                    str(tmp_path / "p"), "--no-progress"],
        "heatmap": ["heatmap", str(run), *_data(tiny_cohort), "--patient", "x", "--out",
                    str(tmp_path / "h")],
    }[command]  # fmt: skip
    line = _one_line_error(runner.invoke(app, args))
    assert str(config) in line and DAMAGE_SAID[how] in line, line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


# ------------------------------------------------------------------ cohort tables


def test_validate_names_the_separator_of_a_semicolon_table(tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("patient_id;slide_id;time;event\np1;s1;3;1\n")
    result = runner.invoke(app, ["validate", "--cohort", str(table)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    err = " ".join(result.stderr.split())
    assert "missing required column 'slide_id'" in err
    assert "the file seems to be separated by ';'" in err
    assert "comma-separated .csv and tab-separated .tsv" in err


# ------------------------------------------------------------------ messages that lost text


def _extracted_with(folder: Path, patch_size: int) -> Path:
    """A feature folder as `oncoslide extract --patch-size PATCH_SIZE` leaves it (no slide read)."""
    import numpy as np

    from oncoslide.features import PatchGrid, write_feature_file
    from oncoslide.features.extract import ExtractConfig

    config = ExtractConfig(patch_size=patch_size)
    grid = PatchGrid(
        patch_size=patch_size, patch_size_level0=patch_size, target_mpp=0.5, level0_mpp=0.5,
        level0_width=2220, level0_height=2967,
    )  # fmt: skip
    h5 = write_feature_file(
        folder / "cmu_small_region.h5", np.ones((2, 4), np.float32), np.zeros((2, 2), np.int64),
        grid=grid, encoder=config.encoder,
        attrs={"extraction_fingerprint": "0123456789abcdef",
               "extraction": json.dumps(config.output_settings(), default=str)},
    )  # fmt: skip
    (folder / "extraction.json").write_text(json.dumps({"settings": config.folder_settings()}))
    return h5


def test_extracting_other_settings_into_a_feature_folder_is_refused_in_one_line(
    svs_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    h5 = _extracted_with(out, patch_size=256)
    before = h5.read_bytes()
    result = runner.invoke(
        app, ["extract", "--slides", str(svs_path), "--out", str(out), "--patch-size", "224",
              "--workers", "0", "--no-progress"],
    )  # fmt: skip
    line = _one_line_error(result)
    assert line == (
        f"error: {out} holds features extracted with other settings (stored -> requested: "
        "patch_size 256 -> 224); extract into another --out, or pass --overwrite to replace them"
    )
    assert h5.read_bytes() == before


@pytest.mark.parametrize("command", ["extract", "bench run"])
def test_an_unreachable_ray_cluster_is_one_line(
    command: str, tiny_cohort: Path, svs_path: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    ray_args = ["--executor", "ray", "--address", "127.0.0.1:1"]
    spec = _spec(tiny_cohort, tmp_path)
    spec.write_text(spec.read_text().replace("n_boot: 10", "n_boot: 100"))  # a valid spec
    args = {
        "extract": ["extract", "--slides", str(svs_path), "--out", str(tmp_path / "feats"),
                    "--no-progress", *ray_args],
        "bench run": ["bench", "run", str(spec), "--out",
                      str(tmp_path / "bench"), *ray_args],
    }[command]  # fmt: skip
    line = _one_line_error(runner.invoke(app, args))
    assert line.startswith("error: cannot reach the Ray cluster at 127.0.0.1:1: "), line
    assert line.endswith("start one there (`ray start --head`) or check --address"), line


def test_an_install_hint_keeps_its_square_brackets(
    svs_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oncoslide.encoders import foundation

    monkeypatch.setattr(foundation, "import_timm", lambda: None)  # as on a machine without timm
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"")
    result = runner.invoke(
        app, ["extract", "--slides", str(svs_path), "--out", str(tmp_path / "feats"),
              "--encoder", "uni", "--weights", str(weights), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert "`pip install 'oncoslide[timm]'`" in " ".join(result.stderr.split())


def test_a_file_name_with_square_brackets_is_printed_whole(tmp_path: Path) -> None:
    table = tmp_path / "cohort[v2].csv"
    table.write_text("patient_id;slide_id\np1;s1\n")
    result = runner.invoke(app, ["validate", "--cohort", str(table)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"error: cohort table {table} has 3 problems:" in " ".join(result.stderr.split())


def test_another_run_in_the_run_folder_names_the_settings_that_differ(
    tiny_cohort: Path, run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    args = ["train", *_data(tiny_cohort), "--out", str(run), *QUICK, "--epochs", "3"]
    line = _one_line_error(runner.invoke(app, args))
    assert line == (
        f"error: {run} holds another run with other settings (stored -> requested: epochs 1 -> 3)"
        "; choose a new --out or pass --overwrite"
    )


def test_features_of_two_encoders_in_one_folder_give_one_hint(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    job = tmp_path / "20x_256px_0px_overlap"  # TRIDENT's layout: one subfolder per encoder
    for encoder in ("uni_v1", "conch_v15"):
        shutil.copytree(tiny_cohort / "features", job / f"features_{encoder}")
    result = runner.invoke(
        app, ["validate", "--cohort", str(tiny_cohort / "cohort.csv"), "--features", str(job)]
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    err = " ".join(result.stderr.split())
    n_slides = len(pd.read_csv(tiny_cohort / "cohort.csv"))
    assert "has 1 problem:" in err
    assert (
        f"{n_slides} slide(s) have feature files in several subfolders of {job} "
        "(features_conch_v15/, features_uni_v1/): "
    ) in err
    assert err.count("point the features folder at one of them") == 1
    assert err.endswith(f"e.g. {job / 'features_conch_v15'}")
    assert "ambiguous" not in err  # the per-slide text is gone


def test_ctrl_c_during_training_gives_the_resume_message_and_code_130(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning answers Ctrl+C with its own teardown and sys.exit(1), and leaves SIGINT ignored:
    # the command must still say that finished work is kept, exit 130, and restore Ctrl+C
    import signal

    from oncoslide.training.module import MILModule

    def interrupted(self: Any, batch: Any, batch_idx: int) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(MILModule, "training_step", interrupted)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    args = ["train", *_data(tiny_cohort), "--task", "survival", "--model", "mean"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--folds", "2", "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "resume" in result.output
    assert signal.getsignal(signal.SIGINT) is before
