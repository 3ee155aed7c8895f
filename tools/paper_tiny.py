"""The HALD paper's own Tiny-ImageNet setting on one GPU: a ResNet-18 teacher trained on the full training set,
an SRe2L-style `recover` set of IPC 10 made from it, and ResNet-18 students trained on that set soft-only and
with HALD (the authors' split) at 1 and 2 crops per image (SLC 10 and 20), four processes at once on the one
GPU; one table beside the paper's figures. Every stage runs hald.py or tools/distill.py as a subprocess.

    python tools/paper_tiny.py --tiny-tars ../shared/data/tiny-imagenet --out runs/paper-tiny   # = make paper-tiny
    python tools/paper_tiny.py --tiny /tmp/tiny --out runs/paper-tiny          # already unpacked: train/, val/
    python tools/paper_tiny.py --tiny /tmp/tiny --toy --device cpu --out runs/paper-tiny-toy   # CPU, about a minute
    python tools/paper_tiny.py --help                                           # every flag with its doc line

The setting: Tiny-ImageNet, 200 classes, 64 px, 500 training and 50 validation images per class. The minutes
are ESTIMATES for one H100/H200 (from hald.py's H100 benchmark in RESULTS.md and FLOP counts), not measured:
- teacher, about 5 min with loading: hald.py --model resnet18 (CIFAR stem at 64 px) --schedule hard --ipc 500,
  20 epochs of batch 512, AdamW lr 2e-3 cosine to zero (--eta 1), RandomResizedCrop scale (0.25, 1) + flip,
  label smoothing 0.1, no CutMix, bf16 autocast (hald.py's on CUDA). A run this short converges faster with
  milder crops and without CutMix, and ends higher with the LR annealed to zero. SRe2L's teacher (torchvision's
  recipe, SGD, 50 epochs) reached 59.6 %; the aim here is >= 55 %. About 13 s an epoch (~8,000 img/s).
- recover, about 1.7 min: tools/distill.py recover with SRe2L's Tiny-ImageNet recipe (--lr 0.1 --r-bn 1
  --batch-size 200 --rrc) but 500 iterations per batch instead of its 4,000: distill.py runs the teacher in
  fp32, about 17 ms an iteration for 200 images, 10 batches; 4,000 iterations would take about 11 min alone.
- students, about 4.5 min: hald.py --model resnet18 --batch-size 16 --cuda-graph, soft-only (--schedule soft)
  and HALD (--schedule shs, --soft-epochs half the epochs: the authors' 75 / 150 / 75 split, scaled), 150
  epochs instead of the paper's 300. Processes share a GPU by time slices, so four graphed batch-16 runs
  together train at about what the GPU's busy time allows, ~5,000 img/s: 300 epochs would need ~8 min, more
  than the device time left after the teacher. HALD reuses the soft-label cache of the soft-only run at its
  SLC (identical labels). Label smoothing and T are hald.py's (-1 = auto: 0.1 and T 4 at 200 classes);
  --label-smoothing 0.8 --temperature 20 gives the authors' values.
In all about 12 minutes. table.md and paper_tiny.json record what was used and how long each stage took.

Stages skip when their output is complete (teacher/summary.json with teacher.pt, recover/distill.json, a
student's summary.json); hald.py runs always get --resume, so a teacher or student stopped part-way continues
from its last finished epoch (distill.py starts again). --until STAGE ends after that stage; --stop-after M
stops the children cleanly (SIGINT: hald.py keeps its checkpoint) after M minutes. Either way the table of
what is finished is written: run the same command (without --until) again to go on.

On the lent GPU machine (15 min of device time in all, at most 10 min a command; only the working tree travels,
64 MiB a call, and ../shared stays behind) the 150 MB of tars travel in three parts, in calls made back to back:
the machine keeps /tmp and runs/ only while it is warm (30 s after a call).

    # here, once: the parts, in a folder git ignores (so that it travels only when carried)
    mkdir -p .tiny .git/info && echo /.tiny/ >> .git/info/exclude
    split -b 50000000 -d ../shared/data/tiny-imagenet/train.tar.gz .tiny/train.tar.gz.part
    cp ../shared/data/tiny-imagenet/val.tar.gz .tiny/
    # device calls 1 and 2, carry [".tiny/train.tar.gz.part00"], then [".tiny/train.tar.gz.part01"]:
    mkdir -p /tmp/tiny-tars && mv .tiny/* /tmp/tiny-tars/
    # device call 3, carry [".tiny/train.tar.gz.part02", ".tiny/val.tar.gz"], timeout_s 600 (about 7 min):
    mkdir -p /tmp/tiny-tars && mv .tiny/* /tmp/tiny-tars/ && PYTHONUNBUFFERED=1 python3 tools/paper_tiny.py \\
        --tiny-tars /tmp/tiny-tars --out runs/paper-tiny --export $OUT --until recover --stop-after 9.2
    # device call 4 (about 5 min), M = the device minutes left (status: budget_left_s / 60) minus 1:
    PYTHONUNBUFFERED=1 python3 tools/paper_tiny.py --tiny-tars /tmp/tiny-tars --out runs/paper-tiny --export $OUT --stop-after M

--export $OUT brings back table.md, paper_tiny.json, paper_tiny.log and results.tar.gz (every log, summary and
curve; no model, no image) at the end of each call. Not run on a GPU yet: the first run measures the minutes above.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
HALD = HERE / "hald.py"
DISTILL = HERE / "tools" / "distill.py"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
UNPACKED_MARKER = ".paper_tiny_unpacked.json"
# The paper's Tiny-ImageNet figures (ResNet-18, IPC 10, FADRM images; from a secondary summary, unverified),
# keyed by (crops per image, schedule). Ours are recover images, not FADRM's.
PAPER = {(1, "soft"): 10.1, (1, "shs"): 18.6, (2, "soft"): 17.4, (2, "shs"): 22.8}
CROPS_PER_IMAGE = (1, 2)
SCHEDULES = (("soft", "soft-only"), ("shs", "HALD"))
STATUS_EVERY = 30  # seconds between status lines while the students train
TEACHER_AIM = 55.0
STAGES = ("teacher", "recover", "students")
CHOICES = {"device": ("auto", "cpu", "cuda"), "until": STAGES}


class PaperTinyError(Exception):
    """A problem with the user's input; main() prints it as one line."""


class StageFailed(PaperTinyError):
    """A stage's process failed; main() writes the table of what is finished, then prints it as one line."""


# ----------------------------------------------------------------------------- config
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    # data
    tiny: str = arg("", "unpacked Tiny-ImageNet: a folder holding train/<wnid>/ and val/<wnid>/ image folders")
    tiny_tars: str = arg("", "a folder holding train.tar.gz and val.tar.gz (or their parts train.tar.gz.*, joined in "
                         "sorted order), as ../shared/data/tiny-imagenet; unpacked once into --unpack-to")
    unpack_to: str = arg("/tmp/tiny64", "where --tiny-tars is unpacked (reused while its marker file matches the tars)")
    classes: int = arg(0, "use the first N classes (sorted folder names); 0 = all")
    val_per_class: int = arg(0, "validation images per class (the first, sorted); 0 = all")
    image_size: int = arg(64, "input size in pixels of teacher, recover set and students")
    # teacher
    teacher_ipc: int = arg(500, "training images per class for the teacher (the first, sorted; 500 = all of Tiny-ImageNet)")
    teacher_epochs: int = arg(20, "teacher epochs (hald.py --schedule hard)")
    teacher_batch_size: int = arg(512, "teacher batch size")
    teacher_lr: float = arg(2e-3, "teacher AdamW learning rate, cosine to zero (--eta 1)")
    teacher_crop_scale: float = arg(0.25, "teacher RandomResizedCrop smallest area fraction (milder than 0.08 for a short run)")
    teacher_eval_every: int = arg(5, "evaluate the teacher every N epochs (and at the end); 0 = at the end only")
    # recover set
    ipc: int = arg(10, "images per class of the recover set (and the students' IPC)")
    recover_iterations: int = arg(500, "Adam steps per recover batch (SRe2L's Tiny recipe: 4,000; cut to the time budget)")
    recover_batch_size: int = arg(200, "images optimised together in recover (SRe2L's Tiny recipe: 200)")
    recover_lr: float = arg(0.1, "recover Adam learning rate (SRe2L's Tiny recipe: 0.1)")
    recover_r_bn: float = arg(1.0, "recover weight of the BatchNorm statistics loss (SRe2L's Tiny recipe: 1)")
    recover_minutes: float = arg(2.5, "with --stop-after: start recover only with this many minutes left (it cannot resume)")
    # students
    epochs: int = arg(150, "student epochs (the paper: 300; cut to the time budget); HALD's soft epochs are half of "
                      "them (the authors' split)")
    batch_size: int = arg(16, "student batch size (the authors': 16)")
    label_smoothing: float = arg(-1.0, "students' label smoothing; -1 = hald.py's auto (0.1 at 200 classes; the authors': 0.8)")
    temperature: float = arg(-1.0, "students' soft-label temperature; -1 = hald.py's auto (4 at 200 classes; the authors': 20)")
    eval_every: int = arg(10, "evaluate the students every N epochs (the authors': 10); 0 = at the end only")
    drift_crops: int = arg(8, "crops per image for the students' drift diagnostics; 0 turns them off")
    check_teacher: bool = arg(True, "students: stop when the teacher is near chance on the set or on val (hald.py's check)")
    cuda_graph: bool = arg(True, "students on CUDA: replay forward and backward from CUDA graphs (batch 16 is launch-bound)")
    jobs: int = arg(4, "student processes at once (2: the s = 1 pair first, then s = 2)")
    # run
    seed: int = arg(0, "one seed for every stage")
    device: str = arg("auto", "auto, cpu or cuda, for every stage")
    out: str = arg("runs/paper-tiny", "output folder: teacher/, recover/, students/, table.md, paper_tiny.json, logs")
    export: str = arg("", "also copy table.md, paper_tiny.json, paper_tiny.log and results.tar.gz here at the end "
                      "($OUT on the lent GPU machine)")
    stop_after: float = arg(0.0, "stop cleanly after this many minutes (0 = never); run again to continue")
    until: str = arg("students", "stop after this stage: teacher, recover or students (all); run again without it to go on")
    toy: bool = arg(False, "a tiny version for the CPU: the sizes of TOY, unless given")


# The toy: a corner of the data, tiny images, a few epochs; ResNet-18 still. Runs on the CPU in about a minute.
TOY = dict(classes=4, val_per_class=8, image_size=16, teacher_ipc=16, teacher_epochs=2, teacher_batch_size=16,
           teacher_eval_every=0, ipc=2, recover_iterations=4, recover_batch_size=8, epochs=4, batch_size=4,
           eval_every=0, drift_crops=2, check_teacher=False)


def parse_settings(argv=None) -> Settings:
    """The CLI, built from Settings (one flag per field, its doc line as help); --toy fills in TOY's sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):
        flag, toy = "--" + f.name.replace("_", "-"), f" ; --toy: {TOY[f.name]}" if f.name in TOY else ""
        help = f"{f.metadata['help']} [default: {f.default if f.default != '' else 'none'}{toy}]"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), help=help, **({"choices": CHOICES[f.name]} if f.name in CHOICES else {}))
    given = vars(parser.parse_args(argv))
    return Settings(**({**TOY, **given} if given.get("toy") else given))


# ------------------------------------------------------------------------------- data
def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def tar_parts(folder: Path, name: str) -> list[Path]:
    """The tar `name` itself, else its parts `name.*` in sorted order (split -d writes .part00, .part01, ...)."""
    whole = folder / name
    return [whole] if whole.is_file() else sorted(p for p in folder.glob(f"{name}.*") if p.is_file())


class JoinedFiles(io.RawIOBase):
    """Several files read as one stream: the parts of a split tar."""

    def __init__(self, paths):
        self.paths, self.current = iter(paths), None

    def readable(self):
        return True

    def readinto(self, buffer):
        while True:
            if self.current is None:
                path = next(self.paths, None)
                if path is None:
                    return 0
                self.current = open(path, "rb")
            n = self.current.readinto(buffer)
            if n:
                return n
            self.current.close()
            self.current = None


def unpack_tars(tars: Path, dest: Path, log) -> Path:
    """train.tar.gz and val.tar.gz (or their parts) unpacked into dest, once: a marker naming the tars and their
    sizes is written last, and a later call with the same tars reuses the folder."""
    if not tars.is_dir():
        raise PaperTinyError(f"--tiny-tars {tars} is not a folder: give the folder holding train.tar.gz and val.tar.gz")
    parts = {name: tar_parts(tars, f"{name}.tar.gz") for name in ("train", "val")}
    for name, found in parts.items():
        if not found:
            raise PaperTinyError(f"--tiny-tars {tars} holds no {name}.tar.gz (nor its parts {name}.tar.gz.*)")
    marker = json.dumps({name: [[p.name, p.stat().st_size] for p in found] for name, found in parts.items()}, sort_keys=True)
    if (dest / UNPACKED_MARKER).is_file() and (dest / UNPACKED_MARKER).read_text() == marker:
        log(f"data: reusing {dest} (unpacked earlier from {tars})")
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.time()
    for name, found in parts.items():
        log(f"data: unpacking {' + '.join(p.name for p in found)} into {dest}")
        with tarfile.open(fileobj=io.BufferedReader(JoinedFiles(found), 1 << 20), mode="r|gz") as tar:
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (dest / UNPACKED_MARKER).write_text(marker)
    log(f"data: unpacked in {time.time() - t0:.0f} s")
    return dest


def link_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    """The first `classes` class folders of src (0 = all), each with its first `per_class` images (0 = all), as
    symbolic links in dst: a corner of the real data without a copy. Rebuilt at every call (cheap)."""
    shutil.rmtree(dst, ignore_errors=True)
    for folder in class_folders(src)[:classes or None]:
        (dst / folder.name).mkdir(parents=True)
        for path in image_files(folder)[:per_class or None]:
            (dst / folder.name / path.name).symlink_to(path.resolve())
    return dst


@dataclass
class Data:
    train: Path
    val: Path
    num_classes: int
    smallest_class: int  # training images in the smallest class: the teacher's IPC can be at most this


def prepare_data(s: Settings, out: Path, log) -> Data:
    """The training and validation ImageFolders the stages read: --tiny as it is, or --tiny-tars unpacked; a
    linked subset when --classes or --val-per-class ask for fewer."""
    if bool(s.tiny) == bool(s.tiny_tars):
        raise PaperTinyError("give the data once: --tiny DIR (unpacked, with train/ and val/) or --tiny-tars DIR "
                             "(holding train.tar.gz and val.tar.gz)")
    root = Path(s.tiny) if s.tiny else unpack_tars(Path(s.tiny_tars), Path(s.unpack_to), log)
    for name in ("train", "val"):
        if not (root / name).is_dir() or not class_folders(root / name):
            raise PaperTinyError(f"{root} has no {name}/ folder of class folders: Tiny-ImageNet unpacked has "
                                 f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    train, val = root / "train", root / "val"
    if len(class_folders(train)) != len(class_folders(val)):
        raise PaperTinyError(f"{train} has {len(class_folders(train))} classes but {val} has {len(class_folders(val))}")
    if s.classes or s.val_per_class:
        train = link_subset(train, out / "data" / "train", s.classes, 0)
        val = link_subset(val, out / "data" / "val", s.classes, s.val_per_class)
    folders = class_folders(train)
    return Data(train, val, len(folders), min(len(image_files(f)) for f in folders))


# ----------------------------------------------------------------------------- stages
@dataclass
class Job:
    """One stage process (hald.py or distill.py): its command, where its output goes, and when it is done."""
    name: str
    cmd: list[str]
    log: Path
    done: Path  # the file whose presence says the job is complete
    resumes: bool = True  # hald.py continues from its checkpoint; distill.py starts again
    ready: object = None  # callable: may it start now (None: at once)
    proc: subprocess.Popen | None = None
    thread: threading.Thread | None = None  # copies the output to the log
    last: str = ""
    state: str = "pending"  # pending, running, done, failed, stopped, skipped


def teacher_job(s: Settings, data: Data, out: Path) -> Job:
    ipc = min(s.teacher_ipc, data.smallest_class)
    cmd = [sys.executable, str(HALD), "--data", str(data.train), "--val", str(data.val), "--ipc", str(ipc),
           "--image-size", str(s.image_size), "--model", "resnet18", "--schedule", "hard", "--epochs", str(s.teacher_epochs),
           "--batch-size", str(s.teacher_batch_size), "--lr", str(s.teacher_lr), "--eta", "1",
           "--crop-scale", str(s.teacher_crop_scale), "--no-cutmix", "--label-smoothing", "0.1",
           "--eval-every", str(s.teacher_eval_every), "--drift-crops", "0", "--seed", str(s.seed), "--device", s.device,
           "--out", str(out / "teacher"), "--save-model", str(out / "teacher" / "teacher.pt"), "--resume"]
    return Job("teacher", cmd, out / "teacher.log", out / "teacher" / "summary.json")


def recover_job(s: Settings, data: Data, out: Path) -> Job:
    cmd = [sys.executable, str(DISTILL), "recover", "--train", str(data.train), "--teacher", str(out / "teacher" / "teacher.pt"),
           "--out", str(out / "recover"), "--ipc", str(s.ipc), "--image-size", str(s.image_size),
           "--iterations", str(s.recover_iterations), "--batch-size", str(s.recover_batch_size), "--lr", str(s.recover_lr),
           "--r-bn", str(s.recover_r_bn), "--rrc", "--seed", str(s.seed), "--device", s.device]
    return Job("recover", cmd, out / "recover.log", out / "recover" / "distill.json", resumes=False)


def student_name(crops: int, schedule: str) -> str:
    return f"s{crops}-{'hald' if schedule == 'shs' else schedule}"


def student_jobs(s: Settings, out: Path, data: Data, cuda: bool) -> list[Job]:
    """s = 1 soft-only and HALD, then s = 2. A HALD run reads the soft-label cache of the soft-only run at its SLC
    (one relabel per SLC, identical labels), so it starts once that file exists (or once that run has ended
    without it: it then makes it)."""
    jobs = {}
    for crops in CROPS_PER_IMAGE:
        for schedule, _ in SCHEDULES:
            name = student_name(crops, schedule)
            cache = out / "students" / student_name(crops, "soft") / "soft_labels.pt"
            cmd = [sys.executable, str(HALD), "--data", str(out / "recover"), "--val", str(data.val), "--ipc", str(s.ipc),
                   "--image-size", str(s.image_size), "--teacher", str(out / "teacher" / "teacher.pt"), "--model", "resnet18",
                   "--slc", str(crops * s.ipc), "--schedule", schedule, "--epochs", str(s.epochs),
                   "--soft-epochs", str(s.epochs // 2), "--label-smoothing", str(s.label_smoothing),
                   "--temperature", str(s.temperature), "--batch-size", str(s.batch_size), "--eval-every", str(s.eval_every),
                   "--drift-crops", str(s.drift_crops), "--seed", str(s.seed), "--device", s.device,
                   "--out", str(out / "students" / name), "--cache", str(cache), "--resume"]
            cmd += (["--cuda-graph"] if cuda and s.cuda_graph else []) + ([] if s.check_teacher else ["--no-check-teacher"])
            job = Job(name, cmd, out / "students" / f"{name}.log", out / "students" / name / "summary.json")
            if schedule != "soft":
                partner = jobs[student_name(crops, "soft")]
                job.ready = lambda cache=cache, partner=partner: cache.is_file() or partner.state not in ("pending", "running")
            jobs[name] = job
    return list(jobs.values())


def uses_cuda(device: str) -> bool:
    if device != "auto":
        return device == "cuda"
    import torch  # only here: the stages run in their own processes, this one needs no torch

    return torch.cuda.is_available()


class Log:
    """Lines stamped with the minutes since start, to the screen and appended to OUT/paper_tiny.log."""

    def __init__(self, path: Path):
        self.path, self.start, self.lock = path, time.time(), threading.Lock()

    def minutes(self) -> float:
        return (time.time() - self.start) / 60

    def __call__(self, message: str) -> None:
        line = f"[{self.minutes():5.1f} min] {message}"
        with self.lock:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def start(job: Job, env: dict, log, echo: bool) -> None:
    """Launch the job; a thread copies its output to its log file (and to the screen with echo), keeping the last line."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    stream = open(job.log, "a")
    stream.write(f"$ {' '.join(job.cmd)}\n")
    # the caller's working directory: --out and the data paths may be relative to it
    job.proc = subprocess.Popen(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    job.state = "running"

    def pump():
        for line in job.proc.stdout:
            stream.write(line)
            stream.flush()
            if line.strip():
                job.last = line.rstrip()
                if echo:
                    log(f"{job.name} | {job.last}")
        stream.close()

    job.thread = threading.Thread(target=pump, daemon=True)
    job.thread.start()
    log(f"{job.name}: started (log {job.log})")


def run_jobs(jobs: list[Job], limit: int, deadline: float, env: dict, log, echo: bool) -> bool:
    """Run the pending jobs, at most `limit` at a time, each when its ready() allows; at the deadline (0: none) the
    running ones get SIGINT (hald.py keeps the checkpoint of its last finished epoch). Returns whether all ended well."""
    shown = time.time()
    while True:
        for job in jobs:  # reaped before the deadline is looked at: a job that just ended is done, not stopped
            if job.state == "running" and job.proc.poll() is not None:
                job.thread.join()
                job.state = "done" if job.proc.returncode == 0 and job.done.is_file() else "failed"
                log(f"{job.name}: finished" + ("" if echo else f": {job.last}") if job.state == "done"
                    else f"{job.name}: FAILED (exit {job.proc.returncode}): {job.last}")
        if not any(j.state in ("pending", "running") for j in jobs):
            return True
        if deadline and time.time() > deadline:
            stop_running(jobs, log)
            return all(j.state in ("done", "skipped") for j in jobs)
        free = limit - sum(j.state == "running" for j in jobs)
        for job in [j for j in jobs if j.state == "pending"][:max(free, 0)]:  # in order: one waiting keeps its slot
            if job.ready is None or job.ready():
                start(job, env, log, echo)
        if not echo and time.time() - shown > STATUS_EVERY:
            for job in jobs:
                if job.state == "running":
                    log(f"{job.name} | {job.last[:150]}")
            shown = time.time()
        time.sleep(0.2)


def stop_running(jobs: list[Job], log, grace: float = 30) -> None:
    """SIGINT to every running job, then SIGKILL to any still running after `grace` seconds."""
    for job in jobs:
        if job.state == "running" and job.proc.poll() is None:
            job.proc.send_signal(signal.SIGINT)
    until = time.time() + grace
    for job in jobs:
        if job.state == "running":
            try:
                job.proc.wait(max(1, until - time.time()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            job.thread.join()
            if job.proc.returncode == 0 and job.done.is_file():  # it ended before the signal
                job.state = "done"
                log(f"{job.name}: finished")
                continue
            job.state = "stopped"
            log(f"{job.name}: stopped; " + ("it continues from its last finished epoch at the next call" if job.resumes
                                            else "it starts again at the next call"))


def add_seconds(out: Path, stage: str, seconds: float) -> None:
    """Wall seconds per stage, summed over every call, in OUT/timings.json."""
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = round(timings.get(stage, 0) + seconds, 1)
    path.write_text(json.dumps(timings, indent=2) + "\n")


def run_stage(stage: str, jobs: list[Job], s: Settings, out: Path, deadline: float, log, echo: bool) -> bool:
    """One stage: its finished jobs skipped, the others run. Returns False when stopped at the deadline;
    raises when a job failed."""
    for job in jobs:
        if job.done.is_file():
            job.state = "skipped"
            log(f"{job.name}: done earlier ({job.done}), skip")
    if all(j.state == "skipped" for j in jobs):
        return True
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if len(jobs) > 1 and "OMP_NUM_THREADS" not in env:  # concurrent processes share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // min(s.jobs, len(jobs))))
    t0 = time.time()
    finished = run_jobs(jobs, max(1, s.jobs), deadline, env, log, echo)
    add_seconds(out, stage, time.time() - t0)
    failed = [j for j in jobs if j.state == "failed"]
    if failed:
        raise StageFailed(f"stage {stage} failed: " + "; ".join(f"{j.name} (see {j.log}: {j.last})" for j in failed))
    return finished


# ------------------------------------------------------------------------------ table
def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_commit() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hald.py", "tools/distill.py", "tools/paper_tiny.py"],
                               cwd=HERE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git
        return {}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())} if head.returncode == 0 else {}


def student_figures(summary: dict | None) -> dict | None:
    if summary is None:
        return None
    config = summary["config"]
    return {"final_top1": summary["final_top1"], "final_top5": summary["final_top5"], "best_top1": summary["best_top1"],
            "best_epoch": summary["best_epoch"], "minutes": summary["seconds"] / 60, "schedule": summary["schedule"],
            "slc": config["slc"], "epochs": config["epochs"], "label_smoothing": config["label_smoothing"],
            "temperature": config["temperature"], "teacher_agreement": summary.get("teacher_agreement"),
            "drift": summary.get("drift", {}), "device": summary.get("device")}


def collect(s: Settings, out: Path, command: list[str]) -> dict:
    """Every figure of the run from the stages' own files: paper_tiny.json's content."""
    teacher = read_json(out / "teacher" / "summary.json")
    recover = read_json(out / "recover" / "distill.json")
    students = []
    for crops in CROPS_PER_IMAGE:
        for schedule, label in SCHEDULES:
            figures = student_figures(read_json(out / "students" / student_name(crops, schedule) / "summary.json"))
            students.append({"name": student_name(crops, schedule), "student": label, "crops_per_image": crops,
                             "paper_top1": PAPER[(crops, schedule)], **(figures or {"finished": False})})
    first = teacher or next((x for x in students if x.get("device")), None) or {}
    return {
        "setting": dataclasses.asdict(s), "command": " ".join(["python", "tools/paper_tiny.py", *command]),
        "device": first.get("device"), "torch": (teacher or {}).get("versions", {}).get("torch"),
        "python": platform.python_version(),
        "code": {"hald_sha256": sha256(HALD), "distill_sha256": sha256(DISTILL), "paper_tiny_sha256": sha256(Path(__file__)),
                 **git_commit()},
        "teacher": teacher and {"top1": teacher["final_top1"], "top5": teacher["final_top5"], "best_top1": teacher["best_top1"],
                                "epochs": teacher["config"]["epochs"], "images_per_class": teacher["config"]["ipc"],
                                "minutes": teacher["seconds"] / 60, "aim_top1": TEACHER_AIM,
                                "reached_aim": teacher["final_top1"] >= TEACHER_AIM},
        "recover": recover and {"teacher_agreement": recover["teacher_agreement"], "minutes": recover["seconds"] / 60,
                                "iterations": recover["settings"]["iterations"], "ipc": recover["settings"]["ipc"],
                                "batch_size": recover["settings"]["batch_size"], "lr": recover["settings"]["lr"],
                                "r_bn": recover["settings"]["r_bn"], "sre2l_tiny_iterations": 4000},
        "students": students,
        "wall_minutes": {k: v / 60 for k, v in (read_json(out / "timings.json") or {}).items()},
        "paper": {"figures": {f"{c} crop(s) per image, {dict(SCHEDULES)[k]}": v for (c, k), v in PAPER.items()},
                  "note": "the paper's FADRM images and teacher, ResNet-18, IPC 10 (secondary summary, unverified); "
                          "ours are recover images from our teacher"},
    }


def figure(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_markdown(r: dict) -> str:
    """table.md: one header paragraph (teacher, set, device, code) and one row per student run."""
    t, rec, st = r["teacher"], r["recover"], r["setting"]
    runs = [x for x in r["students"] if "final_top1" in x]
    phases = lambda x: " / ".join(f"{p} {n}" for p, n in x["schedule"])  # noqa: E731
    lines = [f"# HALD in the paper's Tiny-ImageNet setting (ResNet-18, {st['image_size']} px, IPC {st['ipc']}, recover set)", "",
             f"Device {r['device'] or '-'}, torch {r['torch'] or '-'}, hald.py sha256 {r['code']['hald_sha256'][:12]}, "
             f"commit {r['code'].get('git_commit', '-')[:12]}{' (modified)' if r['code'].get('git_dirty') else ''}.",
             (f"Teacher: ResNet-18 (CIFAR stem), {t['images_per_class']} images per class, {t['epochs']} epochs: top-1 "
              f"{t['top1']:.2f} %, top-5 {t['top5']:.2f} % on the validation set ({t['minutes']:.1f} min; aim >= {TEACHER_AIM:.0f} %)."
              if t else "Teacher: not finished yet."),
             (f"Recover set: IPC {rec['ipc']}, {rec['iterations']} iterations per batch of {rec['batch_size']} (SRe2L's Tiny "
              f"recipe: 4,000), lr {rec['lr']:g}, r_bn {rec['r_bn']:g}; the teacher agrees with its classes on "
              f"{rec['teacher_agreement']:.1f} % ({rec['minutes']:.1f} min)." if rec else "Recover set: not made yet."),
             (f"Students: ResNet-18, batch {st['batch_size']}, {runs[0]['epochs']} epochs (the paper: 300), label smoothing "
              f"{runs[0]['label_smoothing']:g}, T {runs[0]['temperature']:g}, {st['jobs']} runs at once on one device; "
              f"top-1 on the validation set at the last epoch, best beside it." if runs else "Students: none finished yet."), "",
             "| crops per image | SLC | student | schedule | top-1 % (last) | best % | minutes | paper (FADRM images) |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["students"]:
        done = "final_top1" in x
        lines.append(f"| {x['crops_per_image']} | {x['slc'] if done else '-'} | {x['student']} | {phases(x) if done else 'not finished'} | "
                     f"{figure(x.get('final_top1'))} | {figure(x.get('best_top1'))} | {figure(x.get('minutes'), 1)} | "
                     f"{x['paper_top1']:.1f} |")
    lines += ["", "The paper's column is its FADRM images with its own teacher (a secondary summary, unverified), not "
              "these recover images: compare directions and gaps, not levels."]
    return "\n".join(lines) + "\n"


def exported(relative: Path) -> bool:
    """What results.tar.gz keeps of OUT: logs, summaries, metrics, curves and the set's contact sheet; no model,
    checkpoint, cache, image of the set (recover/new000/...), linked data or unfinished (hidden) folder."""
    parts = relative.parts
    return (relative.suffix in {".json", ".jsonl", ".log", ".md", ".png"} and parts[0] != "data"
            and not any(p.startswith(".") for p in parts) and not (parts[0] == "recover" and len(parts) > 2))


def export(out: Path, dest: Path) -> None:
    """table.md, paper_tiny.json, paper_tiny.log and results.tar.gz into dest: four files, within what a call of
    the lent GPU machine brings back (8 files of at most 16 MiB)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("table.md", "paper_tiny.json", "paper_tiny.log"):
        if (out / name).is_file():
            shutil.copy(out / name, dest / name)
    with tarfile.open(dest / "results.tar.gz", "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and not path.is_symlink() and exported(path.relative_to(out)):
                tar.add(path, arcname=str(Path(out.name) / path.relative_to(out)))


def write_results(s: Settings, out: Path, command: list[str], log) -> dict:
    results = collect(s, out, command)
    (out / "paper_tiny.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table_markdown(results))
    log(f"table: {out / 'table.md'}\n" + table_markdown(results))
    if s.export:
        export(out, Path(s.export))
        log(f"exported table.md, paper_tiny.json, paper_tiny.log, results.tar.gz to {s.export}")
    return results


# ------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    s = parse_settings(argv)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "paper_tiny.log")
    deadline = log.start + 60 * s.stop_after if s.stop_after > 0 else 0
    log(f"paper-tiny | {' '.join(argv)} | out {out}")
    try:
        data = prepare_data(s, out, log)
        log(f"data: {data.num_classes} classes, train {data.train}, val {data.val}")
        if data.smallest_class < s.teacher_ipc:
            log(f"teacher: {data.smallest_class} training images in the smallest class, fewer than --teacher-ipc "
                f"{s.teacher_ipc}: the teacher uses {data.smallest_class} per class")
        finished = run_stage("teacher", [teacher_job(s, data, out)], s, out, deadline, log, echo=True)
        if finished:
            t = read_json(out / "teacher" / "summary.json")
            log(f"teacher: top-1 {t['final_top1']:.2f} % (aim >= {TEACHER_AIM:.0f} %), top-5 {t['final_top5']:.2f} %, "
                f"{t['seconds'] / 60:.1f} min")
        if finished and s.until != "teacher":
            recover = recover_job(s, data, out)
            if not recover.done.is_file() and deadline and deadline - time.time() < 60 * s.recover_minutes:
                log(f"recover: fewer than --recover-minutes {s.recover_minutes:g} left before --stop-after; it starts at the next call")
                finished = False
            else:
                log(f"recover: {s.recover_iterations} iterations per batch (SRe2L's Tiny recipe: 4,000; cut to the time budget)")
                finished = run_stage("recover", [recover], s, out, deadline, log, echo=True)
        if finished and s.until == "students":
            jobs = student_jobs(s, out, data, uses_cuda(s.device))
            log(f"students: {len(jobs)} runs of {s.epochs} epochs, {min(s.jobs, len(jobs))} at a time")
            finished = run_stage("students", jobs, s, out, deadline, log, echo=False)
        write_results(s, out, argv, log)
        if not finished:
            log(f"stopped after --stop-after {s.stop_after:g} min: run the same command again to continue")
            return 3
        if s.until != "students":
            log(f"stopped after the {s.until} stage (--until {s.until}): run again without --until to go on")
        return 0
    except PaperTinyError as e:
        if isinstance(e, StageFailed):
            write_results(s, out, argv, log)
        print(f"paper_tiny: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paper_tiny: interrupted; the same command continues (finished stages are skipped, runs resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
