"""A run folder refuses another run and says which settings differ (no training needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from oncoslide.errors import ConfigError
from oncoslide.training.config import make_config, setting_changes
from oncoslide.training.run_folder import RunFolder


def _stored_run(folder: Path, config_entry: object, run_key: str) -> RunFolder:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"run_key": run_key, "config": config_entry}))
    return RunFolder(folder)


def test_another_run_names_every_differing_setting_stored_value_first(tmp_path: Path) -> None:
    stored = make_config(task="survival", model="abmil", epochs=3, progress=False)
    run = _stored_run(tmp_path / "run", stored.model_dump(mode="json"), stored.run_key())
    # num_threads is execution-only: it never makes another run, so it is not named
    wanted = make_config(
        task="survival", model="transmil", epochs=5, model_kwargs={"hidden_dim": 8}, num_threads=2
    )
    said = (
        f"{run.path} holds another run with other settings (stored -> requested: epochs 3 -> 5; "
        'model abmil -> transmil; model_kwargs {} -> {"hidden_dim":8}); choose a new --out or '
        "pass --overwrite"
    )
    with pytest.raises(ConfigError, match=re.escape(said)):
        run.prepare(wanted.run_key(), overwrite=False, config=wanted)
    run.prepare(wanted.run_key(), overwrite=True, config=wanted)  # replaced on request


def test_a_stored_config_of_another_version_is_compared_on_what_it_records(
    tmp_path: Path,
) -> None:
    wanted = make_config(task="survival", epochs=5)
    entry = {"epochs": 3, "retired_option": True, "model": wanted.model}
    assert setting_changes(entry, wanted) == ["epochs 3 -> 5"]
    run = _stored_run(tmp_path / "run", entry, "0123456789abcdef")
    with pytest.raises(ConfigError, match=r"other settings \(stored -> requested: epochs 3 -> 5\)"):
        run.prepare(wanted.run_key(), overwrite=False, config=wanted)


def test_without_a_stored_config_the_run_keys_are_named(tmp_path: Path) -> None:
    wanted = make_config(task="survival")
    run = _stored_run(tmp_path / "run", None, "0123456789abcdef")
    said = f"holds another run (run key 0123456789abcdef, this one {wanted.run_key()})"
    with pytest.raises(ConfigError, match=re.escape(said)):
        run.prepare(wanted.run_key(), overwrite=False, config=wanted)


def test_a_model_revision_keys_runs_apart_and_other_models_keep_their_keys() -> None:
    """A model whose defaults changed declares ``revision`` in the registry: its runs (and so
    benchmark cells) get new keys; a model without one keeps the key it always had."""
    from oncoslide.models import MODELS
    from oncoslide.models.abmil import ABMIL

    plain = make_config(task="survival", model="abmil")
    assert "model_revision" not in plain.keyed_settings()
    assert make_config(task="survival", model="roupkt").keyed_settings()["model_revision"] == 3
    MODELS.register("abmil-revised", revision=3)(ABMIL)
    try:
        revised = make_config(task="survival", model="abmil-revised")
        assert revised.keyed_settings()["model_revision"] == 3
        unrevised = plain.model_copy(update={"model": "abmil-revised"})
        assert revised.run_key() != make_config(task="survival", model="abmil").run_key()
        assert unrevised.run_key() == revised.run_key()  # same settings, same revision
    finally:
        MODELS.unregister("abmil-revised")
