"""Slides to feature files on the real Aperio slide: contract, real features, resume, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from oncoslide.encoders import create_encoder
from oncoslide.errors import ConfigError
from oncoslide.features import read_features
from oncoslide.features.extract import (
    ExtractConfig,
    check_output_folder,
    extract_slides,
    find_slides,
)
from oncoslide.slides import TissueConfig, detect_tissue, open_slide

FAST = dict(num_workers=0, batch_size=32)


@pytest.fixture(scope="module")
def extracted(svs_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extracted")
    manifest = extract_slides(find_slides(svs_path), out, ExtractConfig(num_workers=2))
    assert manifest["status"].tolist() == ["done"]
    return out


def test_feature_file_follows_the_contract_and_lies_on_tissue(
    extracted: Path, svs_path: Path
) -> None:
    sf = read_features(extracted / "cmu_small_region.h5")
    assert sf.layout == "oncoslide" and sf.encoder == "efficientnet-lite0"
    assert sf.features.shape == (sf.n_patches, 1280) and sf.n_patches > 20
    grid = sf.grid
    assert grid is not None
    assert (grid.target_mpp, grid.patch_size, grid.level0_mpp) == (0.5, 224, 0.499)
    assert grid.patch_size_level0 == 224  # round(224 * 0.5 / 0.499) = round(224.45)
    assert (grid.level0_width, grid.level0_height) == (2220, 2967)
    x, y = sf.coords[:, 0], sf.coords[:, 1]
    assert (x >= 0).all() and (y >= 0).all()
    assert (x + grid.patch_size_level0 <= grid.level0_width).all()
    assert (y + grid.patch_size_level0 <= grid.level0_height).all()
    assert len(np.unique(sf.coords, axis=0)) == sf.n_patches
    # every patch sits on tissue in an independently computed mask of the thumbnail
    with open_slide(svs_path) as slide:
        mask = detect_tissue(slide, TissueConfig())
    ds = mask.downsample
    for cx, cy in sf.coords:
        r0, r1 = int(cy / ds), int(np.ceil((cy + grid.patch_size_level0) / ds))
        c0, c1 = int(cx / ds), int(np.ceil((cx + grid.patch_size_level0) / ds))
        assert mask.mask[r0:r1, c0:c1].mean() > 0.1, (cx, cy)
    for name in (
        "thumbnails/cmu_small_region.png",
        "masks/cmu_small_region.geojson",
        "manifest.csv",
    ):
        assert (extracted / name).is_file()
    with h5py.File(extracted / "cmu_small_region.h5") as f:
        assert f["features"].attrs["weights_fingerprint"]
        assert f.attrs["extraction_fingerprint"]


def test_features_are_the_encoders_real_outputs(extracted: Path, svs_path: Path) -> None:
    sf = read_features(extracted / "cmu_small_region.h5")
    encoder = create_encoder("efficientnet-lite0")
    picks = [0, sf.n_patches // 2, sf.n_patches - 1]
    with open_slide(svs_path) as slide:
        patches = np.stack(
            [slide.read_patch(int(x), int(y), 224, 0.5) for x, y in sf.coords[picks]]
        )
        again = np.stack([slide.read_patch(int(x), int(y), 224, 0.5) for x, y in sf.coords[picks]])
    assert np.array_equal(patches, again)  # the same patch read twice is the same patch
    fresh = encoder.encode(patches)
    np.testing.assert_allclose(fresh, sf.features[picks], rtol=1e-4, atol=1e-4)
    assert not np.allclose(sf.features[picks[0]], sf.features[picks[1]], atol=1e-3)
    assert np.isfinite(sf.features).all() and sf.features.std() > 0


def test_rerun_skips_finished_slides_and_other_settings_are_refused_unless_overwrite(
    extracted: Path, svs_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    shutil.copytree(extracted, out)
    h5 = out / "cmu_small_region.h5"
    before = h5.stat().st_mtime_ns
    manifest = extract_slides(find_slides(svs_path), out, ExtractConfig(**FAST))
    assert manifest["status"].tolist() == ["skipped"]
    assert h5.stat().st_mtime_ns == before
    recorded = json.loads((out / "extraction.json").read_text())
    assert recorded["settings"]["patch_size"] == 224 and recorded["weights_fingerprint"]
    other = ExtractConfig(min_tissue_fraction=0.9, patch_size=256, **FAST)
    said = (
        r"holds features extracted with other settings \(stored -> requested: "
        r"min_tissue_fraction 0.25 -> 0.9; patch_size 224 -> 256\); extract into another "
        r"--out, or pass --overwrite to replace them"
    )
    with pytest.raises(ConfigError, match=said):
        extract_slides(find_slides(svs_path), out, other)
    # a folder from before extraction.json existed: its feature files say the same
    (out / "extraction.json").unlink()
    with pytest.raises(ConfigError, match=said):
        extract_slides(find_slides(svs_path), out, other)
    assert h5.stat().st_mtime_ns == before
    stray = out / "kept.h5"  # not written by oncoslide extract: --overwrite leaves it alone
    stray.write_bytes(b"not ours")
    changed = extract_slides(
        find_slides(svs_path), out, ExtractConfig(min_tissue_fraction=0.9, **FAST), overwrite=True
    )
    assert changed["status"].tolist() == ["done"]
    assert changed["patches"].item() < manifest["patches"].item()
    assert (
        json.loads((out / "extraction.json").read_text())["settings"]["min_tissue_fraction"] == 0.9
    )
    assert stray.read_bytes() == b"not ours"


def test_a_feature_file_of_another_slide_resolution_is_kept_and_its_slide_reported(
    extracted: Path, svs_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    shutil.copytree(extracted, out)
    h5 = out / "cmu_small_region.h5"
    before = h5.read_bytes()
    # the µm/px override describes slides, not the folder: the run goes on, that slide fails
    manifest = extract_slides(find_slides(svs_path), out, ExtractConfig(mpp_override=0.25, **FAST))
    assert manifest["status"].tolist() == ["failed"]
    error = manifest["error"].item()
    assert f"{h5} holds features extracted with other settings" in error
    assert "slide µm/px from metadata -> 0.25 (override)" in error
    assert "pass --overwrite to replace it" in error
    assert h5.read_bytes() == before


def test_other_encoder_weights_are_refused_once_the_encoder_is_loaded(
    extracted: Path, svs_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    shutil.copytree(extracted, out)
    record = json.loads((out / "extraction.json").read_text())
    real = record["weights_fingerprint"]
    record["weights_fingerprint"] = "0123456789abcdef"  # as if extracted with other weights
    (out / "extraction.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=f"encoder weights 0123456789abcdef -> {real}"):
        extract_slides(find_slides(svs_path), out, ExtractConfig(**FAST))
    assert (out / "cmu_small_region.h5").is_file()


def test_a_record_without_feature_files_binds_nothing(tmp_path: Path) -> None:
    # a run that stopped before its first slide (a missing package, a wrong weights file)
    out = tmp_path / "feats"
    out.mkdir()
    uni = ExtractConfig(encoder="uni")
    (out / "extraction.json").write_text(json.dumps({"settings": uni.folder_settings()}))
    assert check_output_folder(out, ExtractConfig()) is None


def test_bad_slides_are_reported_and_the_rest_completes(
    svs_path: Path, small_tiffs: dict[str, Path], damaged_slides: dict[str, Path], tmp_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copyfile(svs_path, slides / "good.svs")
    shutil.copyfile(small_tiffs["no_mpp"], slides / "no_mpp.tif")
    shutil.copyfile(damaged_slides["truncated"], slides / "broken.svs")
    out = tmp_path / "feats"
    proc = subprocess.run(
        [sys.executable, "-m", "oncoslide.cli", "extract", "--slides", str(slides), "--out",
         str(out), "--workers", "0", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # finished, with failures to report
    assert "Traceback" not in proc.stderr + proc.stdout
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert manifest.loc["good", "status"] == "done"
    assert manifest.loc["no_mpp", "status"] == "failed"
    assert "no_mpp.tif" in manifest.loc["no_mpp", "error"]
    assert "mpp-override" in manifest.loc["no_mpp", "error"]
    assert manifest.loc["broken", "status"] == "failed"
    err = " ".join(proc.stderr.split())
    assert "no_mpp" in err and "mpp-override" in err and "broken" in err
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]
    # --no-progress: no per-slide lines on the console; run.log has one per slide regardless
    log = (out / "run.log").read_text()
    assert "==== extraction" in log and "good:" not in proc.stdout
    for slide, status in (("good", "patches"), ("no_mpp", "failed: "), ("broken", "failed: ")):
        assert sum(f"] {slide}: " in line and status in line for line in log.splitlines()) == 1
    assert all(f"[{k}/3] " in log for k in (1, 2, 3))

    # the override rescues the slide without metadata
    fixed = extract_slides(
        find_slides(slides / "no_mpp.tif"), out, ExtractConfig(mpp_override=0.499, **FAST)
    )
    assert fixed["status"].tolist() == ["done"] and fixed["mpp_source"].tolist() == ["override"]


def test_killed_run_finishes_on_rerun_without_partial_or_duplicate_files(
    svs_path: Path, tmp_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    names = ["s1", "s2", "s3", "s4"]
    for name in names:
        shutil.copyfile(svs_path, slides / f"{name}.svs")
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "oncoslide.cli", "extract", "--slides", str(slides), "--out",
           str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(out.glob("*.h5")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.stem for p in out.glob("*.h5"))
    assert 1 <= len(finished) < len(names)
    if (out / "manifest.csv").exists():  # written after each slide: only finished ones in it
        partial = pd.read_csv(out / "manifest.csv")
        assert set(partial["slide_id"]) <= set(finished)
        assert set(partial["status"]) == {"done"}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.stem for p in out.glob("*.h5")) == names
    assert not list(out.rglob("*.tmp"))
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    for name in names:
        expected = "skipped" if name in finished else "done"
        assert manifest.loc[name, "status"] == expected
        sf = read_features(out / f"{name}.h5")
        assert sf.n_patches == manifest.loc[name, "patches"] > 0
    first = read_features(out / f"{names[0]}.h5")
    last = read_features(out / f"{names[-1]}.h5")
    np.testing.assert_allclose(first.features, last.features, rtol=1e-5, atol=1e-5)


def test_manifest_lists_the_finished_slides_when_a_later_one_stops_the_run(
    svs_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oncoslide.features import extract as extract_module

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("m1", "m2", "m3"):
        shutil.copyfile(svs_path, slides / f"{name}.svs")
    real = extract_module.extract_slide
    calls: list[str] = []

    def interrupted_on_the_second(job: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(job.slide_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) in the middle of the run
        return real(job, *args, **kwargs)

    monkeypatch.setattr(extract_module, "extract_slide", interrupted_on_the_second)
    out = tmp_path / "feats"
    with pytest.raises(KeyboardInterrupt):
        extract_slides(find_slides(slides), out, ExtractConfig(**FAST))
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["slide_id"].tolist() == ["m1"]
    row = manifest.iloc[0]
    assert (row["status"], row["level0_mpp"], row["mpp_source"]) == ("done", 0.499, "metadata")
    assert row["patches"] == read_features(out / "m1.h5").n_patches
    assert not list(out.rglob(".*.tmp"))


def test_skipped_and_failed_slides_keep_their_resolution_columns(
    extracted: Path, svs_path: Path, damaged_slides: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    shutil.copytree(extracted, out)
    manifest = extract_slides(find_slides(svs_path), out, ExtractConfig(**FAST))
    for table in (manifest, pd.read_csv(out / "manifest.csv")):
        row = table.iloc[0]
        assert (row["status"], row["level0_mpp"], row["mpp_source"]) == (
            "skipped", 0.499, "metadata",
        )  # fmt: skip
    # a slide that cannot be read still records the resolution it was to be read at
    broken = extract_slides(
        find_slides(damaged_slides["truncated"]),
        tmp_path / "broken",
        ExtractConfig(mpp_override=0.25, **FAST),
    )
    row = broken.iloc[0]
    assert (row["status"], row["level0_mpp"], row["mpp_source"]) == ("failed", 0.25, "override")


def test_slide_lists_and_their_errors(svs_path: Path, tmp_path: Path) -> None:
    listing = tmp_path / "slides.csv"
    pd.DataFrame(
        {"path": [str(svs_path)], "slide_id": ["TCGA-XX-0001-01Z-00-DX1"], "mpp": [0.5]}
    ).to_csv(listing, index=False)
    jobs = find_slides(listing)
    assert [(j.slide_id, j.mpp) for j in jobs] == [("TCGA-XX-0001-01Z-00-DX1", 0.5)]
    nested = tmp_path / "nested"
    (nested / "a").mkdir(parents=True)
    (nested / "b").mkdir()
    shutil.copyfile(svs_path, nested / "a" / "x.svs")
    shutil.copyfile(svs_path, nested / "b" / "x.svs")
    with pytest.raises(ConfigError, match="slide id 'x' names 2 slides"):
        find_slides(nested)
    with pytest.raises(ConfigError, match="no slides"):
        find_slides(_empty(tmp_path))
    with pytest.raises(ConfigError, match="overlap"):
        ExtractConfig(overlap=224)


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


@pytest.mark.usefixtures("one_ray_instance")
def test_ray_executor_on_a_local_two_worker_instance(svs_path: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("r1", "r2"):
        shutil.copyfile(svs_path, slides / f"{name}.svs")
    # a logical GPU: the tasks reserve half of it each and still encode on this CPU
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        manifest = extract_slides(
            find_slides(slides),
            tmp_path / "feats",
            ExtractConfig(**FAST),
            executor="ray",
            gpus_per_slide=0.5,
        )
        assert ray.is_initialized()  # an instance we started ourselves is left to us
    finally:
        ray.shutdown()
    assert manifest["status"].tolist() == ["done", "done"]
    a, b = (read_features(tmp_path / "feats" / f"{n}.h5") for n in ("r1", "r2"))
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5)


def test_extracted_files_feed_training_directly(extracted: Path, tmp_path: Path) -> None:
    from oncoslide.cohort import load_cohort
    from oncoslide.training import cross_validate, make_config

    feats = tmp_path / "feats"
    shutil.copytree(extracted, feats)  # thumbnails/ and masks/ stay beside the .h5 files
    rows = []
    for i in range(8):
        sid = f"TCGA-AA-{i:04d}-01Z-00-DX1"
        shutil.copyfile(feats / "cmu_small_region.h5", feats / f"{sid}.h5")
        rows.append(
            {"patient_id": sid[:12], "slide_id": sid, "time": 100.0 * (i + 1), "event": i % 2}
        )
    (feats / "cmu_small_region.h5").unlink()
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    cohort = load_cohort(tmp_path / "cohort.csv", feats)
    assert cohort.feature_dim == 1280 and set(cohort.patients["site"]) == {"AA"}
    cfg = make_config(task="survival", folds=2, epochs=1, batch_size=4, n_boot=10, progress=False)
    result = cross_validate(cohort, cfg, tmp_path / "run")
    assert len(result.predictions) == 8


def test_a_slide_given_by_a_relative_path_is_recorded_absolute(
    svs_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # heatmaps open the recorded slide later, from whatever folder they are run in
    monkeypatch.chdir(svs_path.parent)
    out = tmp_path / "feats"
    extract_slides(find_slides(svs_path.name), out, ExtractConfig(**FAST))
    with h5py.File(out / f"{svs_path.stem}.h5", "r") as f:
        recorded = Path(f.attrs["slide_path"])
    assert recorded.is_absolute() and recorded.samefile(svs_path)
