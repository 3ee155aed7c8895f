"""Does HALD's win depend on the number of classes? Tiny-ImageNet at 32 px, nested subsets of 10, 50 and 200 classes.

    python tools/evidence_classes.py --tiny /tmp/tiny --jobs 2            # every missing run (10 classes first)
    python tools/evidence_classes.py --tiny /tmp/tiny --classes 10 --seeds 0
    python tools/evidence_classes.py --table-only                         # the table from the committed summaries
    python tools/evidence_classes.py --table-only --picture results/classes/gain.png   # and the README's picture

The subsets: the 200 classes in the order random.Random(0).shuffle gives their sorted WordNet ids; the first 10 and the
first 50 (so the 10 are among the 50). The images: the IPC-10 draw of tools/evidence_tiny.py (the same 10 images per
class at every class count), its class folders linked into runs/classes/c<k>/distilled/; --val: the official validation
images of the same classes. The teacher: results/tiny-imagenet/teacher.pt (200 classes) restricted to the subset's
classes: its last layer keeps only their rows, so its labels are softmax over their logits alone, the 200-class
teacher's prediction given that the image is one of the k classes (written once to runs/classes/c<k>/teacher.pt, with
the subset's class names). Student and settings as every Tiny-ImageNet row: the BatchNorm ConvNet-3 of width 64,
IPC 10, 300 epochs, T 4, smoothing 0.1, HALD soft 120 / hard 60 / soft 120 with AdamW reset at each switch (hald.py's
defaults), last-epoch top-1; and where asked (--schedules shs-keep) HALD with AdamW's state kept, the authors', or
(shs-h30, shs-h15, shs-h5) HALD with a hard phase of 30, 15 or 5 epochs placed as the default's 60. One
cache per class count, s and seed, shared by the schedules. At 200 classes the
table takes the committed rows of tools/evidence_tiny.py (the same settings), and runs only what they lack (s = 10).
Each finished run's summary.json goes to results/classes/c<k>-<schedule>-s<s>-seed<seed>.json.
"""
import argparse
import json
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "classes"
TINY_RUNS = ROOT / "results" / "tiny-imagenet" / "runs"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hald  # noqa: E402
from evidence import cell, gain_table, run_one  # noqa: E402
from evidence_tiny import IPC, SIZE, draw_distilled  # noqa: E402

CLASSES, CROPS, SEEDS = (10, 50, 200), (1, 2, 4, 10), 3
PINNED = ["--ipc", str(IPC), "--image-size", str(SIZE), "--model", "convnet_bn64", "--epochs", "300", "--eval-every", "25",
          "--temperature", "4", "--label-smoothing", "0.1", "--soft-epochs", "240", "--phase-switch", "reset"]
PAPER = (10, 42.7 - 33.7)  # the paper's ImageNet-1K point (1,000 classes, IPC 10, SLC 100): HALD 42.7 %, soft-only (LPLD) 33.7 %
# at 200 classes the committed tools/evidence_tiny.py rows with these settings, by schedule
# shs-keep: HALD with AdamW's state kept across the switches (the authors'); an epoch has 7 steps at 10 classes, 32 at 50
# and 125 at 200 (IPC 10, batch 16), so the class count also sets how many steps AdamW has to forget the other phase
SCHEDULES = {"soft": ["--schedule", "soft"], "shs": ["--schedule", "shs"], "shs-keep": ["--schedule", "shs", "--phase-switch", "keep"]}
# issue 35's item 2 on a second dataset: HALD (reset) with a hard phase of H epochs placed as the default's 60, the soft
# epochs split evenly around it
HARD = (60, 30, 15, 5)
SCHEDULES.update({f"shs-h{h}": ["--schedule", "shs", "--soft-epochs", str(300 - h)] for h in HARD[1:]})
MAIN = ("soft", "shs", "shs-keep")
AT_200 = {"soft": "soft-only-t-4", "shs": "hald-soft-120-hard-60-soft-120-adamw-reset-at-each-switch",
          "shs-keep": "hald-soft-120-hard-60-soft-120",
          # issue 45's candidates (tools/evidence_tiny.py's rows), read by tools/evidence_switch.py's candidates table
          "shs-t2": "hald-soft-120-hard-60-soft-120-t2-adamw-kept-soft-loss-x-t-2",
          "shs-warmup": "hald-soft-120-hard-60-soft-120-warmup-adamw-reset-lr-ramped-over-100-steps",
          "shs-warmup-1000": "hald-soft-120-hard-60-soft-120-warmup-over-1-000-steps-adamw-reset"}


def subset(wnids: list[str], k: int) -> list[str]:
    """The first k of the 200 classes in a fixed shuffled order, sorted (hald.py pairs classes by sorted position)."""
    order = sorted(wnids)
    random.Random(0).shuffle(order)
    return sorted(order[:k])


def restrict_teacher(source: Path, classes: list[str], path: Path) -> Path:
    """A hald.py checkpoint of `source` whose last layer keeps only the rows of `classes` (made once)."""
    if path.exists():
        return path
    weights = hald.read_weights(source, what="teacher")
    model = hald.model_from_weights(weights, len(weights["classes"]), weights["image_size"], "teacher")
    keep = torch.tensor([weights["classes"].index(c) for c in classes])
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight = torch.nn.Parameter(head.weight.data[keep].clone())
    head.bias = torch.nn.Parameter(head.bias.data[keep].clone())
    head.out_features = len(classes)
    hald.save_checkpoint(model, weights["arch"], classes, weights["image_size"], path, weights["stats"])
    return path


def prepare(tiny: Path, k: int, work: Path) -> tuple[Path, Path, Path]:
    """The subset's distilled images, validation images (folders of links) and restricted teacher."""
    draw = draw_distilled(tiny / "train", ROOT / "runs" / "tiny" / f"distilled-ipc{IPC}-seed0")
    classes = subset([d.name for d in draw.iterdir() if d.is_dir()], k)
    folders = []
    for name, source in (("distilled", draw), ("val", tiny / "val")):
        folder = work / f"c{k}" / name
        if not folder.is_dir():
            tmp = folder.with_name(name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for c in classes:
                (tmp / c).symlink_to((source / c).resolve())
            tmp.rename(folder)
        folders.append(folder)
    teacher = restrict_teacher(ROOT / "results" / "tiny-imagenet" / "teacher.pt", classes, work / f"c{k}" / "teacher.pt")
    return folders[0], folders[1], teacher


def summary_path(k: int, schedule: str, s: int, seed: int) -> Path:
    if k == 200 and s in (1, 2, 300) and schedule in AT_200:  # the committed 200-class rows
        stem = AT_200[schedule] if s != 300 else "ceiling-soft-only-a-fresh-label-per-crop-t-4"
        return TINY_RUNS / f"{stem}-s{s}-seed{seed}.json"
    return RESULTS / f"c{k}-{schedule}-s{s}-seed{seed}.json"


def run_cell(job) -> str:
    """HALD and soft-only of one class count, s and seed, one after the other from one cache."""
    k, s, seed, schedules, tiny, work = job
    data, val, teacher = prepare(tiny, k, work)
    done = 0
    for schedule in schedules:
        path = summary_path(k, schedule, s, seed)
        if not path.exists():
            out = work / path.stem
            run_one((out, ["--data", str(data), "--val", str(val), "--teacher", str(teacher), *PINNED, *SCHEDULES[schedule],
                           "--slc", str(IPC * s), "--seed", str(seed), "--cache", str(work / "caches" / f"c{k}-s{s}-seed{seed}.pt")]))
            if (out / "summary.json").exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / "summary.json", path)
        done += path.exists()
    return f"{done}/{len(schedules)} done"


def load(k: int, schedule: str, s: int) -> dict:
    """seed -> summary of the committed runs of one cell."""
    paths = {seed: summary_path(k, schedule, s, seed) for seed in range(SEEDS)}
    return {seed: json.loads(p.read_text()) for seed, p in paths.items() if p.exists()}


def diffs(k: int, schedule: str, s: int) -> dict:
    """seed -> `schedule` minus soft-only, for the seeds measured for both."""
    soft = load(k, "soft", s)
    return {i: r["final_top1"] - soft[i]["final_top1"] for i, r in sorted(load(k, schedule, s).items()) if i in soft}


def gains(schedule: str = "shs") -> dict:
    """(classes, s) -> HALD minus soft-only per seed (the seeds measured for both)."""
    return {(k, s): list(d.values()) for k in CLASSES for s in CROPS if (d := diffs(k, schedule, s))}


def table() -> str:
    lines = ["| classes | s | soft-only % | HALD (reset) % | minus soft-only (per seed) | HALD, AdamW kept % | minus soft-only "
             "(per seed) | ceiling % (s = 300) |", "|---|---|---|---|---|---|---|---|"]
    measured = {schedule: gains(schedule) for schedule in ("shs", "shs-keep")}
    for k in CLASSES:
        ceiling = load(k, "soft", 300)
        for s in CROPS:
            runs = {schedule: load(k, schedule, s) for schedule in MAIN}
            if not any(runs.values()):
                continue
            cells = []
            for schedule in MAIN:
                d = measured.get(schedule, {}).get((k, s), [])
                cells += [cell(list(runs[schedule].values())) if runs[schedule] else ""]
                cells += [f"**{statistics.mean(d):+.1f}** ({', '.join(f'{v:+.1f}' for v in d)})" if d else ""] if schedule != "soft" else []
            lines.append(f"| {k} | {s} | {' | '.join(cells)} | {cell(list(ceiling.values())) if ceiling and s == CROPS[0] else ''} |")
    return "\n".join(lines)


def crossovers() -> str:
    """Per class count, the s where HALD (reset) minus soft-only crosses zero: the first pair of neighbouring budgets
    whose mean gains change sign, interpolated linearly in log s."""
    found, said = gains(), []
    for k in CLASSES:
        points = sorted((s, statistics.mean(d)) for (c, s), d in found.items() if c == k)
        cross = next(((a, ga, b, gb) for (a, ga), (b, gb) in zip(points, points[1:]) if ga > 0 >= gb), None)
        if cross:
            a, ga, b, gb = cross
            said.append(f"{k} classes: s* = {a * (b / a) ** (ga / (ga - gb)):.1f} (between {a}, {ga:+.1f}, and {b}, {gb:+.1f})")
        elif points:
            said.append(f"{k} classes: none up to s = {points[-1][0]} ({', '.join(f'{g:+.1f} at {s}' for s, g in points)})")
    return "; ".join(said)


def hard_table() -> str:
    """HALD (reset) minus soft-only by the hard phase's length, where a shorter one was run ("" where none was)."""
    rows = {}
    for k in CLASSES:
        for s in CROPS:
            runs = {h: diffs(k, "shs" if h == 60 else f"shs-h{h}", s) for h in HARD}
            if any(runs[h] for h in HARD[1:]):
                rows[k, s] = runs
    return gain_table("classes", rows, {h: f"hard {h}{' (default)' if h == 60 else ''}" for h in HARD}) if rows else ""


def switch_table() -> str:
    """Reset against keep (issue 45's item 1), paired by seed, where both were measured: HALD minus soft-only with each, reset
    minus keep, and the steps of the last soft phase (120 epochs of ceil(k * IPC / 16) steps)."""
    lines = ["| classes | s | reset minus soft-only | keep minus soft-only | reset minus keep (per seed) | last soft phase, steps |",
             "|---|---|---|---|---|---|"]
    for k in CLASSES:
        for s in CROPS:
            reset, keep = load(k, "shs", s), load(k, "shs-keep", s)
            seeds = sorted(reset.keys() & keep.keys())
            if not seeds:
                continue
            gain, kept = diffs(k, "shs", s), diffs(k, "shs-keep", s)
            paired = [reset[i]["final_top1"] - keep[i]["final_top1"] for i in seeds]
            mean = lambda d: f"{statistics.mean(d.values()):+.1f}" if d else ""  # noqa: E731
            lines.append(f"| {k} | {s} | {mean(gain)} | {mean(kept)} | **{statistics.mean(paired):+.2f}** ("
                         + ", ".join(f"{v:+.2f}" for v in paired) + f") | {120 * -(-k * IPC // 16):,} |")
    return "\n".join(lines)


def picture(path: Path) -> None:
    """HALD minus soft-only against s, a line per class count (mean and each seed), CIFAR-10's real draw beside them
    (tools/evidence_switch.py, the same student family at 32 px), and the paper's ImageNet-1K point."""
    import matplotlib  # an extra of this picture only (make tables installs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evidence_switch import diffs as switch_diffs

    fig, ax = plt.subplots(figsize=(6.4, 4))
    lines = {f"Tiny-ImageNet, {k} classes": {s: d for (c, s), d in gains().items() if c == k} for k in CLASSES}
    cifar = {s: list(switch_diffs("real", "reset", s).values()) for s in CROPS}
    lines["CIFAR-10 (real draw), 10 classes"] = {s: d for s, d in cifar.items() if d}
    for i, (name, points) in enumerate(lines.items()):
        if not points:
            continue
        xs = sorted(points)
        style = dict(color=f"C{i}", ls="--" if name.startswith("CIFAR") else "-")
        ax.plot(xs, [statistics.mean(points[s]) for s in xs], "o", label=name, ms=5, **style)
        for s in xs:
            ax.plot([s] * len(points[s]), points[s], ".", color=f"C{i}", alpha=0.4, ms=4)
    ax.plot(*PAPER, "*", color="k", ms=12, label="paper: ImageNet-1K, 1,000 classes (ResNet-18)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xscale="log", xticks=list(CROPS), xticklabels=[str(s) for s in CROPS], xlabel="stored crops per image s (SLC / IPC)",
           ylabel="HALD minus soft-only (top-1 points)", title="HALD (AdamW reset at each switch) against soft-only, IPC 10")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", default="/tmp/tiny", help="unpacked Tiny-ImageNet-200 with train/ and val/")
    parser.add_argument("--classes", default="10,50,200", help="class counts, in this order")
    parser.add_argument("--crops", default="1,2,10", help="stored crops per image s, in this order")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--schedules", default="soft,shs", help=f"what to run (comma-separated): {', '.join(SCHEDULES)}")
    parser.add_argument("--ceiling", action="store_true", help="also the unlimited-label ceiling (soft-only, s = 300, seed 0)")
    parser.add_argument("--jobs", type=int, default=2, help="cells in parallel (one thread each)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "classes"), help="working folder: subsets, teachers, caches, runs")
    parser.add_argument("--table-only", action="store_true", help="print the table from the committed summaries, run nothing")
    parser.add_argument("--picture", default="", help="also draw HALD minus soft-only against s here (needs matplotlib)")
    args = parser.parse_args()
    if not args.table_only:
        tiny = Path(args.tiny)
        if not (tiny / "train").is_dir() or not (tiny / "val").is_dir():
            sys.exit(f"evidence_classes: {tiny}/train or {tiny}/val not found: unpack Tiny-ImageNet-200 there")
        jobs = [(int(k), int(s), int(seed), tuple(args.schedules.split(",")), tiny, Path(args.out)) for k in args.classes.split(",")
                for seed in args.seeds.split(",") for s in args.crops.split(",")]
        jobs += [(int(k), 300, 0, ("soft",), tiny, Path(args.out)) for k in args.classes.split(",")] if args.ceiling else []
        for k in {job[0] for job in jobs}:  # subsets and teachers before the threads
            prepare(tiny, k, Path(args.out))
        start = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (job, status) in enumerate(zip(jobs, pool.map(run_cell, jobs))):
                print(f"[{i + 1}/{len(jobs)}] {job[0]} classes, s={job[1]}, seed {job[2]}: {status} ({time.time() - start:.0f}s)", flush=True)
    print(f"Tiny-ImageNet 32 px: HALD (AdamW reset) against soft-only by class count (IPC 10, ConvNet-3 BN 64)\n{table()}")
    print(f"\nCrossover (HALD minus soft-only through zero, log-interpolated): {crossovers()}")
    if hard := hard_table():
        print(f"\nHALD (AdamW reset) minus soft-only by the hard phase's length, placed as the default's (per seed)\n{hard}")
    print(f"\nHALD with AdamW reset at each switch against kept, paired by seed (issue 45)\n{switch_table()}")
    if args.picture:
        picture(Path(args.picture))


if __name__ == "__main__":
    main()
