"""What keying runs by their data costs, against the run it keys, on the demo cohort.

A run's data record needs the content digest (and NaN / inf count) of every feature file: one
full read per file, cached by path, size and mtime (``oncoslide.features.scan``). This script
simulates the demo cohort (400 patients, bags of about 80 patches, as ``make demo``), then
times in one process:

* **cold**: scanning every feature file with no cache (the first run on new features), plus
  building the data record;
* **warm**: the same with the cache filled (every later run: one ``stat`` per file);
* **run**: 5-fold ABMIL survival cross-validation with the demo's training settings.

and prints cold / run and warm / run. The target is under 5% of a run's time.

    python benchmarks/bench_fingerprint.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from oncoslide.cohort.fingerprint import data_record
from oncoslide.cohort.table import load_cohort
from oncoslide.features.scan import ScanCache, scan_feature_file
from oncoslide.simulate import SimulationConfig, simulate_cohort
from oncoslide.training import cross_validate, make_config


def _scan_all(cohort, cache) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    paths = [p for p in cohort.slides["feature_path"] if isinstance(p, str)]
    for path in paths:
        scan_feature_file(path, cache=cache)
    slides = cohort.slides.drop(columns=["feature_digest"])
    bare = type(cohort)(**{**cohort.__dict__, "slides": slides})
    # with cache=False the record scans again; with a cache it only stats
    if cache is not False:
        data_record(bare, cohort.patient_ids, ["time", "event"])
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["ONCOSLIDE_CACHE_DIR"] = str(root / "cache")
        config = SimulationConfig(
            n_patients=400, patches_median=80, patches_min=20, patches_max=3000
        )
        simulate_cohort(root / "data", config)
        # date the files back: files written in the last seconds are never cached
        old = time.time() - 3600
        for f in (root / "data" / "features").glob("*.h5"):
            os.utime(f, (old, old))
        size = sum(f.stat().st_size for f in (root / "data" / "features").glob("*.h5"))
        cohort = load_cohort(root / "data" / "cohort.csv", root / "data" / "features")
        n = len(cohort.slides)

        cold = min(_scan_all(cohort, False) for _ in range(2))
        cache = ScanCache(root / "bench-cache" / "scans.sqlite")
        _scan_all(cohort, cache)  # fill
        warm = min(_scan_all(cohort, cache) for _ in range(3))

        train = make_config(
            task="survival",
            model="abmil",
            folds=5,
            epochs=6,
            early_stopping_patience=2,
            n_boot=0,
            progress=False,
        )
        started = time.perf_counter()
        cross_validate(cohort, train, root / "run")
        run = time.perf_counter() - started

    print(f"demo cohort: {n} feature files, {size / 2**20:.1f} MiB")
    print(f"cold fingerprint (every file read and hashed): {cold:7.2f} s")
    print(f"warm fingerprint (cache: one stat per file):   {warm:7.2f} s")
    print(f"5-fold ABMIL run:                              {run:7.2f} s")
    print(f"cold / run = {cold / run:.2%}   warm / run = {warm / run:.2%}   (target < 5%)")


if __name__ == "__main__":
    main()
