"""Does HALD's win depend on the number of classes? Tiny-ImageNet at 32 px, nested subsets of 10, 50 and 200 classes.

    python tools/evidence_classes.py --tiny /tmp/tiny --jobs 2            # every missing run (10 classes first)
    python tools/evidence_classes.py --tiny /tmp/tiny --classes 10 --seeds 0
    python tools/evidence_classes.py --table-only                         # the table from the committed summaries

The subsets: the 200 classes in the order random.Random(0).shuffle gives their sorted WordNet ids; the first 10 and the
first 50 (so the 10 are among the 50). The images: the IPC-10 draw of tools/evidence_tiny.py (the same 10 images per
class at every class count), its class folders linked into runs/classes/c<k>/distilled/; --val: the official validation
images of the same classes. The teacher: results/tiny-imagenet/teacher.pt (200 classes) restricted to the subset's
classes: its last layer keeps only their rows, so its labels are softmax over their logits alone, the 200-class
teacher's prediction given that the image is one of the k classes (written once to runs/classes/c<k>/teacher.pt, with
the subset's class names). Student and settings as every Tiny-ImageNet row: the BatchNorm ConvNet-3 of width 64,
IPC 10, 300 epochs, T 4, smoothing 0.1, HALD soft 120 / hard 60 / soft 120 with AdamW reset at each switch (hald.py's
defaults), last-epoch top-1. One cache per class count, s and seed, shared by HALD and soft-only. At 200 classes the
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
from evidence import cell, run_one  # noqa: E402
from evidence_tiny import IPC, SIZE, draw_distilled  # noqa: E402

CLASSES, CROPS, SEEDS = (10, 50, 200), (1, 2, 10), 3
PINNED = ["--ipc", str(IPC), "--image-size", str(SIZE), "--model", "convnet_bn64", "--epochs", "300", "--eval-every", "25",
          "--temperature", "4", "--label-smoothing", "0.1", "--soft-epochs", "240", "--phase-switch", "reset"]
SCHEDULES = {"soft": ["--schedule", "soft"], "shs": ["--schedule", "shs"]}
# at 200 classes the committed tools/evidence_tiny.py rows with these settings, by schedule
AT_200 = {"soft": "soft-only-t-4", "shs": "hald-soft-120-hard-60-soft-120-adamw-reset-at-each-switch"}


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
    if k == 200 and s in (1, 2, 300):  # the committed 200-class rows
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


def gains() -> dict:
    """(classes, s) -> HALD minus soft-only per seed (the seeds measured for both)."""
    found = {}
    for k in CLASSES:
        for s in CROPS:
            soft, shs = load(k, "soft", s), load(k, "shs", s)
            if seeds := sorted(soft.keys() & shs.keys()):
                found[k, s] = [shs[i]["final_top1"] - soft[i]["final_top1"] for i in seeds]
    return found


def table() -> str:
    lines = ["| classes | s | soft-only % | HALD (reset) % | HALD minus soft-only (per seed) | ceiling % (s = 300) |",
             "|---|---|---|---|---|---|"]
    measured = gains()
    for k in CLASSES:
        ceiling = load(k, "soft", 300)
        for s in CROPS:
            soft, shs = load(k, "soft", s), load(k, "shs", s)
            if not soft and not shs:
                continue
            d = measured.get((k, s), [])
            gain = f"**{statistics.mean(d):+.1f}** ({', '.join(f'{v:+.1f}' for v in d)})" if d else ""
            lines.append(f"| {k} | {s} | {cell(list(soft.values())) if soft else ''} | {cell(list(shs.values())) if shs else ''} | "
                         f"{gain} | {cell(list(ceiling.values())) if ceiling and s == CROPS[0] else ''} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", default="/tmp/tiny", help="unpacked Tiny-ImageNet-200 with train/ and val/")
    parser.add_argument("--classes", default="10,50,200", help="class counts, in this order")
    parser.add_argument("--crops", default="1,2,10", help="stored crops per image s, in this order")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ceiling", action="store_true", help="also the unlimited-label ceiling (soft-only, s = 300, seed 0)")
    parser.add_argument("--jobs", type=int, default=2, help="cells in parallel (one thread each)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "classes"), help="working folder: subsets, teachers, caches, runs")
    parser.add_argument("--table-only", action="store_true", help="print the table from the committed summaries, run nothing")
    args = parser.parse_args()
    if not args.table_only:
        tiny = Path(args.tiny)
        if not (tiny / "train").is_dir() or not (tiny / "val").is_dir():
            sys.exit(f"evidence_classes: {tiny}/train or {tiny}/val not found: unpack Tiny-ImageNet-200 there")
        jobs = [(int(k), int(s), int(seed), tuple(SCHEDULES), tiny, Path(args.out)) for k in args.classes.split(",")
                for seed in args.seeds.split(",") for s in args.crops.split(",")]
        jobs += [(int(k), 300, 0, ("soft",), tiny, Path(args.out)) for k in args.classes.split(",")] if args.ceiling else []
        for k in {job[0] for job in jobs}:  # subsets and teachers before the threads
            prepare(tiny, k, Path(args.out))
        start = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (job, status) in enumerate(zip(jobs, pool.map(run_cell, jobs))):
                print(f"[{i + 1}/{len(jobs)}] {job[0]} classes, s={job[1]}, seed {job[2]}: {status} ({time.time() - start:.0f}s)", flush=True)
    print(f"Tiny-ImageNet 32 px: HALD (AdamW reset) against soft-only by class count (IPC 10, ConvNet-3 BN 64)\n{table()}")


if __name__ == "__main__":
    main()
