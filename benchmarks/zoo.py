"""Run the conformance contract (issue 9) over the model zoos; one line per model, totals per zoo.

    python benchmarks/zoo.py [--zoo torchvision|hf|timm|torch|all] [--fast] [--torch-pruning] [--timeout S]
                             [--tp-timeout S] [--only NAME,...] [--json PATH [--resume]] [--reverse] [--rotate K]
                             [--n-random N] [--summarize PATH]

Each model runs in its own forked process (libraries imported once, before the fork) with a time limit, so one
model that hangs or runs out of memory does not stop the run: it is reported as TIMEOUT or FAIL(process).
``--torch-pruning`` also tries Torch-Pruning on a fresh copy of each model (see
``lightning_supernet.testing.torch_pruning_check``) and prints its result as a last column.

Example:
    python benchmarks/zoo.py --zoo torch --fast
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lightning_supernet.testing import Report, check_conformance, summarize  # noqa: E402
from lightning_supernet.testing.zoo import ZOOS, get_zoo  # noqa: E402


def _worker(zoo: str, name: str, tp: bool, n_random: int, conn) -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    model = next(m for m in get_zoo(zoo) if m.name == name)
    try:
        report = check_conformance(model.build, model.example(), name=name, space=model.space, output=model.output,
                                   n_random=n_random)
    except Exception as err:  # noqa: BLE001 - a harness error is reported, not raised
        report = Report(name, "FAIL", step="harness", detail=f"{type(err).__name__}: {err}"[:300])
        report.failures = [(report.step, report.detail)]
    conn.send(report.to_dict())  # the conformance result first: a Torch-Pruning hang must not lose it
    if tp:
        from lightning_supernet.testing.torch_pruning_check import torch_pruning_result

        t0 = time.perf_counter()
        try:
            result = torch_pruning_result(model.build, model.example())
        except Exception as err:  # noqa: BLE001
            result = f"FAIL harness: {type(err).__name__}: {err}"[:200]
        conn.send({"torch_pruning": result, "tp_seconds": time.perf_counter() - t0})
    conn.close()


def run_one(zoo: str, name: str, timeout: float, tp: bool, n_random: int, tp_timeout: float = 120.0) -> Report:
    """Check one model in a forked process; TIMEOUT after ``timeout`` seconds (Torch-Pruning: ``tp_timeout``)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(zoo, name, tp, n_random, child), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    report = None
    try:
        if parent.poll(timeout):
            data = parent.recv()
            report = Report(**{**data, "failures": [tuple(f) for f in data["failures"]]})
        else:
            report = Report(name, "TIMEOUT", detail=f"no result within {timeout:.0f} s")
        if tp:
            if report.outcome != "TIMEOUT" and parent.poll(tp_timeout):
                report.extra.update({"torch_pruning": parent.recv()["torch_pruning"]})
            else:
                report.extra["torch_pruning"] = "TIMEOUT" if report.outcome != "TIMEOUT" else "not run"
    except EOFError:
        proc.join(5)
        if report is None:
            report = Report(name, "FAIL", step="process", detail=f"the process died (exit code {proc.exitcode})")
            report.failures = [(report.step, report.detail)]
        else:
            report.extra["torch_pruning"] = f"FAIL process died (exit code {proc.exitcode})"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    report.seconds = time.perf_counter() - t0
    return report


def _done(path: str, zoo: str) -> set[str]:
    """Names of the models of ``zoo`` already recorded in the JSON-lines file ``path``."""
    if not path or not os.path.exists(path):
        return set()
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["name"] for r in rows if r.get("zoo") == zoo}


def summarize_json(path: str) -> str:
    """Markdown: a totals table per zoo (with Torch-Pruning's OK count) and every FAIL/TIMEOUT/REFUSED/COVERAGE
    model with its reason, from a ``--json`` file (the last line of a model wins)."""
    with open(path) as fh:
        rows = {(r["zoo"], r["name"]): r for r in (json.loads(line) for line in fh if line.strip())}
    out = ["| zoo | models | PASS | COVERAGE | REFUSED | FAIL | TIMEOUT | SKIPPED | Torch-Pruning OK |",
           "|---|---|---|---|---|---|---|---|---|"]
    for zoo in ZOOS:
        rs = [r for (z, _), r in rows.items() if z == zoo]
        if not rs:
            continue
        c = summarize(Report(r["name"], r["outcome"]) for r in rs)
        tp = [r.get("extra", {}).get("torch_pruning", "") for r in rs if r["outcome"] != "SKIPPED"]
        tp_ok = f"{sum(t.startswith('OK') for t in tp)}/{len(tp)}" if any(tp) else "-"
        out.append(f"| {zoo} | {len(rs)} | {c['PASS']} | {c['COVERAGE']} | {c['REFUSED']} | {c['FAIL']} | "
                   f"{c['TIMEOUT']} | {c['SKIPPED']} | {tp_ok} |")
    for outcome in ("FAIL", "TIMEOUT", "REFUSED", "COVERAGE", "SKIPPED"):
        listed = [(z, r) for (z, _), r in sorted(rows.items()) if r["outcome"] == outcome]
        if listed:
            out += ["", f"**{outcome}** ({len(listed)}):", ""]
        for zoo, r in listed:
            if outcome == "FAIL":
                why = f"`{r['step']}`: {r['detail']}"
                more = sorted({s for s, _ in r.get("failures", [])} - {r["step"]})
                why += f" (also: {', '.join(more)})" if more else ""
            elif outcome == "COVERAGE":
                why = f"smallest keeps {r['smallest_fraction']:.0%} of the params"
            else:
                why = r["detail"]
            out.append(f"- {zoo} `{r['name']}` — {why}".replace("\n", " "))
    tp_rows = [(z, r) for (z, _), r in sorted(rows.items()) if r.get("extra", {}).get("torch_pruning")]
    if tp_rows:
        out += ["", "**Torch-Pruning, per model**:", ""]
        out += [f"- {z} `{r['name']}`: {r['extra']['torch_pruning']}" for z, r in tp_rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="all", choices=(*ZOOS, "all"))
    parser.add_argument("--fast", action="store_true", help="only the fast slice of each zoo")
    parser.add_argument("--torch-pruning", action="store_true", help="add Torch-Pruning's result column")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model (default 900)")
    parser.add_argument("--tp-timeout", type=float, default=120.0, help="seconds for Torch-Pruning per model")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--json", default="", help="append one JSON line per model to this file")
    parser.add_argument("--resume", action="store_true",
                        help="skip models already in --json (several runs can share one file, e.g. with --reverse)")
    parser.add_argument("--reverse", action="store_true", help="run each zoo's models in reverse order")
    parser.add_argument("--rotate", type=int, default=0, help="start each zoo at this index (wrapping around)")
    parser.add_argument("--n-random", type=int, default=3, help="random configs per model beside the smallest")
    parser.add_argument("--summarize", default="", metavar="PATH",
                        help="print totals per zoo and the FAIL/REFUSED list (markdown) of a --json file, run nothing")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize_json(args.summarize))
        return 0
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    zoos = ZOOS if args.zoo == "all" else (args.zoo,)
    only = {n for n in args.only.split(",") if n}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), timeout {args.timeout:.0f} s/model",
          flush=True)
    grand: dict[str, list[Report]] = {}
    for zoo in zoos:
        models = [m for m in get_zoo(zoo) if (not args.fast or m.fast) and (not only or m.name in only)]
        if args.reverse:
            models = models[::-1]
        models = models[args.rotate % max(len(models), 1):] + models[:args.rotate % max(len(models), 1)]
        reports = []
        for m in models:
            if args.resume and m.name in _done(args.json, zoo):
                continue
            if m.skip:
                report = Report(m.name, "SKIPPED", detail=m.skip)
            else:
                report = run_one(zoo, m.name, args.timeout, args.torch_pruning, args.n_random, args.tp_timeout)
            reports.append(report)
            tp = f"  | TP: {report.extra.get('torch_pruning', '')}" if args.torch_pruning else ""
            print(f"{zoo:<11} {report}  [{report.seconds:.0f}s]{tp}", flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps({"zoo": zoo, **report.to_dict()}) + "\n")
        grand[zoo] = reports
        counts = summarize(reports)
        line = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        tp_ok = sum(r.extra.get("torch_pruning", "").startswith("OK") for r in reports)
        tp_line = f"; Torch-Pruning OK {tp_ok}/{len(reports)}" if args.torch_pruning else ""
        print(f"== {zoo}: {len(reports)} models: {line}{tp_line}; "
              f"{sum(r.seconds for r in reports):.0f} s", flush=True)
    bad = [r for rs in grand.values() for r in rs if r.outcome in ("FAIL", "TIMEOUT")]
    print(f"== total: {sum(len(r) for r in grand.values())} models, {len(bad)} FAIL/TIMEOUT", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
