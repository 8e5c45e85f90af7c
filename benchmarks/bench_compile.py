"""torch.compile of the subnet step (issue 11): recompiles and step time of a 4-subnet sandwich vs eager.

The wrapped model is compiled in place (``supernet.model.compile(...)``): the user's ``training_step`` calls the
model itself, so that is the call that must be compiled. A subnet is a set of Python ints on the elastic modules
(active widths, head counts, kept blocks); dynamo guards on them, so each config is its own graph unless the
sliced sizes are symbolic. Three strategies are measured:

* ``eager``: no compile.
* ``static``: ``compile(dynamic=False)``: one graph per config (dynamo's guard cache is the per-config cache).
  Recompiles = number of distinct configs, up to ``torch._dynamo.config.recompile_limit`` (8 by default) per
  code object, after which that frame runs eager.
* ``dynamic``: ``compile(dynamic=True)``: input sizes symbolic; but dynamo still specialises on int attributes
  of nn.Modules (the active widths and head counts), so each config is again its own graph.
* ``dynamic_unspec``: ``dynamic=True`` with ``torch._dynamo.config.allow_unspec_int_on_nn_module = True``: the
  modules' int attributes become symbolic too (which blocks are skipped still guards).

Phase 1 (time): a *fixed* sandwich (largest, two sampled, smallest), one warm-up round (compiles), then
``--rounds`` rounds; a round is forward + backward of the 4 subnets + one SGD step; median and min over rounds,
and the warm-up (compile) time. Phase 2 (recompiles): ``--random-steps`` sandwich steps with fresh random subnets
each step (what ``SandwichSampling`` does), counted with ``backend="eager"`` (dynamo's guards and recompiles are
the same for every backend; this skips inductor's code generation): graphs captured against distinct configs; once
``unique_graphs`` reaches ``recompile_limit`` the remaining configs run eager.

Usage:
    python benchmarks/bench_compile.py                 # CPU, TinyViT dim 64 depth 4, batch 32
    python benchmarks/bench_compile.py --quick         # fewer rounds
    python benchmarks/bench_compile.py --device cuda   # not measured here (no GPU)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from lightning_supernet import SupernetModule  # noqa: E402
from lightning_supernet.models import TinyViT  # noqa: E402


def build(dim: int, depth: int, device: str) -> SupernetModule:
    torch.manual_seed(0)
    model = TinyViT(img_size=16, patch_size=2, in_chans=1, dim=dim, depth=depth, num_heads=4, num_classes=10)
    return SupernetModule(model, F.cross_entropy, example_input=torch.randn(1, 1, 16, 16),
                          eval_subnets=None).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sandwich_step(sn: SupernetModule, opt: torch.optim.Optimizer, configs, x, y) -> None:
    for cfg in configs:
        with sn.subnet(cfg):
            F.cross_entropy(sn(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def counters() -> dict[str, int]:
    import torch._dynamo
    from torch._dynamo.utils import counters as c

    return {"unique_graphs": int(c["stats"]["unique_graphs"]), "frames_ok": int(c["frames"]["ok"]),
            "recompile_limit": int(torch._dynamo.config.recompile_limit),
            "graph_breaks": int(sum(c["graph_break"].values()))}


def compiled_copy(base: SupernetModule, strategy: str, backend: str = "inductor") -> SupernetModule:
    import torch._dynamo

    sn = copy.deepcopy(base)
    torch._dynamo.config.allow_unspec_int_on_nn_module = strategy == "dynamic_unspec"
    if strategy != "eager":
        sn.model.compile(dynamic=strategy != "static", backend=backend)
    return sn


def time_strategies(base: SupernetModule, strategies: list[str], rounds: int, x, y, device: str) -> list[dict]:
    """Warm (compile) each strategy's copy, then time interleaved rounds (the order rotates every round), so load
    from other processes hits every strategy alike; wall clock and this process's CPU time."""
    import torch._dynamo

    torch._dynamo.reset()
    space = base.search_space
    configs = [space.largest(), space.sample(1), space.sample(2), space.smallest()]
    sides = {}
    for strategy in strategies:
        before = counters()
        sn = compiled_copy(base, strategy)
        opt = torch.optim.SGD(sn.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        sandwich_step(sn, opt, configs, x, y)
        sync(device)
        after = counters()
        sides[strategy] = {"sn": sn, "opt": opt, "warmup_s": time.perf_counter() - t0, "wall": [], "cpu": [],
                           "graphs": after["unique_graphs"] - before["unique_graphs"]}
        print(strategy, "warm", round(sides[strategy]["warmup_s"], 1), "s", flush=True)
    graphs_before_rounds = counters()["unique_graphs"]
    for r in range(rounds):
        order = strategies[r % len(strategies):] + strategies[: r % len(strategies)]
        for strategy in order:
            side = sides[strategy]
            torch._dynamo.config.allow_unspec_int_on_nn_module = strategy == "dynamic_unspec"
            t0, c0 = time.perf_counter(), time.process_time()
            sandwich_step(side["sn"], side["opt"], configs, x, y)
            sync(device)
            side["wall"].append(time.perf_counter() - t0)
            side["cpu"].append(time.process_time() - c0)
    assert counters()["unique_graphs"] == graphs_before_rounds, "a warm step recompiled"
    eager = statistics.median(sides["eager"]["cpu"]) if "eager" in sides else None
    rows = []
    for strategy, side in sides.items():
        cpu = statistics.median(side["cpu"])
        rows.append({"strategy": strategy, "warmup_s": round(side["warmup_s"], 1), "graphs": side["graphs"],
                     "median_wall_ms": round(1e3 * statistics.median(side["wall"]), 1),
                     "median_cpu_ms": round(1e3 * cpu, 1), "min_cpu_ms": round(1e3 * min(side["cpu"]), 1),
                     "cpu_vs_eager": round(cpu / eager, 3) if eager else None})
    return rows


def count_recompiles(base: SupernetModule, strategy: str, steps: int, x, y) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters as c

    c.clear()
    sn = compiled_copy(base, strategy, backend="eager")
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(sn.parameters(), lr=1e-3)
    seen = set()
    for _ in range(steps):
        configs = [sn.search_space.largest(), sn.search_space.sample(gen), sn.search_space.sample(gen),
                   sn.search_space.smallest()]
        seen.update(sn.search_space.canonical(cfg) for cfg in configs)
        sandwich_step(sn, opt, configs, x, y)
    return {"strategy": strategy, "steps": steps, "distinct_configs": len(seen), **counters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--random-steps", type=int, default=6)
    parser.add_argument("--strategies", default="eager,static,dynamic,dynamic_unspec")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.random_steps = 5, 3
    torch.set_num_threads(1)
    base = build(args.dim, args.depth, args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 16, 16, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "machine": f"{platform.machine()} {platform.processor() or ''} cores={torch.get_num_threads()}/"
                      f"{__import__('os').cpu_count()}", "torch": torch.__version__, "args": vars(args),
           "time": [], "recompiles": []}
    for row in time_strategies(base, args.strategies.split(","), args.rounds, x, y, args.device):
        out["time"].append(row)
        print(json.dumps(row), flush=True)
    for strategy in ("static", "dynamic", "dynamic_unspec"):
        row = count_recompiles(base, strategy, args.random_steps, x, y)
        out["recompiles"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
