"""Does HALD beat soft-only at 200 classes? Tiny-ImageNet at 32 px on a CPU.

    python tools/evidence_tiny.py --tiny /tmp/tiny --jobs 2      # the table (skips finished runs)
    python tools/evidence_tiny.py --tiny /tmp/tiny --teacher-only # the teacher alone
    python tools/evidence_tiny.py --table-only                   # the table from the committed summaries

--tiny is the unpacked Tiny-ImageNet-200 (train/<wnid>/, val/<wnid>/; see
../shared/data/tiny-imagenet/README.md). The distilled set is IPC 10 real training images per
class drawn at random (random.Random(0).sample of each class's sorted files, classes in sorted
order), linked into OUT/distilled. The teacher is results/tiny-imagenet/teacher.pt, trained by
hald.py (TEACHER_ARGS below) when it is missing. Each finished run's summary.json is copied to
results/tiny-imagenet/runs/<row>-s<s>-seed<seed>.json, which is what the table is made from and
what makes a run count as done: commit those files and the table is reproduced without rerunning.
"""
import argparse
import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "tiny-imagenet"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import cell, picked, run_one, slug  # noqa: E402

IPC, SIZE = 10, 32
# the teacher: a BatchNorm ConvNet-3 of width 64 on all 100,000 training images, 16 epochs,
# crops of at least 35 % of the image, no CutMix, smoothing 0.1, LR cosine to 0 (eta 1)
TEACHER_ARGS = ["--ipc", "500", "--schedule", "hard", "--model", "convnet_bn64", "--epochs", "16", "--batch-size", "256",
                "--crop-scale", "0.35", "--no-cutmix", "--eta", "1", "--lr", "2e-3", "--label-smoothing", "0.1",
                "--eval-every", "4", "--drift-crops", "0", "--seed", "0"]
AUTHORS, DEFAULTS = ["--label-smoothing", "0.8", "--temperature", "20"], ["--label-smoothing", "0.1", "--temperature", "4"]
SOFT_T4, SOFT_T20 = ["--schedule", "soft", "--temperature", "4"], ["--schedule", "soft", "--temperature", "20"]
IN = ["--model", "convnet64"]
HALD = ["--schedule", "shs", *DEFAULTS]  # the split pinned in main's common arguments: the authors' 75 / 150 / 75
SHORT = [*HALD, "--soft-epochs", "240"]  # soft 120 / hard 60 / soft 120: the auto split of these students
RESET = [*SHORT, "--phase-switch", "reset"]  # hald.py's default HALD since issue 35: AdamW's state cleared at each switch
# (row label, hald.py arguments, crops per image, seeds), in order of priority: the jobs run seed-major
# over the rows, so an interrupted study still fills every cell once. The student is hald.py's default
# normalisation, BatchNorm, at width 64 (convnet_bn64, set in main's common arguments); the last rows
# are the instance-norm student (convnet64), the default until the BatchNorm rows replaced it.
# hald.py's defaults are smoothing 0.1 and T 4; every row names its values. HALD's split is pinned (common
# arguments) to the authors' 75 / 150 / 75, unless a row passes its own: the 120 / 60 / 120 rows' split is
# hald.py's auto split for these BatchNorm students since bc7b2e0.
ROWS = [
    ("soft-only (T 4)", SOFT_T4, 1, 3),
    ("HALD, authors' split (soft 75 / hard 150 / soft 75)", HALD, 1, 3),
    ("hard-only (0.1)", ["--schedule", "hard", "--label-smoothing", "0.1"], 1, 3),
    ("HALD, authors' split, authors' 0.8 / T 20", ["--schedule", "shs", *AUTHORS], 1, 3),
    ("HALD, soft 120 / hard 60 / soft 120", SHORT, 1, 3),
    ("soft-only (T 4)", SOFT_T4, 2, 3),
    ("HALD, soft 120 / hard 60 / soft 120", SHORT, 2, 3),
    ("HALD, authors' split (soft 75 / hard 150 / soft 75)", HALD, 2, 3),
    ("HALD, soft 120 / hard 60 / soft 120, AdamW reset at each switch", RESET, 1, 3),
    ("HALD, soft 120 / hard 60 / soft 120, AdamW reset at each switch", RESET, 2, 3),
    ("ceiling: soft-only, a fresh label per crop (T 4)", SOFT_T4, 300, 1),
    ("soft-only (T 4), width 128", [*SOFT_T4, "--model", "convnet_bn"], 1, 3),
    ("HALD, soft 120 / hard 60 / soft 120, width 128", [*SHORT, "--model", "convnet_bn"], 1, 3),
    ("instance norm: soft-only (T 4)", [*SOFT_T4, *IN], 1, 3),
    ("instance norm: HALD, authors' split", [*HALD, *IN], 1, 3),
    ("instance norm: soft-only (T 20)", [*SOFT_T20, *IN], 1, 3),
    ("instance norm: HALD, authors' split, authors' 0.8 / T 20", ["--schedule", "shs", *AUTHORS, *IN], 1, 3),
    ("instance norm: HALD, authors' split, 0.8 / T 4", ["--schedule", "shs", "--label-smoothing", "0.8", "--temperature", "4", *IN], 1, 1),
    ("instance norm: hard-only (0.8)", ["--schedule", "hard", "--label-smoothing", "0.8", *IN], 1, 2),
    ("instance norm: soft-only (T 20)", [*SOFT_T20, *IN], 2, 1),
    # the reset (hald.py's default since issue 35) for the two other students of s = 1
    ("HALD, soft 120 / hard 60 / soft 120, AdamW reset at each switch, width 128", [*RESET, "--model", "convnet_bn"], 1, 3),
    ("instance norm: HALD, authors' split, AdamW reset at each switch", [*HALD, *IN, "--phase-switch", "reset"], 1, 2),
    # issue 45's candidate t2 where keep was ahead of the reset: AdamW's state kept, the soft loss scaled by T^2
    ("HALD, soft 120 / hard 60 / soft 120, t2 (AdamW kept, soft loss x T^2)", [*SHORT, "--phase-switch", "t2"], 1, 3),
    # issue 45's candidate warmup: the reset, then the LR ramped over AdamW's first 100 steps after each switch
    ("HALD, soft 120 / hard 60 / soft 120, warmup (AdamW reset, LR ramped over 100 steps)", [*SHORT, "--phase-switch", "warmup"], 1, 3),
    ("HALD, soft 120 / hard 60 / soft 120, warmup over 1,000 steps (AdamW reset)", [*SHORT, "--phase-switch", "warmup", "--warmup-steps", "1000"], 1, 3),
    # issue 45's item 1: the default width-128 student at the paper's budget, s = 10 (one seed each, about an hour a run on one core)
    ("HALD, soft 120 / hard 60 / soft 120, AdamW reset at each switch, width 128", [*RESET, "--model", "convnet_bn"], 10, 1),
    ("HALD, soft 120 / hard 60 / soft 120, width 128", [*SHORT, "--model", "convnet_bn"], 10, 1),
    ("soft-only (T 4), width 128", [*SOFT_T4, "--model", "convnet_bn"], 10, 1),
]


def draw_distilled(train: Path, out: Path, ipc: int = IPC, seed: int = 0) -> Path:
    """IPC random training images per class, linked into out/<wnid>/ (made once)."""
    if out.is_dir():
        return out
    rng, tmp = random.Random(seed), out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for wnid in sorted(d.name for d in train.iterdir() if d.is_dir()):
        (tmp / wnid).mkdir(parents=True)
        for f in rng.sample(sorted((train / wnid).iterdir()), ipc):
            (tmp / wnid / f.name).symlink_to(f.resolve())
    tmp.rename(out)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", help="unpacked Tiny-ImageNet-200 with train/ and val/")
    parser.add_argument("--table-only", action="store_true", help="print the table from the committed summaries, run nothing")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "tiny"), help="working folder: caches, checkpoints, logs")
    parser.add_argument("--teacher-only", action="store_true")
    parser.add_argument("--only", default="", help="run only this row, or the rows whose label contains this text (several split by |)")
    parser.add_argument("--seeds", default="0,1,2", help="run only these seeds (comma-separated)")
    parser.add_argument("--crops", default="", help="run only these crops per image s (comma-separated; default all)")
    args = parser.parse_args()
    if args.table_only:
        return print(table())
    if not args.tiny:
        sys.exit("evidence_tiny: --tiny is required (the unpacked Tiny-ImageNet-200)")
    tiny, out = Path(args.tiny), Path(args.out)
    if not (tiny / "train").is_dir() or not (tiny / "val").is_dir():
        sys.exit(f"evidence_tiny: {tiny}/train or {tiny}/val not found: unpack Tiny-ImageNet-200 there")
    teacher = RESULTS / "teacher.pt"
    crops = {int(s) for s in args.crops.split(",") if s}
    labels = {r[0] for r in ROWS}
    rows = [r for r in ROWS if picked(r[0], args.only, labels) and (not crops or r[2] in crops)]
    if not teacher.exists() and (args.teacher_only or any("hard" not in r[1] for r in rows)):  # hard-only needs none
        job = (out / "teacher", ["--data", str(tiny / "train"), "--val", str(tiny / "val"), "--image-size", str(SIZE),
                                 *TEACHER_ARGS, "--save-model", str(teacher)])
        print(f"training the teacher: {run_one(job, threads=os.cpu_count())[1]}", flush=True)
        shutil.copy(out / "teacher" / "summary.json", RESULTS / "teacher-summary.json")
    if args.teacher_only:
        return
    distilled = draw_distilled(tiny / "train", out / f"distilled-ipc{IPC}-seed0")
    common = ["--data", str(distilled), "--val", str(tiny / "val"), "--teacher", str(teacher), "--ipc", str(IPC),
              "--image-size", str(SIZE), "--model", "convnet_bn64", "--epochs", "300", "--eval-every", "25",
              "--soft-epochs", "150", "--phase-switch", "keep"]  # AdamW kept across phases: how every row was measured
    jobs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, extra, s, seeds in rows:
            if seed < seeds:
                name = f"{slug(label)}-s{s}-seed{seed}"
                jobs.append((name, (out / name, [*common, *extra, "--slc", str(IPC * s), "--seed", str(seed)])))

    def run(named):
        name, job = named
        done = RESULTS / "runs" / f"{name}.json"
        if done.exists():
            return name, "done"
        status = run_one(job)[1]
        if (job[0] / "summary.json").exists():
            done.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(job[0] / "summary.json", done)
        return name, status

    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        for i, (name, status) in enumerate(pool.map(run, jobs)):
            print(f"[{i + 1}/{len(jobs)}] {name}: {status} ({time.time() - start:.0f}s)", flush=True)
    (RESULTS / "table.md").write_text(table() + "\n")
    print(table())


def table() -> str:
    """Last-epoch top-1 mean +- std (n, median minutes) per row and crops per image, from the committed summaries."""
    columns = sorted({s for _, _, s, _ in ROWS})
    lines = ["| setting | " + " | ".join(f"s={s} (SLC {IPC * s})" for s in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in dict.fromkeys(r[0] for r in ROWS):
        cells = []
        for s in columns:
            summaries = [json.loads(f.read_text()) for f in sorted((RESULTS / "runs").glob(f"{slug(label)}-s{s}-seed*.json"))]
            cells.append(cell(summaries) if summaries else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
