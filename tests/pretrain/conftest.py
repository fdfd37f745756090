"""Fixtures of the pre-training tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from oncoslide.cli import app
from oncoslide.pretrain import load_slide_encoder
from oncoslide.pretrain.base import SlideEncoder

#: a tiny PAMA encoder for command-line runs (one block of width 16)
TINY_PAMA = ["--width", "16", "--depth", "1", "--heads", "2", "--decoder-width", "8"]


@pytest.fixture
def pama_cli(tiny_cohort: Path) -> Callable[..., Result]:
    """``oncoslide pretrain pama`` on the tiny cohort's features into ``out``, with the given
    options; ``tiny=True`` adds a tiny encoder, no progress bars and a 4-bag RankMe probe (for
    runs that must finish), ``tiny=False`` only the options (for settings that must be refused
    before any work)."""

    def run(out: Path, *options: str, max_steps: int = 1, tiny: bool = True) -> Result:
        args = ["pretrain", "pama", "--features", str(tiny_cohort / "features"), "--out",
                str(out), "--max-steps", str(max_steps)]  # fmt: skip
        if tiny:
            args += [*TINY_PAMA, "--no-progress", "--probe-size", "4"]
        return CliRunner().invoke(app, [*args, *options])

    return run


@pytest.fixture
def load_as_before() -> Callable[[Path, str], SlideEncoder]:
    """Load an encoder folder as if written before an option existed: the option's key is
    removed from its ``encoder.json`` config first (the folder is edited in place)."""

    def load(folder: Path, key: str) -> SlideEncoder:
        meta_file = folder / "encoder.json"
        meta = json.loads(meta_file.read_text())
        meta["encoder"]["config"].pop(key)
        meta_file.write_text(json.dumps(meta))
        return load_slide_encoder(folder).encoder

    return load
