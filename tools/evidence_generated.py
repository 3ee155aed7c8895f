"""Does HALD beat soft-only on generator-made images? hald.py on the sets of tools/distill.py, beside
the real-image draws of the other tables.

    python tools/evidence_generated.py --jobs 2                      # every missing run, in priority order
    python tools/evidence_generated.py --only cifar10 --crops 1,10   # a part of them
    python tools/evidence_generated.py --table-only                  # the tables from the committed summaries

Sets (committed in sets/, made by tools/distill.py; commands in each set's distill.json): SRe2L-style
`recover` and RDED-style `select`, IPC 10, for CIFAR-10 (the bundled teacher demo/teacher.pt) and for
Tiny-ImageNet at 32 px (results/tiny-imagenet/teacher.pt). Every run trains HALD and soft-only from one
soft-label cache (`--schedule "shs soft"`) with the default student's settings, pinned: the BatchNorm
ConvNet-3 (width 128 on CIFAR-10, 64 and 128 at 200 classes), HALD soft 120 / hard 60 / soft 120,
smoothing 0.1, T 4; last-epoch top-1 on the full validation set (CIFAR-10 test: 10,000 images; Tiny
val: 10,000). Each finished schedule's summary.json is copied to
results/<dataset>/generated/<set>-<schedule>-s<s>-seed<seed>.json, which makes the run count as done
and is what the tables are made from. The real rows are the committed runs of tools/evidence.py and
tools/evidence_tiny.py with the same settings.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import cell, run_one  # noqa: E402

PINNED = ["--ipc", "10", "--epochs", "300", "--soft-epochs", "240", "--temperature", "4", "--label-smoothing", "0.1",
          "--phase-switch", "keep"]  # AdamW kept across phases, as every committed run
DATASETS = {
    "cifar10": dict(results=ROOT / "results" / "cifar10", teacher=ROOT / "demo" / "teacher.pt", val="test",
                    args=["--eval-every", "0"], real=ROOT / "results" / "cifar10" / "runs",
                    real_rows={"soft": "convnet-3-bn-soft-only-t-4", "shs": "convnet-3-bn-hald-soft-120-hard-60-soft-120",
                               "ceiling": "ceiling-soft-only-t-4-convnet-3-bn"}),
    "tiny32": dict(results=ROOT / "results" / "tiny-imagenet", teacher=ROOT / "results" / "tiny-imagenet" / "teacher.pt",
                   val="val", args=["--eval-every", "25", "--image-size", "32"], real=ROOT / "results" / "tiny-imagenet" / "runs",
                   real_rows={"soft": "soft-only-t-4", "shs": "hald-soft-120-hard-60-soft-120",
                              "ceiling": "ceiling-soft-only-a-fresh-label-per-crop-t-4"}),
}
KINDS = ("recover", "select")
# a second recover set (the same command, one thread: other images than sets/cifar10-recover), written by tools/distill.py
# --save-tensor both as PNGs (sets/cifar10-recover-png/) and as the floats before their rounding to 8 bits
# (sets/cifar10-recover-tensor.pt): run only when asked (--kind), the pair says what writing PNGs costs
TENSOR_KINDS = ("recover-png", "recover-tensor")
# (dataset, student, crops per image s, seeds) in order of priority; s = 300 is the unlimited-label ceiling (soft-only)
PLAN = [("cifar10", "convnet_bn", 1, 3), ("cifar10", "convnet_bn", 10, 3), ("cifar10", "convnet_bn", 2, 3),
        ("cifar10", "convnet_bn", 300, 1), ("tiny32", "convnet_bn64", 1, 3), ("tiny32", "convnet_bn64", 2, 3),
        ("tiny32", "convnet_bn", 1, 3)]
WIDTH_SUFFIX = {("tiny32", "convnet_bn"): "-width-128"}


# the teacher's mode at relabel: train (batch statistics) for every committed run, eval where a run's name says so
MODE_SUFFIX = {"train": "", "eval": "-teacher-eval"}


def run_name(dataset: str, kind: str, model: str, s: int, seed: int, schedule: str, mode: str = "train") -> str:
    return f"{dataset}-{kind}{WIDTH_SUFFIX.get((dataset, model), '')}{MODE_SUFFIX[mode]}-{schedule}-s{s}-seed{seed}"


def kept(dataset: str, name: str) -> Path:
    return DATASETS[dataset]["results"] / "generated" / f"{name}.json"


def jobs_for(args) -> list:
    """(dataset, kind, model, s, seed, schedules) of every run asked for, seed-major within each plan line."""
    crops = {int(c) for c in args.crops.split(",") if c}
    jobs = []
    for dataset, model, s, seeds in PLAN:
        if (args.only and args.only not in f"{dataset} {model}") or (crops and s not in crops):
            continue
        for seed in [k for k in range(seeds) if not args.seeds or str(k) in args.seeds.split(",")]:
            for kind in KINDS if not args.kind else [args.kind]:
                jobs.append((dataset, kind, model, s, seed, ["soft"] if s == 300 else ["shs", "soft"], args.teacher_mode))
    return jobs


def run(job, data_roots: dict) -> str:
    dataset, kind, model, s, seed, schedules, mode = job
    d = DATASETS[dataset]
    names = {sch: run_name(dataset, kind, model, s, seed, sch, mode) for sch in schedules}
    if all(kept(dataset, n).exists() for n in names.values()):
        return "done"
    out = ROOT / "runs" / "generated" / run_name(dataset, kind, model, s, seed, "-".join(schedules), mode)
    data = ROOT / "sets" / (f"{dataset}-{kind}.pt" if kind.endswith("-tensor") else f"{dataset}-{kind}")
    hald_args = ["--data", str(data), "--val", str(Path(data_roots[dataset]) / d["val"]),
                 "--teacher", str(d["teacher"]), "--model", model, *PINNED, *d["args"], "--slc", str(10 * s),
                 "--teacher-mode", mode, "--seed", str(seed), "--schedule", " ".join(schedules)]
    status = run_one((out, hald_args))[1]
    for sch, name in names.items():
        summary = out / sch / "summary.json" if len(schedules) > 1 else out / "summary.json"
        if summary.exists():
            kept(dataset, name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(summary, kept(dataset, name))
    return status


def summaries(folder: Path, stem: str) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob(f"{stem}-seed*.json"))]


def table(dataset: str) -> str:
    """Last-epoch top-1 (mean +- std over seeds) by set, schedule and s, the real draw's rows first, then
    HALD minus soft-only per seed; the drift figures of each set (seed 0, s = 1) below."""
    d = DATASETS[dataset]
    columns = sorted({s for ds, _, s, _ in PLAN if ds == dataset})
    models = list(dict.fromkeys(m for ds, m, _, _ in PLAN if ds == dataset))
    head = ["| set | schedule | " + " | ".join("ceiling (soft-only, a fresh label per crop)" if s == 300 else f"s={s}" for s in columns) + " |",
            "|---" * (len(columns) + 2) + "|"]
    lines, drift = list(head), {}
    for model in models:
        suffix = WIDTH_SUFFIX.get((dataset, model), "")
        sets = [("real draw", lambda sch, s: (d["real"], f"{d['real_rows']['ceiling' if s == 300 else sch]}{suffix if s != 300 else ''}-s{s}"))]
        sets += [(kind, lambda sch, s, kind=kind: (d["results"] / "generated", f"{dataset}-{kind}{suffix}-{sch}-s{s}")) for kind in KINDS]
        for label, where in sets:
            runs = {(sch, s): summaries(*where(sch, s)) if s != 300 or sch == "soft" else [] for sch in ("soft", "shs") for s in columns}
            for sch in ("soft", "shs"):
                cells = [cell(runs[sch, s]) if runs[sch, s] else "" for s in columns]
                lines.append(f"| {label}{' (' + model + ')' if len(models) > 1 else ''} | {'soft-only' if sch == 'soft' else 'HALD'} | " + " | ".join(cells) + " |")
            gains = []
            for s in columns:
                pairs = [(h["final_top1"] - o["final_top1"]) for h, o in zip(runs["shs", s], runs["soft", s])
                         if h["config"]["seed"] == o["config"]["seed"]]
                gains.append(f"**{statistics.mean(pairs):+.1f}** ({', '.join(f'{p:+.1f}' for p in pairs)})" if pairs else "")
            lines.append(f"| {label}{' (' + model + ')' if len(models) > 1 else ''} | HALD - soft-only | " + " | ".join(gains) + " |")
            first = runs["soft", columns[0]]
            if first and label not in drift:
                drift[label] = first[0]
    lines += ["", "| set | teacher agreement with the class folders % | teacher crop mismatch | crop trace (mean) | crop trace (median) |",
              "|---|---|---|---|---|"]
    for label, s in drift.items():
        dr = s["drift"]
        lines.append(f"| {label} | {s.get('teacher_agreement', float('nan')):.1f} | {dr.get('teacher_crop_mismatch', float('nan')):.3f} | "
                     f"{dr.get('teacher_crop_trace_mean', float('nan')):.3f} | {dr.get('teacher_crop_trace_median', float('nan')):.3f} |")
    return "\n".join(lines)


def paired_cells(base: dict, other: dict) -> str:
    """Two sets of runs by seed -> "base | other | mean difference (per seed)" over the seeds both have ("" for none)."""
    seeds = sorted(base.keys() & other.keys())
    if not seeds:
        return ""
    diffs = [other[k]["final_top1"] - base[k]["final_top1"] for k in seeds]
    return (f"{cell([base[k] for k in seeds])} | {cell([other[k] for k in seeds])} | **{statistics.mean(diffs):+.1f}** "
            f"({', '.join(f'{d:+.1f}' for d in diffs)})")


def teacher_mode_table(dataset: str = "cifar10") -> str:
    """The teacher's mode at relabel, train (batch statistics) against eval (running statistics), on each generated
    set at each s that has eval runs: last-epoch top-1 by schedule, and eval minus train per seed."""
    lines = ["| set | s | schedule | teacher train mode | teacher eval mode | eval - train (per seed) |", "|---|---|---|---|---|---|"]
    folder = DATASETS[dataset]["results"] / "generated"
    for kind in KINDS:
        for s in sorted({s for ds, _, s, _ in PLAN if ds == dataset and s != 300}):
            for sch in ("shs", "soft"):
                runs = {mode: {x["config"]["seed"]: x for x in summaries(folder, f"{dataset}-{kind}{suffix}-{sch}-s{s}")}
                        for mode, suffix in MODE_SUFFIX.items()}
                pair = paired_cells(runs["train"], runs["eval"])
                if pair:
                    lines.append(f"| {kind} | {s} | {'HALD' if sch == 'shs' else 'soft-only'} | {pair} |")
    return "\n".join(lines)


def tensor_table(dataset: str = "cifar10") -> str:
    """The second recover set from its tensor file (the optimised values) against its PNGs (rounded to 8 bits): top-1
    by schedule and s, and tensor minus PNG per seed."""
    lines = ["| s | schedule | PNG (8-bit) | tensor file | tensor - PNG (per seed) |", "|---|---|---|---|---|"]
    folder = DATASETS[dataset]["results"] / "generated"
    for s in sorted({s for ds, _, s, _ in PLAN if ds == dataset and s != 300}):
        for sch in ("shs", "soft"):
            runs = {kind: {x["config"]["seed"]: x for x in summaries(folder, f"{dataset}-{kind}-{sch}-s{s}")} for kind in TENSOR_KINDS}
            pair = paired_cells(runs["recover-png"], runs["recover-tensor"])
            if pair:
                lines.append(f"| {s} | {'HALD' if sch == 'shs' else 'soft-only'} | {pair} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="CIFAR-10 root with test/")
    parser.add_argument("--tiny", default="/tmp/tiny", help="unpacked Tiny-ImageNet-200 with val/")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--only", default="", help="only the plan lines whose 'dataset student' contains this text")
    parser.add_argument("--seeds", default="", help="only these seeds (comma-separated; default: each plan line's)")
    parser.add_argument("--kind", default="", choices=("", *KINDS, *TENSOR_KINDS), help="only the sets of this kind")
    parser.add_argument("--teacher-mode", default="train", choices=tuple(MODE_SUFFIX), help="the teacher's mode at relabel")
    parser.add_argument("--crops", default="", help="only these crops per image s (comma-separated; 300 = the ceiling)")
    parser.add_argument("--table-only", action="store_true", help="print the tables from the committed summaries, run nothing")
    args = parser.parse_args()
    if not args.table_only:
        roots = {"cifar10": args.cifar, "tiny32": args.tiny}
        jobs = jobs_for(args)
        for dataset in {j[0] for j in jobs}:
            if not (Path(roots[dataset]) / DATASETS[dataset]["val"]).is_dir():
                sys.exit(f"evidence_generated: {roots[dataset]}/{DATASETS[dataset]['val']} not found: pass --cifar or --tiny")
        start = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (job, status) in enumerate(zip(jobs, pool.map(lambda j: run(j, roots), jobs))):
                print(f"[{i + 1}/{len(jobs)}] {run_name(*job[:5], '-'.join(job[5]), job[6])}: {status} ({time.time() - start:.0f}s)", flush=True)
    for dataset in DATASETS:
        print(f"\n{dataset}: IPC 10, generator-made sets beside the real draw\n{table(dataset)}")
    print(f"\ncifar10: the teacher's mode at relabel on the generator-made sets (IPC 10, default student)\n{teacher_mode_table()}")
    print(f"\ncifar10: the recover set from its tensor file and from its PNGs (IPC 10, default student)\n{tensor_table()}")


if __name__ == "__main__":
    main()
