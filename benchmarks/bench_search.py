"""Search benchmarks on the demo's digits ViT supernet (CPU).

1. Per-trial overhead of the search over a bare validation pass: everything a trial does besides
   ``trainer.validate`` (sampling, storage writes, motif lookup, params/MACs, constraints), per trial, against
   the mean time of ``trainer.validate`` on one subnet; with in-memory storage, SQLite and SQLite + MLflow.
2. Motif reuse: how many configs of the demo's space share a motif, and how many evaluations the 30-trial demo
   search (TPE) and a random search skip because an earlier trial had the same motif.
3. Hypervolume of the feasible Pareto front (val_acc up, params down, normalised to the largest subnet;
   reference point: accuracy 0, params = largest) after 30 trials, default sampler (multivariate TPE) vs
   random sampling, 3 seeds each.

Usage:
    python benchmarks/bench_search.py [--checkpoint runs/demo/supernet.pt] [--epochs 12] [--threads 1]

Without a checkpoint the supernet is trained first with the demo's config (``lightning-supernet demo`` writes
``runs/demo/supernet.pt``). Prints a Markdown summary and writes ``benchmarks/search_results.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lightning_supernet.cli_lightning import DEMO_CONFIG, SupernetCLI
from lightning_supernet.cli_steps import load_supernet_weights
from lightning_supernet.integrations.optuna import SubnetSearch


class TimedSearch(SubnetSearch):
    """Accumulates wall and CPU time spent inside ``trainer.validate`` (what a bare validation pass also pays)."""

    validate_seconds = 0.0
    validate_cpu = 0.0

    def validate(self, cfg):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return super().validate(cfg)
        finally:
            self.validate_seconds += time.perf_counter() - t0
            self.validate_cpu += time.process_time() - c0


def supernet_and_data(args):
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["trainer"].update(max_epochs=args.epochs, enable_progress_bar=False, enable_model_summary=False,
                          logger=False, enable_checkpointing=False)
    cfg["mlflow"]["enabled"] = False
    # the demo's model, data and trainer, built as the CLI builds them
    cli = SupernetCLI(args=cfg, run=False, save_config_callback=None)
    if args.checkpoint and Path(args.checkpoint).exists():
        load_supernet_weights(cli.model, args.checkpoint)
        return cli.model, cli.datamodule, f"loaded {args.checkpoint}"
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, cli.datamodule, f"trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s"


def bare_validation(search, configs, repeats=3):
    """Mean wall and CPU seconds of ``trainer.validate`` on one subnet (the trainer the search itself uses)."""
    walls, cpus = [], []
    for cfg in configs:
        with search.supernet.subnet(cfg):
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                search.validate(cfg)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
    return statistics.mean(walls), statistics.mean(cpus)


def overhead(supernet, data, storage, label, n_trials, mlflow=None):
    search = TimedSearch(supernet, data, storage=storage, seed=0, mlflow=mlflow, study_name="overhead")
    search.setup()
    search.validate_seconds = search.validate_cpu = 0.0
    before = search.evaluations
    t0, c0 = time.perf_counter(), time.process_time()
    search.run(n_trials=n_trials, show_progress_bar=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    evaluated = search.evaluations - before
    machinery_wall = (wall - search.validate_seconds) / n_trials
    machinery_cpu = (cpu - search.validate_cpu) / n_trials
    bare_wall, bare_cpu = bare_validation(search, [supernet.search_space.sample(i) for i in range(5)])
    return {"storage": label, "mlflow": bool(mlflow), "trials": n_trials, "evaluated": evaluated,
            "wall_s": wall, "bare_validation_ms": 1e3 * bare_wall, "bare_validation_cpu_ms": 1e3 * bare_cpu,
            "overhead_ms_per_trial": 1e3 * machinery_wall, "overhead_cpu_ms_per_trial": 1e3 * machinery_cpu,
            "overhead_pct": 100 * machinery_wall / bare_wall, "overhead_cpu_pct": 100 * machinery_cpu / bare_cpu}


def motif_space(space):
    """(configs, motifs) of the space, by counting keep patterns (inner dims of skipped blocks collapse)."""
    inner = {}
    for dim in space.dims.values():
        if dim.kind != "depth":
            inner.setdefault(dim.block, []).append(len(dim.choices))
    outside = math.prod(len(d.choices) for d in space.dims.values() if d.kind != "depth" and d.block is None)
    per_block = {b: math.prod(v) for b, v in inner.items() if b is not None}
    configs = motifs = 0
    stacks = {s: space.stack_blocks(s) for s in space.stacks}
    for stack, names in stacks.items():
        length, min_kept = space.stacks[stack]
        need = max(0, min_kept - (length - len(names)))
        full = math.prod(per_block.get(n[: -len(".keep")], 1) for n in names)
        for keep in itertools.product((True, False), repeat=len(names)):
            if sum(keep) < need:
                continue
            configs += full
            motifs += math.prod(per_block.get(n[: -len(".keep")], 1) for n, k in zip(names, keep, strict=True) if k)
    return configs * outside, motifs * outside


def hypervolume(points, ref=(0.0, 1.0)):
    """2-D hypervolume of (accuracy up, params fraction down) points against ``ref``."""
    front = []
    for acc, size in sorted(points, key=lambda p: (p[1], -p[0])):
        if not front or acc > front[-1][0]:
            front.append((acc, size))
    hv, prev_size = 0.0, ref[1]
    for acc, size in reversed(front):  # from the largest size down
        hv += max(0.0, acc - ref[0]) * max(0.0, prev_size - size)
        prev_size = min(prev_size, size)
    return hv


def search_quality(supernet, data, sampler, seed, n_trials=30, extremes=False):
    search = SubnetSearch(supernet, data, storage=None, sampler=sampler, seed=seed)
    search.enqueue_extremes = extremes  # False: the samplers alone decide
    study, front = search.run(n_trials=n_trials, show_progress_bar=False)
    largest = search.reference["params"]
    pts = [(t.values[0], t.values[1] / largest) for t in study.trials if t.state.name == "COMPLETE"]
    reused = sum("reused_from" in t.user_attrs for t in study.trials)
    name = (sampler or "tpe") + (" + extremes (default)" if extremes else "")
    return {"sampler": name, "seed": seed, "hypervolume": hypervolume(pts), "pareto": len(front),
            "reused": reused, "best_acc": max(p[0] for p in pts)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/supernet.pt")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/search_results.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    supernet, data, how = supernet_and_data(args)
    results = {"supernet": how, "threads": args.threads, "space": str(supernet.search_space).splitlines()[0]}
    configs, motifs = motif_space(supernet.search_space)
    results["motif_space"] = {"configs": configs, "motifs": motifs, "ratio": configs / motifs}

    with tempfile.TemporaryDirectory() as tmp:
        rows = [overhead(supernet, data, None, "in-memory", args.trials),
                overhead(supernet, data, f"journal:{tmp}/o.log", "journal file", args.trials),
                overhead(supernet, data, f"sqlite:///{tmp}/o.db", "sqlite", args.trials)]
        from lightning_supernet.integrations.mlflow import MlflowTracking

        tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp}/mlflow.db", top_k=0, log_figure=False,
                                  artifact_location=f"{tmp}/artifacts")
        rows.append(overhead(supernet, data, f"sqlite:///{tmp}/m.db", "sqlite", args.trials, mlflow=tracking))
    results["overhead"] = rows
    quality = [search_quality(supernet, data, s, seed, args.trials, extremes)
               for s, extremes in ((None, False), ("random", False), (None, True)) for seed in (0, 1, 2)]
    results["quality"] = quality
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"## Search benchmarks ({how}; {args.threads} torch thread(s); {results['space']})\n")
    print("| storage | MLflow | trials | evaluated | bare validation ms (wall / CPU) | overhead ms per trial "
          "(wall / CPU) | overhead (wall / CPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['storage']} | {'yes' if r['mlflow'] else 'no'} | {r['trials']} | {r['evaluated']} | "
              f"{r['bare_validation_ms']:.1f} / {r['bare_validation_cpu_ms']:.1f} | {r['overhead_ms_per_trial']:.1f} / "
              f"{r['overhead_cpu_ms_per_trial']:.1f} | {r['overhead_pct']:.0f} % / {r['overhead_cpu_pct']:.0f} % |")
    m = results["motif_space"]
    print(f"\nMotifs: {m['configs']:,} configs share {m['motifs']:,} motifs ({m['ratio']:.1f}x fewer networks).")
    print("\n| sampler | seed | hypervolume | Pareto size | trials reusing a motif | best val_acc |")
    print("|---|---|---|---|---|---|")
    for q in quality:
        print(f"| {q['sampler']} | {q['seed']} | {q['hypervolume']:.4f} | {q['pareto']} | {q['reused']} | "
              f"{q['best_acc']:.3f} |")
    for s in ("tpe", "random", "tpe + extremes (default)"):
        hv = [q["hypervolume"] for q in quality if q["sampler"] == s]
        reused = [q["reused"] for q in quality if q["sampler"] == s]
        print(f"\n{s}: hypervolume {statistics.mean(hv):.4f} ± {statistics.stdev(hv):.4f}; "
              f"evaluations saved by motif reuse: {statistics.mean(reused):.1f} of {args.trials} trials")


if __name__ == "__main__":
    main()
