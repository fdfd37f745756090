"""Cost of ROUPKT (and of the zoo transfer baselines) relative to ABMIL, by number of experts.

One simulated world with ``--cancers`` cancers (the last is the target, the others form the
zoo), everything timed in one process on the target's same bags:

* **training**: seconds of a fixed schedule (2 folds x ``--epochs`` epochs, no validation part,
  last checkpoint) of ``abmil``, and of ``roupkt`` with 1, 2, 4, ... zoo experts (the others
  left out with ``exclude``; each with the trainable own expert and the standardised
  source-risk path, the defaults, and the largest also without each, ``own_expert: false`` /
  ``source_risk: false``), ``zoo_probe`` and ``zoo_finetune`` (one named source);
* **inference**: seconds of ``predict`` of each fold-0 model over all the target's patients.

Each cost is printed as a ratio to ABMIL's. ROUPKT runs every expert's frozen forward pass on
every bag (training and inference), so its cost should grow about linearly with the experts:
1 + K x (an expert's forward share of an ABMIL step), the router and adapters adding little;
the own expert adds about one ABMIL (a trained slide path).

    python benchmarks/bench_roupkt.py                 # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from oncoslide.cohort.table import load_cohort
from oncoslide.simulate import SimulationConfig, simulate_cohort
from oncoslide.training import cross_validate, make_config
from oncoslide.training.model_folder import load_model_folder
from oncoslide.training.predict import predict_cohort
from oncoslide.transfer import build_zoo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cancers", type=int, default=9, help="zoo of cancers - 1 experts")
    parser.add_argument("--patients", type=int, default=720)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = SimulationConfig(n_patients=args.patients, n_cohorts=args.cancers, seed=0,
                                  patches_median=100, patches_min=30)  # fmt: skip
        simulate_cohort(root / "world", config)
        table = pd.read_csv(root / "world" / "cohort.csv")
        cancers = sorted(table["cohort"].unique())
        target = cancers[-1]
        pan = load_cohort(root / "world" / "cohort.csv", root / "world" / "features")
        zoo_config = make_config(task="survival", folds=2, epochs=1, n_boot=0, progress=False)
        build_zoo(pan, zoo_config, root / "zoo", min_patients=10, min_event_rate=0.0)
        sources = [c for c in cancers if c != target]
        table[table["cohort"] == target].to_csv(root / "target.csv", index=False)
        cohort = load_cohort(root / "target.csv", root / "world" / "features")
        fixed = dict(task="survival", folds=2, epochs=args.epochs, n_boot=0, progress=False,
                     val_fraction=0.0, checkpoint="last", early_stopping_patience=None)  # fmt: skip
        runs: list[tuple[str, str, dict[str, object]]] = [("abmil", "abmil", {})]
        counts = sorted(
            {2**i for i in range(len(sources)) if 2**i <= len(sources)} | {len(sources)}
        )
        for k in counts:
            kept = sources[:k]
            exclude = [c for c in cancers if c not in kept]
            kwargs = {"experts": str(root / "zoo"), "exclude": exclude, "top_k": min(5, k)}
            runs.append((f"roupkt, {k} expert(s)", "roupkt", kwargs))
        runs.append((f"roupkt, {k} expert(s), no own", "roupkt", {**kwargs, "own_expert": False}))
        # revision 2's model: no source-risk path (and so no pass over the training bags to
        # standardise the experts' risks)
        runs.append(
            (f"roupkt, {k} expert(s), no source risk", "roupkt", {**kwargs, "source_risk": False})
        )
        one = {"experts": str(root / "zoo"), "source": sources[0]}
        runs += [("zoo_probe", "zoo_probe", one), ("zoo_finetune", "zoo_finetune", one)]
        seconds: dict[str, tuple[float, float]] = {}
        for label, model, kwargs in runs:
            run_dir = root / "runs" / label.replace(" ", "_").replace(",", "")
            started = time.perf_counter()
            cross_validate(cohort, make_config(model=model, model_kwargs=kwargs, **fixed), run_dir)
            train = time.perf_counter() - started
            trained = load_model_folder(run_dir / "folds" / "seed0-fold0" / "model")
            started = time.perf_counter()
            predict_cohort(trained, cohort, root / "pred" / run_dir.name, embeddings=False)
            seconds[label] = (train, time.perf_counter() - started)
        base_train, base_predict = seconds["abmil"]
        print(f"target {target}: {len(cohort.patient_ids)} patients; zoo of {len(sources)} "
              f"source models; 2 folds x {args.epochs} epochs")  # fmt: skip
        print(f"  {'model':32s} {'train s':>8s} {'x abmil':>8s} {'predict s':>10s} {'x abmil':>8s}")
        for label, (train, predict) in seconds.items():
            print(f"  {label:32s} {train:8.1f} {train / base_train:8.2f} {predict:10.2f} "
                  f"{predict / base_predict:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
