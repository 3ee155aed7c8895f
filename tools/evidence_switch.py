"""What AdamW carries across HALD's phase switch, and how long the hard phase should be (issue: a HALD that does not
lose where it should win). hald.py's --phase-switch treatments and hard-phase sizes on the CIFAR-10 sets, beside the
committed soft-only and HALD (state kept) runs of the same settings.

    python tools/evidence_switch.py --jobs 2                     # every missing run, s = 10 first, then 2, then 1
    python tools/evidence_switch.py --crops 10 --sets real       # a part of them
    python tools/evidence_switch.py --table-only                 # the tables from the committed summaries

Settings: the default student's (BatchNorm ConvNet-3, IPC 10, 300 epochs, HALD soft 120 / hard 60 / soft 120,
smoothing 0.1, T 4, last-epoch top-1 on the 10,000 CIFAR-10 test images), pinned as in tools/evidence_generated.py.
Sets: the bundled real draw (demo/distilled) and the two generator-made sets in sets/; the real draw also with
ResNet-18 (real-r18), the instance-norm ConvNet-3 (real-in) and at batch 4 (real-b4). One soft-label cache per set, s
and seed (runs/switch/caches/), shared by every treatment of that cell: the same seed builds the same cache, so the
committed soft-only and state-kept runs were trained from the same labels. Each finished run's summary.json is copied
to results/cifar10/switch/<set>-<treatment>-s<s>-seed<seed>.json, which makes it count as done.
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import cell, gain_table, run_one  # noqa: E402
from evidence_generated import PINNED  # noqa: E402

KEPT = ROOT / "results" / "cifar10" / "switch"
# set -> (folder, extra hald.py arguments); real-b4: the real draw at batch 4 (25 steps an epoch, not 7), where AdamW's
# memory of one phase should fade sooner in the next; real-r18 and real-in: the real draw with ResNet-18 and with the
# instance-norm ConvNet-3 (--model convnet), each at its auto split, the authors' 75 / 150 / 75
SETS = {"real": (ROOT / "demo" / "distilled", []), "recover": (ROOT / "sets" / "cifar10-recover", []),
        "select": (ROOT / "sets" / "cifar10-select", []), "real-b4": (ROOT / "demo" / "distilled", ["--batch-size", "4"]),
        "real-r18": (ROOT / "demo" / "distilled", ["--model", "resnet18", "--soft-epochs", "150"]),
        "real-in": (ROOT / "demo" / "distilled", ["--model", "convnet", "--soft-epochs", "150"])}
# the soft-only and state-kept runs the earlier evidence committed (same settings, same cache per seed)
RUNS, GENERATED = ROOT / "results" / "cifar10" / "runs", ROOT / "results" / "cifar10" / "generated"
BASELINES = {("real", "soft"): RUNS / "convnet-3-bn-soft-only-t-4", ("real", "keep"): RUNS / "convnet-3-bn-hald-soft-120-hard-60-soft-120",
             ("real-r18", "soft"): RUNS / "resnet-18-soft-only-t-4",
             ("real-r18", "keep"): RUNS / "resnet-18-hald-authors-split-soft-75-hard-150-soft-75",
             ("real-in", "soft"): RUNS / "soft-only-t-4", ("real-in", "keep"): RUNS / "hald-label-smoothing-0-1-t-4",
             **{(kind, t): GENERATED / f"cifar10-{kind}-{row}" for kind in ("recover", "select") for t, row in (("soft", "soft"), ("keep", "shs"))}}
# treatment -> hald.py arguments on top of the pinned ones and --schedule shs. reset-v (the second moment restarted from
# the new phase's first gradient, the momentum kept) was measured once with hald.py 8e46f81 and then dropped: it diverges
TREATMENTS = {"soft": ["--schedule", "soft"], "keep": ["--phase-switch", "keep"], "reset": ["--phase-switch", "reset"],
              "t2": ["--phase-switch", "t2"], "warmup": ["--phase-switch", "warmup"],  # issue 45's reset + LR warm-up
              # its third candidate: the ramp as long as AdamW's memory, 1 / (1 - beta2) = 1,000 steps, over which the kept
              # state's smaller steps fade (the traces): keep's gentle start of a phase without the other phase's gradient scale
              "warmup-1000": ["--phase-switch", "warmup", "--warmup-steps", "1000"]}
# item 2, a hard phase sized to the budget, on top of the reset: H hard epochs between two soft halves (--soft-epochs
# 300 - H; the default's H is 60), and a short hard phase first
TREATMENTS.update({f"reset-h{h}": ["--phase-switch", "reset", "--soft-epochs", str(300 - h)] for h in (30, 15, 5)})
TREATMENTS["reset-hard-first-15"] = ["--phase-switch", "reset", "--schedule", "hard:15,soft:285"]
SHOWN = ("soft", "keep", "reset", "t2", "warmup", "warmup-1000", "reset-v", *[t for t in TREATMENTS if t.startswith("reset-")])
CROPS = (10, 2, 1)  # priority: the largest effect first (item 2 adds s = 4)


def committed(set_name: str, treatment: str, s: int, seed: int) -> Path:
    """The summary of a run: the soft-only and state-kept baselines where the earlier evidence committed them."""
    base = BASELINES.get((set_name, treatment))
    if base and (path := base.with_name(f"{base.name}-s{s}-seed{seed}.json")).exists():
        return path
    return KEPT / f"{set_name}-{treatment}-s{s}-seed{seed}.json"


def run_cell(job, cifar: str) -> str:
    """The treatments of one (set, s, seed), one after the other, from one cache."""
    set_name, s, seed, treatments = job
    done = 0
    for treatment in treatments:
        kept = committed(set_name, treatment, s, seed)
        if kept.exists():
            done += 1
            continue
        out = ROOT / "runs" / "switch" / kept.stem
        cache = ROOT / "runs" / "switch" / "caches" / f"{set_name}-s{s}-seed{seed}.pt"
        args = ["--data", str(SETS[set_name][0]), "--val", str(Path(cifar) / "test"), "--teacher", str(ROOT / "demo" / "teacher.pt"),
                "--model", "convnet_bn", *PINNED, *SETS[set_name][1], "--eval-every", "0", "--slc", str(10 * s), "--seed", str(seed),
                "--schedule", "shs", "--cache", str(cache), *TREATMENTS[treatment]]
        run_one((out, args))
        if (out / "summary.json").exists():
            KEPT.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "summary.json", kept)
            done += 1
    return f"{done}/{len(treatments)} done"


def load(set_name: str, treatment: str, s: int) -> dict:
    """seed -> summary of the committed runs of one cell."""
    paths = [committed(set_name, treatment, s, seed) for seed in range(3)]
    return {seed: json.loads(p.read_text()) for seed, p in enumerate(paths) if p.exists()}


def diffs(set_name: str, treatment: str, s: int) -> dict:
    """seed -> `treatment` minus soft-only, for the seeds measured for both."""
    soft = load(set_name, "soft", s)
    return {k: r["final_top1"] - soft[k]["final_top1"] for k, r in sorted(load(set_name, treatment, s).items()) if k in soft}


def table() -> str:
    """Last-epoch top-1 (mean +- std over seeds, each seed) by set, s and treatment, and each minus soft-only per seed."""
    lines = ["| set | s | schedule | top-1 % | minus soft-only (per seed) |", "|---|---|---|---|---|"]
    for set_name in SETS:
        for s in (1, 2, 4, 10):
            for treatment in SHOWN:
                runs = load(set_name, treatment, s)
                if not runs:
                    continue
                d = list(diffs(set_name, treatment, s).values())
                gain = "" if treatment == "soft" or not d else f"**{statistics.mean(d):+.1f}** ({', '.join(f'{v:+.1f}' for v in d)})"
                name = "soft-only" if treatment == "soft" else f"HALD, {treatment}"
                lines.append(f"| {set_name} | {s} | {name} | {cell([runs[k] for k in sorted(runs)])} | {gain} |")
    return "\n".join(lines)


# issue 45's candidates where reset and keep disagree most: (label, this study's treatment, its schedule in
# tools/evidence_classes.py, whose 200-class runs are tools/evidence_tiny.py's committed rows)
CANDIDATES = [("reset (default)", "reset", "shs"), ("keep (the authors')", "keep", "shs-keep"), ("t2", "t2", "shs-t2"),
              ("warmup, 100 steps", "warmup", "shs-warmup"), ("warmup, 1,000 steps", "warmup-1000", "shs-warmup-1000")]


def candidates_table() -> str:
    """Issue 45's item 2: each candidate minus soft-only (mean, and per seed) on its two test settings, where measured."""
    import evidence_classes  # torch and hald.py: only for this table

    shown = lambda d: f"{statistics.mean(d.values()):+.1f} ({', '.join(f'{v:+.1f}' for v in d.values())})" if d else "not run"  # noqa: E731
    lines = ["| treatment | Tiny-ImageNet 200 classes, s = 1, width 64 | CIFAR-10 real, s = 10 |", "|---|---|---|"]
    lines += [f"| {label} | {shown(evidence_classes.diffs(200, schedule, 1))} | {shown(diffs('real', treatment, 10))} |"
              for label, treatment, schedule in CANDIDATES]
    return "\n".join(lines)


def hard_table() -> str:
    """Item 2: HALD (reset) minus soft-only by the hard phase's length (and 15 hard epochs first), where any was run."""
    columns = {"reset": "hard 60 (default)", **{f"reset-h{h}": f"hard {h}" for h in (30, 15, 5)}, "reset-hard-first-15": "hard 15 first"}
    rows = {}
    for set_name in SETS:
        for s in (1, 2, 4, 10):
            found = {t: diffs(set_name, t, s) for t in columns}
            if any(found[t] for t in columns if t != "reset"):
                rows[set_name, s] = found
    return gain_table("set", rows, columns) if rows else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 root with test/")
    parser.add_argument("--jobs", type=int, default=2, help="cells in parallel (one thread each)")
    parser.add_argument("--crops", default=",".join(map(str, CROPS)), help="crops per image s, in this order")
    parser.add_argument("--sets", default="real,recover,select", help=f"sets to run (comma-separated): {', '.join(SETS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--treatments", default="reset,t2", help="what to run (soft and keep: where not committed already)")
    parser.add_argument("--table-only", action="store_true", help="print the table from the committed summaries, run nothing")
    args = parser.parse_args()
    treatments = args.treatments.split(",")
    if not args.table_only:
        if not (Path(args.cifar) / "test").is_dir():
            sys.exit(f"evidence_switch: {args.cifar}/test not found: pass --cifar with the CIFAR-10 ImageFolder root")
        jobs = [(set_name, int(s), int(seed), treatments) for s in args.crops.split(",") for seed in args.seeds.split(",")
                for set_name in args.sets.split(",")]
        start = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (job, status) in enumerate(zip(jobs, pool.map(lambda j: run_cell(j, args.cifar), jobs))):
                print(f"[{i + 1}/{len(jobs)}] {job[0]} s={job[1]} seed {job[2]}: {status} ({time.time() - start:.0f}s)", flush=True)
    print(f"cifar10: HALD's optimizer across the phase switch (IPC 10, default student)\n{table()}")
    print(f"\nissue 45's candidates: HALD minus soft-only (per seed) where the reset and keep disagree most\n{candidates_table()}")
    if hard := hard_table():
        print(f"\ncifar10: HALD (AdamW reset) minus soft-only by the hard phase's length (per seed)\n{hard}")


if __name__ == "__main__":
    main()
