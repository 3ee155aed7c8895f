"""HALD: Soft -> Hard -> Soft training of a student on a distilled image set.

Reference implementation of *Hard Labels In! Rethinking the Role of Hard Labels in Mitigating Local Semantic Drift*
(Cui et al., arXiv 2512.15647). A teacher labels a fixed budget of random crops of the distilled images (SLC soft labels
per class); the student replays those crops with their soft labels, then trains on fresh crops with hard (label-smoothed)
labels, then replays the soft labels again.

    python hald.py                                   # demo: HALD vs soft-only on bundled CIFAR-10 files
    python hald.py --data distilled/ --val val/ --ipc 10 --teacher resnet18 --schedule "shs soft"
    torchrun --nproc_per_node=8 hald.py --data ...   # several GPUs (or CPU processes), same flags
    python hald.py --evaluate student.pt --val val/  # top-1 and top-5 of a saved model, no training
    python hald.py --help                            # every knob with its doc line

Measured: CIFAR-10, IPC 10, one stored crop per image, 300 epochs, 3 seeds on a 2-core CPU: soft-only 29.8 %, HALD
33.8 % top-1 (README: Results, and where it helps). Part I is the method, a minimal reference; Part II the program.
"""

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


# ================================================================================ Part I: the method (minimal reference)
# Tensors and torch.Generators in, tensors out; plain keyword arguments; no files, no Config, no messages to the user.
# Each piece checks its own arguments, in HaldError (a ValueError), so that it can be copied alone (README: copy table).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HaldError(ValueError):
    """A problem with the user's input; main() prints it as one line and exits 2."""


# ---------------------------------------------------------------------------- tensors
@functools.lru_cache(maxsize=None)
def mean_std(device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """mean and std (tuples) as (1, C, 1, 1) tensors on `device`, built once (not copied to the GPU at every step)."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W), or float in [0, 1] units -> float normalised, in place on one new tensor (docs/speed.md)."""
    m, s = mean_std(images.device, tuple(mean), tuple(std))
    x = images.to(torch.float32, copy=True)
    return (x.div_(255) if images.dtype == torch.uint8 else x).sub_(m).div_(s)


def check_images(images: torch.Tensor, what: str = "the images", fix: str = "divide 0-255 values by 255, undo a normalisation "
                 "(x * std + mean)") -> None:
    """Images as the pieces take them: (N, 3, H, W), uint8 or float in [0, 1] units (-5 to 6: optimised pixels go beyond)."""
    if not (torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == 3
            and (images.dtype == torch.uint8 or images.is_floating_point())):
        got = f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__
        raise HaldError(f"{what} must be (N, 3, H, W) uint8, or float in [0, 1] units, got {got}: channels first (x.permute(0, 3, 1, 2))")
    if images.is_floating_point() and images.numel() and not (-5 <= check_finite(images, what).min() and images.max() <= 6):
        raise HaldError(f"{what} must be in [0, 1] units, got values from {images.min():.3g} to {images.max():.3g}: {fix}")


TEACHER_OUTPUTS = ("the teacher's outputs", "check its file, or its --teacher-arch and --normalize")


def check_finite(t: torch.Tensor, what: str, fix: str = "") -> torch.Tensor:
    """t, or a one-line HaldError saying that `what` holds NaN or infinite values (and the fix)."""
    if not t.isfinite().all():
        raise HaldError(f"{what} hold NaN or infinite values" + (f": {fix}" if fix else ""))
    return t


def model_layout(x: torch.Tensor) -> torch.Tensor:
    """channels_last on CUDA (faster convolutions with bf16), unchanged on the CPU."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def autocast(device: torch.device, precision: str = "bf16"):
    """bf16 autocast on CUDA unless precision is "fp32" (the authors' runs); a no-op on the CPU (fp32: exact, reproducible)."""
    on = device.type == "cuda" and precision == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on, cache_enabled=False)  # no cache: CUDA graphs


# ----------------------------------------------------------------------- crop sampler
def sample_crops(n: int, height: int, width: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop boxes with torchvision's distribution, as fractions (n, 4) (top, left, height, width), and
    horizontal flips (n,) bool (p = 0.5). torchvision's up to 10 (area, aspect) draws, falling back to a centre crop,
    are drawn for all images at once; the first valid one per image is kept."""
    area = height * width
    target = area * torch.empty(n, 10).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.int().argmax(1, keepdim=True)  # first valid attempt (0 when none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # the centre-crop fallback, for images where no attempt was valid
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else (
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    none = ~valid.any(1)
    w, h = torch.where(none, float(fw), w), torch.where(none, float(fh), h)
    u = torch.rand(n, 2, generator=gen)
    top = torch.where(none, float((height - fh) // 2), torch.floor(u[:, 0] * (height - h + 1)))
    left = torch.where(none, float((width - fw) // 2), torch.floor(u[:, 1] * (width - w + 1)))
    boxes = torch.stack([top / height, left / width, h / height, w / width], 1)
    flips = torch.rand(n, generator=gen) < 0.5
    return boxes, flips


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop images (B, C, H, W) float to boxes (B, 4) (sample_crops'), resize to (size, size) and flip where flips (B,) say,
    in one call. Matches torchvision's resized_crop (bilinear, no antialias): sample points are clamped to the box."""
    B, _, H, W = images.shape
    top, left, h, w = boxes.to(images).unbind(1)  # each (B,); fractions to pixels with Python scalars (no host sync)
    top, left, h, w = top * H, left * W, h * H, w * W
    t = (torch.arange(size, dtype=images.dtype, device=images.device) + 0.5) / size  # (S,)
    ys = (top[:, None] + t * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])  # (B, S)
    xs = (left[:, None] + t * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])  # (B, S)
    xs = torch.where(flips.to(images.device)[:, None], xs.flip(1), xs)
    gy, gx = (2 * ys + 1) / H - 1, (2 * xs + 1) / W - 1  # to grid_sample's [-1, 1], align_corners=False
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- CutMix
def sample_cutmix_boxes(n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """n CutMix boxes (y0, y1, x0, x1) in pixels: lambda ~ Beta(1, 1), side sqrt(1 - lambda) of
    the image side, uniform centre, clipped to the image (as the authors' and timm's rand_bbox)."""
    lam = torch.rand(n, generator=gen)  # Beta(1, 1) is uniform
    cut = torch.sqrt(1 - lam)
    ch, cw = (height * cut).long(), (width * cut).long()
    cy = torch.randint(0, height, (n,), generator=gen)
    cx = torch.randint(0, width, (n,), generator=gen)
    return torch.stack([(cy - ch // 2).clamp(0, height), (cy + ch // 2).clamp(0, height),
                        (cx - cw // 2).clamp(0, width), (cx + cw // 2).clamp(0, width)], 1)


def cutmix_lambda(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fraction of the image kept from the original: 1 - box area / image area."""
    y0, y1, x0, x1 = box.unbind(-1)
    return 1 - ((y1 - y0) * (x1 - x0)).float() / (height * width)


def paste_cutmix_(images: torch.Tensor, partner: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste the box of images[partner] into each image, in place; returns images.
    images (B, C, H, W); partner (B,); box (4,) (y0, y1, x0, x1)."""
    partner = partner.to(images.device)
    if images.is_cuda:  # a mask keeps the box on the device: no host sync
        H, W = images.shape[-2:]
        rows, cols, box = torch.arange(H, device=images.device), torch.arange(W, device=images.device), box.to(images.device)
        mask = ((rows >= box[0]) & (rows < box[1]))[:, None] & ((cols >= box[2]) & (cols < box[3]))[None, :]  # (H, W)
        return torch.where(mask, images[partner], images, out=images)
    y0, y1, x0, x1 = box.tolist()  # on the CPU: copy the box only (indexing with partner copies before writing)
    images[:, :, y0:y1, x0:x1] = images[partner, :, y0:y1, x0:x1]
    return images


# ------------------------------------------------------------- soft-label cache (relabel, replay)
def stored_batches(num_images: int, batch_size: int, passes: int) -> list:
    """(start, end) of every stored batch: each pass over the images is cut into fixed batches."""
    return [(p * num_images + s, p * num_images + min(s + batch_size, num_images))
            for p in range(passes) for s in range(0, num_images, batch_size)]


def replay(images, index, boxes, flips, partner, box, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Rebuild a batch of crops exactly: gather, normalize, crop + flip, CutMix. -> (B, 3, S, S)."""
    x = crop_resize(normalize(images[index.to(images.device)], mean, std), boxes, flips, size)
    return paste_cutmix_(x, partner, box) if box is not None else x


def bn_train_mode(model: nn.Module, batch_statistics: bool) -> nn.Module:
    """Eval mode, except BatchNorm layers use batch statistics when asked (the authors' train-mode
    teacher; dropout stays off so that labels are deterministic)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(batch_statistics)
    return model


class SoftLabelCache:
    """The fixed budget of soft labels: `crops_per_image` passes over the images (SLC / IPC), each cut into fixed batches
    replayed whole (a train-mode teacher's label depends on the batch, as the authors'). Per stored crop (L = passes * N):
    index (L,), boxes (L, 4), flips (L,), partner (L,) CutMix partner's position in its batch, probs (L, C) fp16 softmax(
    logits / T); cut (batches, 4) CutMix boxes (None without CutMix). batch() normalises with the build's mean and std."""

    def __init__(self, index, boxes, flips, partner, cut, probs, num_images: int, batch_size: int, size: int, *, temperature: float,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.index, self.boxes, self.flips, self.partner, self.cut, self.probs = index, boxes, flips, partner, cut, probs
        self.num_images, self.batch_size, self.size = num_images, batch_size, size
        self.temperature, self.mean, self.std = temperature, tuple(mean), tuple(std)
        self.batches = stored_batches(num_images, batch_size, len(index) // num_images)

    def __len__(self):
        return len(self.batches)

    def to(self, device) -> "SoftLabelCache":
        for name in ("index", "boxes", "flips", "partner", "cut", "probs"):
            setattr(self, name, None if getattr(self, name) is None else getattr(self, name).to(device))
        return self

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, images, *, size: int, crops_per_image: int, batch_size: int, temperature: float,
              gen: torch.Generator, crop_scale: float = 0.08, cutmix: bool = True, teacher_mode: str = "train",
              mean=IMAGENET_MEAN, std=IMAGENET_STD, precision: str = "bf16", log=print, rank: int = 0, world: int = 1) -> "SoftLabelCache":
        """Relabel: draw every crop and CutMix, run the teacher (an nn.Module returning logits) on each batch, keep
        softmax(logits / temperature). images: (N, 3, H, W) uint8, or float in [0, 1] units; crops are `size` px.
        Under torchrun every rank draws the same crops and labels every world-th batch."""
        bad = temperature <= 0 or crops_per_image < 1 or batch_size < 1 or not 0 < crop_scale <= 1
        if bad or teacher_mode not in ("train", "eval"):
            raise HaldError(f"the cache needs temperature > 0, crops_per_image >= 1, batch_size >= 1, crop_scale in (0, 1], teacher_mode "
                            f"train or eval; got {temperature}, {crops_per_image}, {batch_size}, {crop_scale}, {teacher_mode!r}")
        check_images(images)
        n, (H, W), passes = len(images), images.shape[-2:], crops_per_image
        batches = stored_batches(n, batch_size, passes)
        index = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])
        boxes, flips = sample_crops(len(index), H, W, gen, scale=(crop_scale, 1.0))
        partner = torch.cat([torch.randperm(e - s, generator=gen) for s, e in batches])
        cut = sample_cutmix_boxes(len(batches), size, size, gen) if cutmix else None
        device = next(teacher.parameters()).device
        drawn = [t.to(device) for t in (index, boxes, flips, partner)]  # on the device once: no copy per batch
        cuts = cut.to(device) if cutmix else [None] * len(batches)
        buffers = {name: b.clone() for name, b in teacher.named_buffers()}  # train-mode BN updates running stats
        bn_train_mode(teacher, teacher_mode == "train")
        probs, t0 = None, time.time()
        for k, (s, e) in enumerate(batches):
            if k % world != rank:
                continue
            x = replay(images, *(t[s:e] for t in drawn), cuts[k], size, mean, std)
            with autocast(device, precision):
                logits = teacher(model_layout(x)).float()  # (B, C)
            if probs is None and logits.min() >= 0 and (logits.sum(1) - 1).abs().max() < 0.02:  # softmax(p / T): near uniform
                raise HaldError("the teacher returns probabilities (rows >= 0 summing to 1), not logits: drop its final softmax")
            probs = probs if probs is not None else torch.zeros(len(index), logits.shape[1], device=device)
            probs[s:e] = F.softmax(logits / temperature, 1)
            if time.time() - t0 > 10 and (k + 1) % max(1, len(batches) // 10) == 0:
                log(f"relabel {k + 1}/{len(batches)} batches ({time.time() - t0:.1f}s)")
        if world > 1:  # each row was labelled by one rank and is zero elsewhere: the sum merges them exactly
            classes = torch.tensor(0 if probs is None else probs.shape[1], device=device)
            torch.distributed.all_reduce(classes, torch.distributed.ReduceOp.MAX)  # a rank with no batch learns C
            probs = probs if probs is not None else torch.zeros(len(index), int(classes), device=device)
            torch.distributed.all_reduce(probs)
        for name, b in teacher.named_buffers():
            b.copy_(buffers[name])
        teacher.eval()
        check_finite(probs, *TEACHER_OUTPUTS)  # a teacher that overflows: named here, before anything is stored
        return cls(index.int(), boxes, flips, partner.short(), None if cut is None else cut.short(), probs.half().cpu(), n, batch_size,
                   size, temperature=temperature, mean=mean, std=std)

    def batch(self, k: int, images, mean=None, std=None):
        """Stored batch k replayed, normalised with mean and std (None: the cache's): crops (B, 3, S, S), teacher probabilities
        (B, C) float, image indices, CutMix partner positions and box (None, None without CutMix)."""
        if len(images) != self.num_images:
            raise HaldError(f"the cache was made from {self.num_images} images, not {len(images)}: pass the same images")
        mean, std, (s, e) = self.mean if mean is None else mean, self.std if std is None else std, self.batches[k]
        index, partner = self.index[s:e].long(), self.partner[s:e].long()
        box = self.cut[k].long() if self.cut is not None else None
        x = replay(images, index, self.boxes[s:e], self.flips[s:e], partner, box, self.size, mean, std)
        return x, self.probs[s:e].float(), index, partner if box is not None else None, box


# ----------------------------------------------------------------------------- losses
def soft_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || softmax(student / T)), batch mean, without the T^2 factor (as the authors)."""
    if not temperature > 0 or teacher_probs.shape != student_logits.shape:  # (B,) class indices would broadcast when B = C
        raise HaldError(f"soft_loss takes a temperature > 0 and teacher probabilities (B, C) shaped like the logits "
                        f"{tuple(student_logits.shape)}, got {temperature} and {tuple(teacher_probs.shape)}")
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, 1), teacher_probs, reduction="batchmean")


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """timm's label smoothing: on-value 1 - smoothing + smoothing / C, off-value smoothing / C."""
    if not 0 <= smoothing < 1:
        raise HaldError(f"label smoothing must be in [0, 1), got {smoothing}")
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(1, labels[:, None], 1 - smoothing + off)


def hard_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (label-smoothed, CutMix-mixed one-hots) at temperature 1."""
    if targets.shape != logits.shape:  # class indices (B,) would broadcast against the logits when B = C, and train silently
        raise HaldError(f"hard_loss takes targets (B, C) shaped like the logits {tuple(logits.shape)}, got {tuple(targets.shape)}: "
                        f"make them from class indices with smooth_one_hot (or mixed_targets)")
    return -(targets * F.log_softmax(logits.float(), 1)).sum(1).mean()


def hybrid_loss(soft_logits, teacher_probs, temperature: float, hard_logits, hard_targets, lam: float, t2: bool = False):
    """Static mix at every step: (T^2 if t2 else 1) * L_soft + lam * L_hard."""
    return (temperature**2 if t2 else 1.0) * soft_loss(soft_logits, teacher_probs, temperature) + lam * hard_loss(hard_logits, hard_targets)


def mixed_targets(labels, num_classes: int, smoothing: float, partner, lam) -> torch.Tensor:
    """Smoothed one-hots mixed as CutMix mixed the images: lam * own + (1 - lam) * partner's."""
    t = smooth_one_hot(labels, num_classes, smoothing)
    return t if partner is None else lam * t + (1 - lam) * t[partner.to(t.device)]


# --------------------------------------------------------------------------- schedule
PRESETS = ("shs", "soft", "hard", "hs", "sh", "hsh", "hybrid", "alt-hard-n", "alt-hard-2n", "alt-soft-n", "alt-soft-2n")


def build_schedule(spec: str, epochs: int, soft_epochs=None, crops_per_image: int = 1) -> list:
    """The schedule as data: [(phase, epochs), ...], phase soft, hard or hybrid. Presets are the authors' S1-S8: shs = HALD
    (S6), hs = S1, sh = S8, hsh = S7, alternating blocks of n = slc/ipc or 2n epochs (S2-S5); soft_epochs None: the
    authors' half. An explicit spec such as soft:75,hard:150,soft:75 must add up to `epochs`."""
    S = epochs // 2 if soft_epochs is None else soft_epochs
    if not 0 <= S <= epochs:
        raise HaldError(f"soft_epochs {S} must be between 0 and epochs {epochs}")
    H = epochs - S
    if spec.startswith("alt-"):
        m = re.fullmatch(r"alt-(hard|soft)-(n|2n)", spec)
        if not m:
            raise HaldError(f"unknown schedule {spec!r}: use alt-hard-n, alt-hard-2n, alt-soft-n or alt-soft-2n")
        if crops_per_image < 1:
            raise HaldError(f"schedule {spec} alternates blocks of crops_per_image (SLC / IPC) epochs: it must be >= 1")
        block = crops_per_image * (2 if m[2] == "2n" else 1)
        phases = ("hard", "soft") if m[1] == "hard" else ("soft", "hard")
        plan = [(phases[i % 2], min(block, epochs - start)) for i, start in enumerate(range(0, epochs, block))]
    elif spec in PRESETS:
        plan = {"shs": [("soft", S // 2), ("hard", H), ("soft", S - S // 2)], "soft": [("soft", epochs)],
                "hard": [("hard", epochs)], "hybrid": [("hybrid", epochs)], "hs": [("hard", H), ("soft", S)],
                "sh": [("soft", S), ("hard", H)], "hsh": [("hard", H // 2), ("soft", S), ("hard", H - H // 2)]}[spec]
    else:
        plan = []
        for part in spec.split(","):
            m = re.fullmatch(r"\s*(soft|hard|hybrid):(\d+)\s*", part)
            if not m:
                raise HaldError(f"bad schedule part {part!r} in {spec!r}: use a preset ({', '.join(PRESETS)}) "
                                f"or phase:epochs pairs such as soft:75,hard:150,soft:75")
            plan.append((m[1], int(m[2])))
        if sum(n for _, n in plan) != epochs:
            raise HaldError(f"schedule {spec!r} covers {sum(n for _, n in plan)} epochs but epochs is {epochs}: "
                            f"make them equal")
    return [(phase, n) for phase, n in plan if n > 0]


def lr_at(epoch: int, lr: float, epochs: int, eta: float) -> float:
    """The authors' per-epoch cosine: eta = 2 ends near half the initial LR."""
    return lr * 0.5 * (1 + math.cos(math.pi * epoch / (epochs * eta)))


def begin_epoch(opt, epoch: int, phases: list, *, lr: float, eta: float, phase_switch: str = "reset") -> str:
    """Start epoch `epoch` of `phases` (a phase name per epoch): its LR (lr_at) and, at a phase switch with "reset" or "warmup",
    AdamW's state cleared, so that one phase's gradient sizes do not set the next one's steps (keep, t2: the authors'). -> phase."""
    for group in opt.param_groups:
        group["lr"] = lr_at(epoch, lr, len(phases), eta)
    if epoch and phases[epoch] != phases[epoch - 1] and phase_switch in ("reset", "warmup"):
        opt.state.clear()
    return phases[epoch]


# --------------------------------------------------------------------------- students
CONVNET = re.compile(r"convnet(_bn)?(\d*)(?:_d([1-9]\d*))?")  # hald.py's own: convnet, convnet_bn, convnet_bn64, convnet_bn_d4, ...


def convnet(num_classes: int, image_size: int, width: int = 128, depth: int = 3, norm: str = "instance") -> nn.Sequential:
    """ConvNet-3 of dataset distillation papers: [conv 3x3, norm, ReLU, avg-pool 2] x depth, linear."""
    layers, channels = [], 3
    for _ in range(depth):
        norm_layer = nn.GroupNorm(width, width) if norm == "instance" else nn.BatchNorm2d(width)
        layers += [nn.Conv2d(channels, width, 3, padding=1), norm_layer, nn.ReLU(inplace=True), nn.AvgPool2d(2)]
        channels, image_size = width, image_size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * image_size * image_size, num_classes))


def torchvision_models(name: str = "", flag: str = "model"):
    """torchvision.models, imported when needed, after checking an architecture's name (None for a ConvNet): a typo such as
    resnet81 is found before any image is decoded."""
    if name and CONVNET.fullmatch(name):
        return None
    try:
        import torchvision
    except Exception as e:  # ImportError, or operators registered for another torch (RuntimeError)
        raise HaldError(f"torchvision does not work with the installed torch {torch.__version__} ({type(e).__name__}: "
                        f"{str(e)[:120]}): pip install the torchvision release made for it") from None
    if name and name not in torchvision.models.list_models():
        near = difflib.get_close_matches(name, torchvision.models.list_models(), 3)
        raise HaldError(f"unknown architecture {name!r} for {flag}: " + (f"did you mean {' or '.join(near)}? " if near else "")
                        + "use convnet, convnet_bn, a width and depth such as convnet_bn64_d4, or a torchvision model name such as resnet18")
    return torchvision.models


def build_model(name: str, num_classes: int, image_size: int, weights=None, cifar_stem: bool | None = None) -> nn.Module:
    """convnet / convnet_bn (with a width and depth: convnet_bn64, convnet_bn_d4) or a torchvision model; ResNets get the
    CIFAR stem (3x3 stride-1 conv, no max-pool) on inputs <= 64 px without pretrained weights, or as cifar_stem says."""
    m = CONVNET.fullmatch(name)
    if m:
        return convnet(num_classes, image_size, width=int(m[2] or 128), depth=int(m[3] or 3), norm="batch" if m[1] else "instance")
    models = torchvision_models(name)
    try:
        model = models.get_model(name, **({"weights": weights} if weights else {"num_classes": num_classes}))
    except Exception as e:  # pretrained weights that cannot be downloaded
        raise HaldError(f"cannot load {name} with weights {weights} ({e}): put the weights in TORCH_HOME or pass a checkpoint") from None
    if name.startswith(("resnet", "resnext", "wide_resnet")) and (image_size <= 64 and not weights if cifar_stem is None else cifar_stem):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW with decay on weights (ndim > 1) only, as the authors; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


# ------------------------------------------------------------------------- epoch loop
def draw_soft_batches(pool: list[int], count: int, num_stored: int, gen: torch.Generator) -> list[int]:
    """`count` stored batch ids from a shuffled pool, refilled when empty: each once per pass (the authors' sampler)."""
    drawn = []
    while len(drawn) < count:
        if not pool:
            pool.extend(torch.randperm(num_stored, generator=gen).tolist())
        drawn.append(pool.pop())
    return drawn


def run_epoch(phase: str, net, opt, images, labels, num_classes: int, gens: dict, cache=None, pool=None, *,
              batch_size: int = 16, size: int = 0, temperature: float = 20.0, smoothing: float = 0.8, crop_scale: float = 0.08,
              cutmix: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, hybrid_lambda: float = 1.0, hybrid_crops: str = "fresh",
              t2: bool = False, warmup: int = 0, precision: str = "bf16", log=print, rank: int = 0, world: int = 1) -> torch.Tensor:
    """One pass over the images in the soft, hard or hybrid phase -> the mean loss (0-dim). soft: stored batches of `cache`
    with their teacher labels, drawn from `pool` (a list kept across epochs, [] at first); hard: fresh crops + CutMix, smoothed
    targets; hybrid: both, the hard term on fresh or stored crops. images (N, 3, H, W) uint8 or float in [0, 1], labels (N,);
    gens: CPU generators "pool" and "hard"; warmup: the LR ramps linearly over AdamW's first `warmup` steps of an empty state
    (its own step count: the start, and a switch that cleared it). Under torchrun every rank draws the global batch, trains its slice."""
    if phase not in ("soft", "hard", "hybrid"):
        raise HaldError(f"phase must be soft, hard or hybrid, got {phase!r}")
    if phase != "hard" and (cache is None or pool is None):
        raise HaldError(f"the {phase} phase replays stored batches: pass cache (a SoftLabelCache) and pool (a list, [] at first)")
    if phase != "hard" and (cache.batch_size, cache.temperature) != (batch_size, temperature):
        raise HaldError(f"the cache holds batches of {cache.batch_size} labelled at T {cache.temperature:g} but batch_size is {batch_size} "
                        f"and temperature {temperature:g}: use the cache's")
    if {"hard", "pool"} - gens.keys():
        raise HaldError(f"gens must hold the CPU generators 'pool' and 'hard', got {sorted(gens)}")
    n, B, device, (H, W) = len(images), batch_size, images.device, images.shape[-2:]
    size = size or H
    steps = math.ceil(n / B)  # one pass over the images, whatever the phase
    if phase == "hard":
        order = torch.randperm(n, generator=gens["hard"]).to(device)
    else:
        chosen = draw_soft_batches(pool, steps, len(cache), gens["pool"])
    fresh = phase == "hard" or (phase == "hybrid" and hybrid_crops == "fresh")
    if fresh:  # the epoch's fresh crops and CutMix boxes, drawn at once
        boxes, flips = sample_crops(steps * B, H, W, gens["hard"], scale=(crop_scale, 1.0))
        boxes, flips = boxes.to(device), flips.to(device)
        cuts = sample_cutmix_boxes(steps, size, size, gens["hard"]).to(device) if cutmix else [None] * steps
    total, shown, base_lr = torch.zeros((), device=device), time.time(), [group["lr"] for group in opt.param_groups]
    done = float(opt.state.get(opt.param_groups[0]["params"][0], {}).get("step", 0)) if warmup else 0  # AdamW's steps so far: one read
    for k in range(steps):
        if time.time() - shown > 30:  # long epochs (a teacher on a full training set) show progress
            log(f"  {phase} step {k}/{steps}")
            shown = time.time()
        x_soft = x_hard = probs = targets = None
        if phase == "hard":
            index = order[k * B:(k + 1) * B]
        else:
            x_soft, probs, index, partner, cut = cache.batch(chosen[k], images, mean, std)
        if fresh:  # new crops + flips of the images, CutMix with the batch in reverse order (timm's partner)
            cut, rows = cuts[k], slice(k * B, k * B + len(index))
            partner = None if cut is None else torch.arange(len(index) - 1, -1, -1, device=device)
            x_hard = replay(images, index, boxes[rows], flips[rows], partner, cut, size, mean, std)
        if phase != "soft":  # hybrid on stored crops keeps the stored partner and box
            lam = cutmix_lambda(cut, size, size) if cut is not None else 1.0
            targets = mixed_targets(labels[index], num_classes, smoothing, partner, lam)
        if world > 1:  # CutMix partners sit anywhere in the global batch, so each rank builds all of it
            x_soft, probs, x_hard, targets = (t if t is None else t.tensor_split(world)[rank] for t in (x_soft, probs, x_hard, targets))
        x = torch.cat([t for t in (x_soft, x_hard) if t is not None])  # one forward for both terms of the hybrid
        with autocast(device, precision):
            logits = net(model_layout(x))
        if phase == "soft":
            loss = soft_loss(logits, probs, temperature) * (temperature**2 if t2 else 1)
        elif phase == "hard":
            loss = hard_loss(logits, targets)
        else:
            soft_logits, hard_logits = logits.split(len(x_soft)) if x_hard is not None else (logits, logits)
            loss = hybrid_loss(soft_logits, probs, temperature, hard_logits, targets, hybrid_lambda, t2)
        if world > 1:  # DDP averages over ranks: weight each slice by its share of the global batch
            loss = loss * (world * len(x_soft if x_soft is not None else x_hard) / len(index))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group, lr in zip(opt.param_groups, base_lr) if warmup else ():  # step done + k + 1, counted here: no sync a step
            group["lr"] = lr * min(1.0, (done + k + 1) / warmup)
        opt.step()
        total += loss.detach()
    if world > 1:
        torch.distributed.all_reduce(total)
    return total / (steps * world)


# ------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, val: dict, device: torch.device, stats=(IMAGENET_MEAN, IMAGENET_STD), batch_size: int = 500, rank: int = 0,
             world: int = 1, precision: str = "bf16"):
    """Top-1 and top-5 accuracy (%) on the validation set, in batches (sharded over ranks under torchrun)."""
    was_training = model.training
    model.eval()
    if world > 1:  # BatchNorm statistics drift apart between ranks after the last broadcast: use rank 0's
        for b in model.buffers():
            torch.distributed.broadcast(b, 0)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    for s in range(rank * batch_size, len(val["labels"]), world * batch_size):  # rank r: batches r, r + world, ...
        x = normalize(val["images"][s:s + batch_size].to(device, non_blocking=True), *stats)
        y = val["labels"][s:s + batch_size].to(device)
        with autocast(device, precision):
            logits = model(model_layout(x))
        top = logits.topk(min(5, logits.shape[1]), 1).indices
        correct += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum()])
    if world > 1:
        torch.distributed.all_reduce(correct)
    model.train(was_training)
    return tuple(100 * c / len(val["labels"]) for c in correct.tolist())  # top-1, top-5


# ================================================================================ Part II: the program
# config -> checks -> readers -> resolve (reads, checks, writes nothing) -> claim (the first write) -> execute -> report -> main
HERE = Path(__file__).resolve().parent
DEMO = HERE / "demo"
# --normalize: (mean, std) per dataset, as each family trains its models (CIFAR-10: the DC / MTT statistics)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                  "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)), "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_FORMAT = "hald-soft-labels-v1"
MODEL_FORMAT = "hald-model-v1"
# -1 = auto for --label-smoothing and --temperature, by class count: hald.py's values up to the largest class count it
# was measured at (docs/flags.md), the authors' above it, where nothing here says otherwise.
AUTO_LABEL_SMOOTHING, AUTO_TEMPERATURE, AUTO_MEASURED_CLASSES = 0.1, 4.0, 200
AUTHORS_LABEL_SMOOTHING, AUTHORS_TEMPERATURE = 0.8, 20.0
# --recipe: the authors' datasets (name, classes, --normalize); with one, their smoothing 0.8 and T 20 at any class count
RECIPES = {"imagenet1k": ("ImageNet-1K", 1000, "imagenet"), "tiny-imagenet": ("Tiny-ImageNet", 200, "imagenet"),
           "cifar100": ("CIFAR-100", 100, "cifar100"), "imagenette": ("ImageNette", 10, "imagenet"), "imagewoof": ("ImageWoof", 10, "imagenet")}
# -1 = auto for --lr and --eta: the authors' tuned values (validate/hyper.yaml) per dataset and student, as rows (from IPC,
# lr, eta). ImageNette and ImageWoof: their "mostly 5e-4". No row: lr 1e-3, eta 2 (1 from IPC 50), their most common.
AUTHORS_LR_ETA = {
    ("imagenet1k", "resnet18"): [(1, 1e-3, 2.0), (50, 1e-3, 1.0)], ("imagenet1k", "resnet50"): [(1, 5e-4, 2.0), (10, 1e-3, 2.0), (50, 1e-3, 1.0)],
    ("imagenet1k", "resnet101"): [(1, 3.5e-3, 2.0), (10, 1e-3, 2.0), (50, 5e-4, 1.0)],
    **{("imagenet1k", model): [(10, 1e-3, 2.0)] for model in ("mobilenet_v2", "densenet121")},
    ("tiny-imagenet", "resnet18"): [(1, 1e-3, 2.0), (50, 1e-3, 1.0)],
    **{("tiny-imagenet", model): [(1, 5e-4, 2.0), (50, 5e-4, 1.0)] for model in ("resnet50", "resnet101")},
    ("cifar100", "resnet18"): [(1, 5e-4, 2.0), (10, 1e-3, 2.0), (50, 1e-3, 1.0)], ("cifar100", "resnet101"): [(1, 5e-4, 1.0)],
    ("cifar100", "resnet50"): [(1, 1e-3, 1.0), (10, 1e-3, 2.0), (50, 1e-3, 1.0)],
    **{(data, model): [(1, 5e-4, 2.0), (50, 5e-4, 1.0)] for data in ("imagenette", "imagewoof") for model in ("resnet18", "resnet50", "resnet101")},
}
CHECK_IMAGES = 5000  # --val images of the teacher check: every k-th, at least these
RUN_FILES = ("summary.json", "metrics.jsonl", "checkpoint.pt", "curves.png", "comparison.json", "comparison.png", ".lock")
WEIGHT_KEYS = ("state_dict", "model", "net", "model_state_dict")  # where research code keeps a model's weights in a dict
TENSOR_SUFFIXES = (".pt", ".pth")
TENSOR_KEYS = (("images", "labels"), ("image_syn", "label_syn"), ("x", "y"))  # the names dataset condensation code saves under
CACHE_TENSORS = ("index", "boxes", "flips", "partner", "cut", "labels")
CHECKPOINT_KEYS = ("run", "epoch", "model", "optimizer", "pool", "history", "generators", "torch_rng")


# ----------------------------------------------------------------------------- config
def arg(default, help, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


GROUPS = {"data": "data", "teacher": "soft labels", "model": "student and schedule", "batch_size": "optimisation", "seed": "run"}  # each from its first field
# `python hald.py` with no --data: the bundled CIFAR-10 demo, HALD against soft-only from one cache, 1 crop per image.
DEMO_FLAGS = {"schedule": "shs soft", "slc": 10, "epochs": 200}


@dataclasses.dataclass
class Config:
    data: str = arg("", "ImageFolder of the distilled images or a tensor file (DC / DM's res_*.pt, MTT's images_best.pt); none: the demo")
    labels: str = arg("", "labels of a --data tensor file of images only; default: its name with images -> labels (MTT's labels_best.pt)")
    val: str = arg("", "ImageFolder of real validation images, classes paired with --data's by sorted position; required with --data")
    ipc: int = arg(10, "images per class used from --data (the first IPC of each class: files sorted, a tensor file's in file order)")
    image_size: int = arg(0, "input size in pixels; 0 = the height of the first distilled image (a tensor set is resized bilinearly)")
    normalize: str = arg("imagenet", "mean and std of the student's inputs, a tensor --data and a teacher file without its own: "
                         "imagenet, cifar10 (DC / MTT's), cifar100, none, or m1,m2,m3,s1,s2,s3")
    val_storage: str = arg("auto", "where decoded --val images are kept; auto: the GPU, memory or a file", ("auto", "device", "memory", "file"))
    teacher: str = arg("", "hald.py checkpoint, weights with --teacher-arch, or a torchvision ImageNet name[:weights] (resnet18, "
                       "resnet50:IMAGENET1K_V2; no tag: the authors' IMAGENET1K_V1); several, comma-separated: an ensemble")
    teacher_weights: str = arg("", "one weight per --teacher of an ensemble (logits summed with softmax(w / 10)); none: 1/n each")
    teacher_arch: str = arg("", "architecture of a --teacher or --evaluate file not written by hald.py: convnet_bn, resnet18, ...")
    check_teacher: bool = arg(True, "stop before training when the teacher agrees with --data or --val near chance (class order)")
    teacher_mode: str = arg("train", "the teacher's BatchNorm at relabel: train (batch statistics, as the authors) or eval", ("train", "eval"))
    slc: int = arg(100, "soft labels per class stored (a multiple of --ipc; slc/ipc crops per image)")
    temperature: float = arg(-1.0, "T of the stored labels and of the soft loss; -1 = auto: 4 up to 200 classes, the authors' 20 above")
    crop_scale: float = arg(0.08, "smallest crop area fraction of RandomResizedCrop (upper bound 1)")
    cutmix: bool = arg(True, "apply CutMix to every relabel and hard-phase batch")
    label_topk: int = arg(0, "store only the K largest probabilities per label (0 = all classes)")
    label_bits: int = arg(16, "precision of stored probabilities: 16 (fp16) or 8 (per-label min-max codes)", (16, 8))
    cache: str = arg("", "soft-label cache file; default OUT/soft_labels.pt; reused when its fingerprint matches")
    rebuild_cache: bool = arg(False, "rebuild the cache when it exists but was made for other settings")
    model: str = arg("convnet_bn", "student: convnet_bn (ConvNet-3, BatchNorm), convnet (instance norm), a width and depth such as "
                     "convnet_bn64_d4, resnet18 (CIFAR stem <= 64 px) or a torchvision name")
    schedule: str = arg("shs", "shs (HALD), soft, hard, hybrid, hs, sh, hsh, alt-hard-n, alt-soft-2n, ..., or phase:epochs,...; "
                        "several ('shs soft') train from one cache into OUT/<schedule>/, then a comparison")
    epochs: int = arg(300, "training epochs in all")
    soft_epochs: int = arg(-1, "soft epochs of the presets (HALD's split around the hard phase); -1 = auto: 4/5 for convnet_bn..., else half")
    label_smoothing: float = arg(-1.0, "hard targets' label smoothing (timm's); -1 = auto: 0.1 up to 200 classes, the authors' 0.8 above")
    hybrid_lambda: float = arg(1.0, "weight of the hard term in the static hybrid L = L_soft + lambda * L_hard")
    hybrid_crops: str = arg("fresh", "hard term of the hybrid on fresh crops (+CutMix) of the same images, or on the stored crops", ("fresh", "stored"))
    hybrid_t2: bool = arg(False, "multiply the hybrid's soft term by T^2 (Hinton's scaling; off in the authors' code)")
    phase_switch: str = arg("reset", "AdamW across a soft <-> hard switch: reset (state cleared), keep (the authors'), t2 (kept; the "
                            "soft loss x T^2) or warmup (reset, the LR ramped over --warmup-steps); README: When HALD helps", ("reset", "keep", "t2", "warmup"))
    warmup_steps: int = arg(100, "--phase-switch warmup: AdamW's first steps after each switch, over which the LR ramps up linearly")
    batch_size: int = arg(16, "images per step, over all processes under torchrun (relabel batches have the same size)")
    lr: float = arg(-1.0, "AdamW learning rate; -1 = auto: the authors' for their dataset, student and IPC, else 1e-3 (docs/flags.md)")
    weight_decay: float = arg(0.01, "AdamW weight decay, applied to weights with ndim > 1 only")
    eta: float = arg(-1.0, "cosine LR stretch: lr * 0.5 * (1 + cos(pi * e / (epochs * eta))); -1 = auto, as for --lr")
    recipe: str = arg("none", "the authors' recipe for their dataset (--data must have its classes): its --normalize, smoothing 0.8, "
                      "T 20, --lr and --eta, each unless given", ("none", *RECIPES))
    seed: int = arg(0, "one seed for crops, CutMix, soft-batch order and weights")
    seeds: str = arg("", "several seeds (0,1,2): every schedule at every seed into OUT/seed<k>/, then mean +- std; each seed stores its "
                     "own crops (the spread includes which), shared by its schedules (their differences are paired)")
    device: str = arg("auto", "auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)", ("auto", "cpu", "cuda"))
    precision: str = arg("bf16", "CUDA arithmetic: bf16 autocast, or fp32 as the authors ran (the CPU computes in fp32)", ("bf16", "fp32"))
    compile: bool = arg(False, "torch.compile the student (pays off on long GPU runs; the first steps compile)")
    cuda_graph: bool = arg(False, "CUDA: the student's forward + backward replayed from CUDA graphs (small batches)")
    eval_every: int = arg(20, "evaluate every N epochs (and always at the end); 0 = at the end only")
    drift_crops: int = arg(8, "crops per image for the drift diagnostics; 0 turns them off")
    out: str = arg("runs/hald", "output folder: metrics.jsonl, summary.json, the cache by default")
    overwrite: bool = arg(False, "replace the results of a finished or unfinished run in --out (refused otherwise)")
    save_model: str = arg("", "write the trained student here (usable as --teacher)")
    resume: bool = arg(False, "continue from OUT/checkpoint.pt (written after every epoch) with the same settings")
    evaluate: str = arg("", "no training: top-1 and top-5 on --val of this model file (OUT/evaluation.json with --out)")
    debug: bool = arg(False, "show tracebacks instead of one-line errors")


def parse_config(argv=None) -> Config:
    """The CLI, built from Config: one argparse group per section, the demo's flags when --data is not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        group = parser.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        flag, choices = "--" + f.name.replace("_", "-"), f.metadata["choices"]
        shown = "none" if f.default == "" else f.default
        demo = f"; the demo without --data: {DEMO_FLAGS[f.name]}" if f.name in DEMO_FLAGS else ""
        help = f.metadata["help"] + (f" (one of: {', '.join(map(str, choices))})" if choices else "") + f" [default: {shown}{demo}]"
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:  # int, float or str: the field's annotation converts the flag's text
            group.add_argument(flag, type=f.type, metavar=f.name.upper(), help=help)
    given = vars(parser.parse_args(argv))
    if "data" not in given:
        given = {**DEMO_FLAGS, **given}
    if "evaluate" in given and "out" not in given:
        given["out"] = ""  # --evaluate writes nothing unless told where
    return Config(**given)


# ------------------------------------------------------------ checks, one per kind of input
# every numeric flag: (its test, the range in words); -1 means auto where the words say so; a float must also be finite
POSITIVE_OR_AUTO, AT_LEAST_0, AT_LEAST_1 = (lambda v: v > 0 or v == -1, "> 0, or -1 (auto)"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
FLAG_RANGES = {
    "ipc": AT_LEAST_1, "image_size": (lambda v: v == 0 or v >= 8, "0 (the images' own size) or >= 8"), "slc": AT_LEAST_1, "epochs": AT_LEAST_1,
    "temperature": POSITIVE_OR_AUTO, "lr": POSITIVE_OR_AUTO, "eta": POSITIVE_OR_AUTO, "crop_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "soft_epochs": (lambda v: v >= 0 or v == -1, ">= 0 (at most --epochs), or -1 (auto)"), "hybrid_lambda": AT_LEAST_0,
    "label_smoothing": (lambda v: 0 <= v < 1 or v == -1, "in [0, 1), or -1 (auto)"), "label_topk": AT_LEAST_0, "weight_decay": AT_LEAST_0,
    "batch_size": (lambda v: v >= 2, ">= 2 (CutMix mixes the images of a batch)"), "seed": AT_LEAST_0, "eval_every": AT_LEAST_0,
    "drift_crops": AT_LEAST_0, "warmup_steps": AT_LEAST_1}


def check_flags(cfg: Config) -> None:
    """Every flag's value before anything is read: FLAG_RANGES, the choices, and the flags that hold lists or name a device."""
    for name, (ok, words) in FLAG_RANGES.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and ok(value)):
            raise HaldError(f"--{name.replace('_', '-')} must be {words}, got {value}")
    for f in dataclasses.fields(cfg):
        if f.metadata["choices"] and getattr(cfg, f.name) not in f.metadata["choices"]:
            raise HaldError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, f.metadata['choices']))}, got {getattr(cfg, f.name)!r}")
    if cfg.soft_epochs > cfg.epochs:
        raise HaldError(f"--soft-epochs {cfg.soft_epochs} must be at most --epochs {cfg.epochs} (or -1 for auto)")
    mean_std_of(cfg.normalize)
    if cfg.seeds and (not re.fullmatch(r"\d+(,\d+)*", cfg.seeds) or len(set(map(int, cfg.seeds.split(",")))) <= cfg.seeds.count(",")):
        raise HaldError(f"--seeds takes different whole numbers split by commas (0,1,2), got {cfg.seeds!r}")
    n, weights = len(cfg.teacher.split(",")), cfg.teacher_weights.split(",") if cfg.teacher_weights else []
    if weights and (len(weights) != n or not all(re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", w) for w in weights)):
        raise HaldError(f"--teacher-weights {cfg.teacher_weights} must be one finite number per --teacher ({n} comma-separated)")
    if len(cfg.teacher_arch.split(",")) not in (1, n):
        raise HaldError(f"--teacher-arch {cfg.teacher_arch} must name one architecture, or one per --teacher ({n} comma-separated)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise HaldError("--device cuda was asked for but CUDA is not available: use --device cpu or auto")


def mean_std_of(spec: str) -> tuple:
    """--normalize -> (mean, std): a name in NORMALIZATIONS or six finite numbers m1,m2,m3,s1,s2,s3 (s > 0)."""
    if spec in NORMALIZATIONS:
        return NORMALIZATIONS[spec]
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        values = ()
    if len(values) != 6 or not all(map(math.isfinite, values)) or min(values[3:]) <= 0:
        raise HaldError(f"--normalize {spec!r} is neither {', '.join(NORMALIZATIONS)} nor six finite numbers m1,m2,m3,s1,s2,s3 with "
                        f"positive s")
    return values[:3], values[3:]


def normalization(cfg: Config) -> str:
    """The --normalize a run uses: --recipe's when --normalize is left at imagenet (resolve_settings, a tensor set, --evaluate)."""
    return RECIPES[cfg.recipe][2] if cfg.recipe != "none" and cfg.normalize == "imagenet" else cfg.normalize


def check_class_counts(counts: list, classes: list, where, ipc: int = 0, log=print) -> None:
    """Image sets: every class holds --ipc images (--data) or one (ipc 0: --val); a note when most --data classes hold more."""
    for name, count in zip(classes, counts):
        if count < max(ipc, 1):
            raise HaldError(f"class {name!r} in {where} has {count} images, " + (f"fewer than --ipc {ipc}: lower --ipc or add images"
                            if ipc else "and every class of --val is scored: add its images, or give a --val of the classes of --data"))
    typical = sorted(counts)[len(counts) // 2]
    if ipc and typical > 2 * ipc:
        log(f"note: --ipc {ipc} uses the first {ipc} of about {typical} images per class in {where}: a distilled set holds "
            f"IPC images per class; give --ipc {typical} to use them all")


def check_labels(labels, n: int, where: str) -> tuple:
    """Labels of an image set -> class indices (N,) int64 and the class count. Integer indices from 0, or rows (N, C), one-hot or
    soft, each finite and naming exactly one class by a single largest value; every class from 0 to C - 1 present."""
    if not (torch.is_tensor(labels) and labels.ndim in (1, 2) and len(labels) == n and n and labels.numel()):
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise HaldError(f"{where}: {n} images but labels {got}: give class indices (N,) or one-hot rows (N, C)")
    if labels.ndim == 1 and (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.min() < 0):
        raise HaldError(f"{where}: the labels are {labels.dtype} from {labels.min().item():g} to {labels.max().item():g}: give class "
                        f"indices as integers from 0 (labels.long()), or one-hot rows (N, C)")
    if labels.ndim == 2:
        rows = labels.double()
        bad = (~rows.isfinite().all(1) | ((rows == rows.max(1, keepdim=True).values).sum(1) != 1)).nonzero().flatten()
        if len(bad):
            raise HaldError(f"{where}: label row {bad[0]} ({', '.join(f'{v:g}' for v in rows[bad[0], :6].tolist())}"
                            f"{', ...' if rows.shape[1] > 6 else ''}) names no single class: each row must be finite with one largest value")
        num_classes, index = labels.shape[1], rows.argmax(1)
    else:
        num_classes, index = int(labels.max()) + 1, labels.long()
    counts = torch.bincount(index, minlength=num_classes)
    if (counts == 0).any():  # 1-based labels, or one out of range (255 as "ignore")
        raise HaldError(f"{where}: the labels run from 0 to {num_classes - 1} but no image has class {(counts == 0).nonzero()[0, 0]}"
                        f": give class indices 0 to C - 1 (1-based labels: subtract 1; a label out of range: fix or drop that image)")
    return index, num_classes


def check_weights(state: dict, what: str, fix: str = "the file is damaged or its training diverged; use another") -> dict:
    """Model files (teacher, --evaluate, checkpoint.pt): no NaN or infinite weight (not taken later for a wrong class order)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise HaldError(f"{what} holds NaN or infinite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): {fix}")
    return state


def settings_differ(then: dict, now: dict) -> list:
    """Stored settings (a cache's header, a checkpoint's) against this run's: the names of those that differ, sorted."""
    return [k for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)]


def check_target(path, flag: str, folder: bool = False) -> Path:
    """Output targets (--out, run folders, --cache, --save-model), probed without a write: the right kind, a writable folder."""
    path = Path(path)
    try:
        exists, above = path.exists(), next(p for p in (path.parent, *path.parents) if p.exists())
    except OSError as e:  # a name too long for the file system, ...
        raise HaldError(f"cannot use {flag} {path} ({e.strerror or e}): choose another {flag}") from None
    if exists and path.is_dir() != folder:
        raise HaldError(f"{flag} {path} is a {'file' if folder else 'folder'}: give " + ("a folder (it is created if missing)" if folder
                        else "a file name"))
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise HaldError(f"cannot write {flag} {path}: {above} is {'not a folder' if not above.is_dir() else 'not writable'}; "
                        f"choose another {flag}")
    return path


# ---------------------------------------------------------------------------- readers
def list_image_folder(root, log=print) -> tuple[list[list[Path]], list[str]]:
    """Class names (sorted folder names) and, per class, its image files (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise HaldError(f"{root} is not a folder: give an ImageFolder with one sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise HaldError(f"{root} has no class folders: put the images of each class in {root}/<class name>/")
    files, ignored = [], 0
    for name in classes:
        entries = sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith("."))
        files.append([p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS])
        ignored += len(entries) - len(files[-1])
    nested = [name for name, f in zip(classes, files) if not f and any(p.is_dir() for p in (root / name).iterdir())]
    if nested:  # a dataset root (train/, val/) instead of an ImageFolder
        raise HaldError(f"{root}/{nested[0]} holds folders, not images: an ImageFolder has one folder of images per class; "
                        f"did you mean {root / nested[0]}?")
    if ignored:
        log(f"note: ignored {ignored} non-image files in {root}")
    if all(c.isdigit() for c in classes) and classes != sorted(classes, key=int):  # as torchvision's ImageFolder sorts them
        log(f"note: the class folders of {root} are unpadded numbers, paired in text order ({', '.join(classes[:4])}, ...); "
            f"zero-pad the names if their order should be numeric")
    return files, classes


def decode_image(path: Path, size: int, center_crop: bool = False) -> torch.Tensor:
    """One image as uint8 (3, size, size) (size 0: as it is); grayscale and RGBA become RGB."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey (PNG, TIFF, PGM): scaled to 8 bits
                import numpy as np

                values = np.asarray(image, dtype=np.float64)
                if values.min() < 0 or values.max() > 65535:
                    raise ValueError(f"mode {image.mode} with values from {values.min():g} to {values.max():g}, beyond 16 bits")
                image = Image.fromarray((values / 257).round().astype(np.uint8), "L")
            elif image.mode not in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
                raise ValueError(f"mode {image.mode}, which hald.py does not read as colours; save it as 8-bit RGB or grey")
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise HaldError(f"cannot read image {path} ({e}): replace or remove the file") from None
    if center_crop:  # the authors' validation transform: Resize(256) + CenterCrop(224), scaled to size
        short, (w, h) = round(size * 256 / 224), image.size
        image = image.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif size and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.size[1], image.size[0], 3).permute(2, 0, 1)


def decode_images(paths, size: int, center_crop: bool = False, out=None, chunk: int = 1024) -> torch.Tensor:
    """Decode images in threads (PIL releases the GIL), chunk by chunk, into `out`, a uint8 (N, 3, size, size) on any device or
    in a mapped file (None: a new one in memory)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8) if out is None else out
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), chunk):
            out[start:start + chunk] = torch.stack(list(pool.map(lambda p: decode_image(p, size, center_crop), paths[start:start + chunk]))).to(out.device)
    return out


def load_distilled(root, ipc: int, size: int = 0, log=print):
    """The first `ipc` images of each class as uint8 (N, 3, S, S), labels (N,) and class names."""
    files, classes = list_image_folder(root, log)
    check_class_counts([len(f) for f in files], classes, root, ipc, log)
    paths = [p for class_files in files for p in class_files[:ipc]]
    size = size or decode_image(paths[0], 0).shape[1]
    return decode_images(paths, size), torch.arange(len(classes)).repeat_interleave(ipc), classes


def load_tensor_set(path, ipc: int, size: int = 0, stats=NORMALIZATIONS["imagenet"], labels_file: str = "", log=print):
    """The first `ipc` images per class of a tensor file (a dict (TENSOR_KEYS, DC / DM's "data"), a pair, or images and a labels
    file) as float32 (N, 3, S, S) in [0, 1] units (x * std + mean, not clipped), labels, class names "0", ..., layout."""
    path = Path(path)
    if not path.is_file():
        raise HaldError(f"--data {path} does not exist: give an ImageFolder or a tensor file of the distilled set")
    blob, layout = load_trusted(path, "--data tensor file"), "an (images, labels) pair"
    if isinstance(blob, dict) and isinstance(blob.get("data"), (list, tuple)) and blob["data"]:
        blob, layout = blob["data"][-1], f"DC / DM res_*.pt: the last of {len(blob['data'])} [images, labels] pairs under data"
    names = next((k for k in TENSOR_KEYS if isinstance(blob, dict) and k[0] in blob), None)
    if names:
        blob, layout = (blob[names[0]], blob.get(names[1])), f"a dict of {names[0]} and {names[1]}"
    blob = (blob, None) if torch.is_tensor(blob) else blob
    if not (isinstance(blob, (list, tuple)) and len(blob) == 2):
        found = f"a dict of {', '.join(map(str, blob))}" if isinstance(blob, dict) else f"a {type(blob).__name__}"
        raise HaldError(f"--data {path} holds {found}, no layout hald.py knows: save a dict of images and labels, "
                        f"{{'data': [[images, labels]]}}, an (images, labels) pair, or the images with --labels")
    images, labels = blob
    if labels is None or labels_file:
        other = Path(labels_file) if labels_file else path.with_name(path.name.replace("images", "labels"))
        if other == path or not other.is_file():
            raise HaldError(f"--data {path} holds images only and {other} is not a file: give the labels file with --labels")
        labels, layout = load_trusted(other, "--labels file"), f"images, labels from {other}"
    if not (torch.is_tensor(images) and images.is_floating_point() and images.ndim == 4 and images.shape[1] in (1, 3)
            and images.shape[2] == images.shape[3] and images.numel()):
        got = f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__
        raise HaldError(f"--data {path}: the images must be float (N, C, H, W) with 1 or 3 channels and H = W, got {got}"
                        + ("; 0-255 pixels: save images.float() / 255 and pass --normalize none" if "uint8" in got else ""))
    if torch.is_tensor(labels) and labels.ndim == 2:
        log(f"note: the labels of {path} are rows of {labels.shape[1]} values: each image takes the class of its largest (argmax)")
    labels, num_classes = check_labels(labels, len(images), f"--data {path}")
    # ZCA-whitened sets (MTT's --zca) are refused, as hald.py does not apply ZCA: whitening lowers the contrast (std of
    # normalised CIFAR-10 1.2 -> 0.45) and the correlation of neighbouring pixels (0.93 -> 0.4); sets from noise keep std ~1
    x = images.float()
    neighbours = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    if x.std((0, 2, 3)).mean() < 0.8 and neighbours < 0.6:
        raise HaldError(f"--data {path} looks ZCA-whitened (low contrast, neighbouring pixels correlated {neighbours:.2f}): "
                        f"hald.py does not apply ZCA; save the images before whitening (MTT: without --zca)")
    m, s = mean_std(x.device, tuple(stats[0]), tuple(stats[1]))
    x = check_finite(x.expand(-1, 3, -1, -1) * s + m, f"the images of --data {path}", "the distillation diverged, or the file is damaged")
    check_images(x, f"the images of --data {path}, de-normalised (x * std + mean),", "give --normalize the statistics it was saved "
                 "with (none for [0, 1]; 0-255 values: divide by 255)")
    classes = [str(c) for c in range(num_classes)]
    check_class_counts(torch.bincount(labels, minlength=num_classes).tolist(), classes, path, ipc, log)
    x = x[torch.cat([(labels == c).nonzero().flatten()[:ipc] for c in range(num_classes)])]
    if size and size != x.shape[-1]:
        x, layout = F.interpolate(x, (size, size), mode="bilinear", antialias=True), f"{layout}, resized from {x.shape[-1]} px"
    return x.contiguous(), torch.arange(num_classes).repeat_interleave(ipc), classes, layout


def pair_classes(classes: list[str], other: list[str], what: str, log=print, ours: str = "--data") -> None:
    """Classes pair by sorted folder position, as ImageFolder, the authors, SRe2L and FADRM pair them: counts must agree."""
    if len(other) != len(classes):
        raise HaldError(f"{what} has {len(other)} classes but {ours} has {len(classes)}: "
                        f"both must hold the same classes, paired by sorted folder position")
    if other != classes:
        pairs = ", ".join(f"{a} -> {b}" for a, b in zip(classes[:3], other[:3]))
        log(f"note: classes of {ours} paired with {what} by sorted position: {pairs}, ...")


def val_storage_for(nbytes: int, device: torch.device) -> str:
    """Where decoded --val images go: the GPU under half its free memory, else host memory under half of it, else a file."""
    if device.type == "cuda" and nbytes < torch.cuda.mem_get_info(device)[0] // 2:
        return "device"
    try:
        available = int(re.search(r"MemAvailable:\s*(\d+)", Path("/proc/meminfo").read_text())[1]) * 1024
    except (OSError, TypeError):  # not Linux
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 if hasattr(os, "sysconf") else 2 * 1024**3
    return "memory" if nbytes <= available // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) else "file"


def load_val(root, classes: list[str], size: int, device=torch.device("cpu"), storage: str = "auto", spill_dir=None, log=print) -> dict:
    """--val decoded once as uint8 (N, 3, S, S): on the device, in memory, or in a mapped file in spill_dir (without it: only
    the teacher check's images); classes paired with `classes` (None: not); size 0: its first image's height."""
    files, val_classes = list_image_folder(root, log)
    if classes is not None:
        pair_classes(classes, val_classes, f"--val {root}", log)
    check_class_counts([len(f) for f in files], val_classes, f"--val {root}")
    paths = [p for class_files in files for p in class_files]
    size = size or decode_image(paths[0], 0).shape[1]
    labels = torch.cat([torch.full((len(f),), c) for c, f in enumerate(files)])
    center_crop = size > 64  # ImageNet-style evaluation; small images are used as they are
    shape, t0 = (len(paths), 3, size, size), time.time()
    nbytes = math.prod(shape)
    storage = val_storage_for(nbytes, device) if storage == "auto" else storage
    if storage == "file" and spill_dir is None:  # resolve() writes nothing: the teacher check's images now, the whole set
        step = max(1, len(paths) // CHECK_IMAGES)  # into its file after the claim
        return {"images": decode_images(paths[::step], size, center_crop), "labels": labels[::step], "classes": val_classes,
                "storage": "sample", "count": len(paths)}
    if storage == "file":
        key = hashlib.sha256(json.dumps([size, center_crop] + [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]).encode())
        path = Path(spill_dir or ".") / f"val-{key.hexdigest()[:16]}.u8"
        if not (path.exists() and path.stat().st_size == nbytes):
            with atomic_path(path) as tmp:  # a complete file or none
                decode_images(paths, size, center_crop, torch.from_file(str(tmp), shared=True, size=nbytes, dtype=torch.uint8).view(shape))
        images = torch.from_file(str(path), shared=False, size=nbytes, dtype=torch.uint8).view(shape)  # copy-on-write map
    else:
        images = decode_images(paths, size, center_crop, torch.empty(shape, dtype=torch.uint8, device=device if storage == "device" else "cpu"))
    log(f"validation: {len(paths):,} images of {root}, {size} px, {time.time() - t0:.1f}s, "
        f"{'on the device' if storage == 'device' else 'in host memory' if storage == 'memory' else f'in {path}'} ({nbytes / 1e9:.2f} GB)")
    return {"images": images, "labels": labels, "classes": val_classes, "storage": storage}


def load_trusted(path, what: str):
    """torch.load restricted to tensors and plain containers: a file never runs code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle, ...
        raise HaldError(f"cannot load {what} {path} ({type(e).__name__}): it is truncated, corrupted, or holds Python objects, "
                        f"which hald.py never unpickles; save tensors only (a model's state_dict)") from None


def foreign_naming(state: dict, arch: str) -> tuple[dict, str, str]:
    """Other projects' names for hald.py's models, from the keys -> state renamed, architecture, note ("": unchanged): the
    authors' CIFAR model-pool ResNet (torchvision's, CIFAR stem); DC / DM / MTT's ConvNet (width, depth, norm from weights)."""
    convs = [k for k in state if re.fullmatch(r"features\.\d+\.weight", k) and state[k].dim() == 4]
    if CONVNET.fullmatch(arch) and convs == [f"features.{4 * i}.weight" for i in range(len(convs))] and "classifier.weight" in state:
        bn, width, depth = any(k.endswith(".running_mean") for k in state), len(state[convs[0]]), len(convs)
        found = f"convnet{'_bn' * bn}{'' if width == 128 else width}{'' if depth == 3 else f'_d{depth}'}"
        subs = [(r"^features\.", ""), (r"^classifier\.", f"{4 * depth + 1}.")]  # the Flatten before the linear has no weights
        note = (f"the DC/DM/MTT ConvNet naming (features, classifier), read as {found} (width {width}, depth {depth}, "
                f"{'batch' if bn else 'instance'} norm)" + (f" in place of {arch}" if found != arch else ""))
    elif not CONVNET.fullmatch(arch) and {"conv1.weight", "linear.weight"} <= state.keys():
        found, subs = arch, [(r"\.shortcut\.", ".downsample."), (r"^linear\.", "fc.")]
        note = "the CIFAR model-pool ResNet naming (shortcut, linear), renamed to torchvision's"
    else:
        return state, arch, ""
    for pattern, name in subs:
        state = {re.sub(pattern, name, k): v for k, v in state.items()}
    return state, found, note


def read_weights(path, arch: str = "", what: str = "model", log=print) -> dict:
    """A model file (tensors only) and its identity: a hald.py checkpoint, or a state_dict of `arch` (alone or under WEIGHT_KEYS)."""
    blob, identity = load_trusted(path, what), "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if isinstance(blob, dict) and blob.get("format") == MODEL_FORMAT:
        if arch not in ("", blob["arch"]):
            raise HaldError(f"{what} {path} is a hald.py checkpoint of {blob['arch']}, not {arch}: drop --teacher-arch")
        stats = (tuple(blob["mean"]), tuple(blob["std"])) if "mean" in blob else NORMALIZATIONS["imagenet"]  # older: ImageNet's
        return {**blob, "identity": identity, "stats": stats}
    if not arch:
        raise HaldError(f"{what} {path} is not a checkpoint written by hald.py --save-model: for the weights of another "
                        f"project's model, name its architecture with --teacher-arch (convnet_bn, resnet18, ...)")
    for state in (blob, *map(blob.get, WEIGHT_KEYS)) if isinstance(blob, dict) else ():
        if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
            state, arch, note = foreign_naming({re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in state.items()}, arch)
            if note:
                log(f"note: {what} {path}: {note}")
            return {"arch": arch, "classes": None, "image_size": None, "state_dict": state, "identity": f"{identity} as {arch}", "stats": None}
    raise HaldError(f"{what} {path} holds no state_dict (tensors by name), alone or under {', '.join(WEIGHT_KEYS)}: "
                    f"save model.state_dict()")


def model_from_weights(weights: dict, num_classes: int, image_size: int, what: str) -> nn.Module:
    """read_weights' model loaded strictly: missing, unexpected and misshapen keys in one line."""
    state, arch, conv1 = weights["state_dict"], weights["arch"], weights["state_dict"].get("conv1.weight")
    model = build_model(arch, num_classes, image_size, cifar_stem=None if conv1 is None else conv1.shape[-1] == 3)
    own = model.state_dict()
    wrong = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
             "misshapen (file vs model)": [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]}
    head = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    if head and head[0] in state and len(state[head[0]]) != num_classes:
        raise HaldError(f"{what} predicts {len(state[head[0]])} classes but the data has {num_classes}: "
                        f"use a model trained on these classes (hald.py --schedule hard --save-model)")
    if any(wrong.values()):
        raise HaldError(f"{what} does not fit {arch} at {image_size} px: " + "; ".join(
            f"{kind} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "") for kind, keys in wrong.items() if keys)
            + ": give the architecture it was saved from with --teacher-arch (and its input size with --image-size)")
    model.load_state_dict(check_weights(state, what))
    return model


def torchvision_weights(spec: str):
    """'resnet50:IMAGENET1K_V1' -> ('resnet50', weights). No tag: IMAGENET1K_V1 as the authors (else DEFAULT)."""
    if spec.endswith((".pt", ".pth")):
        raise HaldError(f"teacher checkpoint {spec} does not exist: check the path")
    name, _, tag = spec.partition(":")
    try:
        weights = torchvision_models().get_model_weights(name)
    except (ValueError, KeyError):
        raise HaldError(f"teacher {spec!r} is neither a file nor a torchvision model name (such as resnet18 or "
                        f"resnet50:IMAGENET1K_V1): check the path or the name") from None
    tags = [w.name for w in weights]
    tag = tag or ("IMAGENET1K_V1" if "IMAGENET1K_V1" in tags else "DEFAULT")
    if tag != "DEFAULT" and tag not in tags:
        raise HaldError(f"torchvision has no weights {tag!r} for {name}: use one of {', '.join(tags)}")
    return name, weights.DEFAULT if tag == "DEFAULT" else weights[tag]


def load_teacher(spec: str, classes: list, image_size: int, stats=NORMALIZATIONS["imagenet"], log=print, arch: str = "") -> tuple:
    """A model file or a torchvision ImageNet model (name[:weights]) -> model, identity, class names (or None), (mean, std)."""
    if Path(spec).is_file():
        weights = read_weights(spec, arch, "teacher", log)
        if weights["classes"]:
            pair_classes(classes, weights["classes"], f"teacher {spec}", log)
        if weights["image_size"] not in (None, image_size):
            raise HaldError(f"teacher {spec} expects {weights['image_size']} px images, the data gives {image_size} px: "
                            f"pass --image-size {weights['image_size']}")
        model = model_from_weights(weights, len(classes), image_size, f"teacher {spec}")
        return model, weights["identity"], weights["classes"], weights["stats"] or stats
    name, weights = torchvision_weights(spec)
    names = weights.meta.get("categories")  # ImageNet's in class-index order: the sorted order of its WordNet-id folders
    if names:  # before the weights are downloaded
        pair_classes(classes, names, f"teacher {spec}", log)
    return build_model(name, len(classes), image_size, weights=weights).eval(), f"torchvision:{name}:{weights.name}", names, NORMALIZATIONS["imagenet"]


class TeacherEnsemble(nn.Module):
    """Several teachers as one (the authors' --model-choice): logits weighted 1/n, or softmax(w / 10), and summed."""

    def __init__(self, teachers: list, weights=None):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.weights = torch.tensor(weights, dtype=torch.float64).div(10).softmax(0).tolist() if weights else [1 / len(teachers)] * len(teachers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * teacher(x).float() for w, teacher in zip(self.weights, self.teachers))


def load_teachers(specs: str, weights: str, classes: list, image_size: int, stats, log=print, arch: str = "") -> tuple:
    """--teacher: load_teacher's tuple for one, or a TeacherEnsemble of several (--teacher-arch: one, or one each)."""
    specs, archs = specs.split(","), arch.split(",") if "," in arch else [arch] * len(specs.split(","))
    loaded = [load_teacher(spec, classes, image_size, stats, log, a) for spec, a in zip(specs, archs)]
    if len(loaded) == 1:
        return loaded[0]
    if len({str(t[3]) for t in loaded}) > 1:
        raise HaldError(f"the teachers {', '.join(specs)} normalise their inputs differently: give teachers of the same statistics")
    w = [float(v) for v in weights.split(",")] if weights else None
    identity = " + ".join(t[1] for t in loaded) + (f" weighted {w}" if w else "")
    return TeacherEnsemble([t[0] for t in loaded], w), identity, next((t[2] for t in loaded if t[2]), None), loaded[0][3]


def chance_floor(num_classes: int) -> float:
    """Near chance below this (%): twice chance, at least chance + 0.25, at most halfway to 100 %."""
    chance = 100 / num_classes
    return min(max(2 * chance, chance + 0.25), (chance + 100) / 2)


# ---------------------------------------------------------------- the files hald.py writes
@contextlib.contextmanager
def atomic_path(path):
    """A temporary file renamed to `path` at the end: a crash leaves the old file or the new one, a failed write one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise HaldError(f"cannot write {path} ({e.strerror or e}): free space or make it writable (or choose another --out / "
                        f"--cache), then run the command again (with --resume once a run had started)") from None
    finally:
        with contextlib.suppress(OSError):  # a parent that is a file: the message above, not this
            tmp.unlink(missing_ok=True)


def save_atomic(obj, path) -> None:
    """Text, or tensors through a buffer (the archive inside is then named "archive", not after the temporary file)."""
    with atomic_path(path) as tmp:
        if isinstance(obj, str):
            tmp.write_text(obj)
        else:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            tmp.write_bytes(buffer.getvalue())


# the cache on disk (hald.py's own format; a copier of the cache may leave this layer out)
def pack_labels(probs: torch.Tensor, topk: int = 0, bits: int = 16) -> dict:
    """Compact (L, C) probabilities: all classes or the `topk` largest (values, int16 indices), fp16 or 8-bit min-max codes."""
    packed = {}
    if 0 < topk < probs.shape[1]:
        probs, indices = probs.topk(topk, 1)
        packed["indices"] = indices.short()
    if bits == 8:
        lo, hi = probs.min(1, keepdim=True).values.half(), probs.max(1, keepdim=True).values.half()
        span = (hi.float() - lo.float()).clamp_min(1e-12)
        packed.update(codes=((probs - lo.float()) / span * 255).round().clamp(0, 255).to(torch.uint8), lo=lo, hi=hi)
    else:
        packed["values"] = probs.half()
    return packed


def unpack_labels(packed: dict, num_classes: int) -> torch.Tensor:
    """pack_labels' inverse -> (L, C) float; top-k labels spread the rest of the mass evenly over the other classes."""
    if "codes" in packed:
        lo, hi = packed["lo"].float(), packed["hi"].float()
        values = lo + packed["codes"].float() / 255 * (hi - lo)
    else:
        values = packed["values"].float()
    if "indices" not in packed:
        return values
    rest = (1 - values.sum(1, keepdim=True)).clamp_min(0) / max(num_classes - values.shape[1], 1)
    full = rest.expand(len(values), num_classes).clone().scatter_(1, packed["indices"].long(), values)
    return full / full.sum(1, keepdim=True)  # rounding can leave the kept mass a hair above 1


def tensors_digest(tensors: dict) -> str:
    """sha256 over every tensor (nested dicts included) in key order: detects any altered byte."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        digest.update(key.encode() + (tensors_digest(value).encode() if isinstance(value, dict) else value.cpu().numpy().tobytes()))
    return digest.hexdigest()


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_header(*, classes: list, num_images: int, passes: int, image_size: int, batch_size: int, cutmix: bool, temperature: float,
                 **settings) -> dict:
    """A cache file's header: what load_cache rebuilds the cache from, the other settings its labels depend on, their fingerprint."""
    header = dict(format=CACHE_FORMAT, classes=list(classes), num_images=num_images, passes=passes, image_size=image_size,
                  batch_size=batch_size, cutmix=cutmix, temperature=temperature, **settings)
    return {**header, "fingerprint": fingerprint(header)}


def compact_labels_(cache: SoftLabelCache, topk: int = 0, bits: int = 16) -> dict:
    """The cache's labels packed (pack_labels) and read back: lossy labels train as a reused cache will hold them."""
    packed = pack_labels(cache.probs.float(), topk, bits)
    cache.probs = unpack_labels(packed, cache.probs.shape[1]).half()
    return packed


def save_cache(cache: SoftLabelCache, packed: dict, header: dict, path) -> int:
    """Write the cache, its header (settings and their fingerprint) and its tensors' sha256; returns the file's bytes."""
    cut = cache.cut if cache.cut is not None else torch.full((len(cache), 4), -1, dtype=torch.short)  # -1s: no CutMix
    tensors = dict(index=cache.index, boxes=cache.boxes, flips=cache.flips, partner=cache.partner, cut=cut, labels=packed)
    tensors = {k: v if isinstance(v, dict) else v.cpu() for k, v in tensors.items()}
    save_atomic({"header": {**header, "sha256": tensors_digest(tensors)}, **tensors}, path)
    return Path(path).stat().st_size


def load_cache(path, header: dict) -> SoftLabelCache:
    """Load a cache made with exactly these settings (header's fingerprint); refuse anything else."""
    blob = load_trusted(path, "soft-label cache")
    stored = blob.get("header", {}) if isinstance(blob, dict) else {}
    if stored.get("format") != CACHE_FORMAT or any(k not in blob for k in CACHE_TENSORS):
        raise HaldError(f"{path} is not a hald soft-label cache: delete it or pass another --cache")
    if stored.get("fingerprint") != header["fingerprint"]:
        changed = [k for k in settings_differ(stored, header) if k in header and k != "fingerprint"]  # not the names it adds
        raise HaldError(f"cache {path} was made for other settings ({', '.join(changed) or 'images'} differ): "
                        f"pass --rebuild-cache to replace it, or another --cache path")
    t = {k: blob[k] for k in CACHE_TENSORS}
    if tensors_digest(t) != stored.get("sha256") or len(t["index"]) != header["passes"] * header["num_images"]:
        raise HaldError(f"cache {path} is corrupted (checksum or size mismatch): pass --rebuild-cache")
    probs = check_finite(unpack_labels(t["labels"], len(header["classes"])).half(), f"the labels of cache {path}", "pass --rebuild-cache")
    return SoftLabelCache(t["index"], t["boxes"], t["flips"], t["partner"], t["cut"] if header["cutmix"] else None, probs,
                          header["num_images"], header["batch_size"], header["image_size"], temperature=header["temperature"],
                          **dict(zip(("mean", "std"), header.get("teacher_mean_std", (IMAGENET_MEAN, IMAGENET_STD)))))


def save_checkpoint(model: nn.Module, arch: str, classes: list, image_size: int, path, stats=NORMALIZATIONS["imagenet"]) -> None:
    """A student for --teacher and --evaluate: architecture, class names, input size, mean and std, weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"format": MODEL_FORMAT, "arch": arch, "classes": classes, "image_size": image_size,
                 "mean": list(stats[0]), "std": list(stats[1]), "state_dict": state}, path)


def run_settings(cfg: Config) -> dict:
    """What a resumed run must share with the interrupted one: every setting but where outputs go."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "debug", "rebuild_cache", "save_model", "compile",
            "cuda_graph", "check_teacher", "val_storage", "overwrite", "evaluate") and (k, v) not in (("teacher_arch", ""), ("labels", ""),
            ("normalize", "imagenet"), ("recipe", "none"), ("precision", "bf16"), ("teacher_weights", ""), ("phase_switch", "keep"),
            ("seeds", ""), ("warmup_steps", 100))}
    # at the values of older hald.py, newer flags are left out: older checkpoints' fingerprints stay as they were


def read_checkpoint(path, settings: dict) -> dict:
    """OUT/checkpoint.pt, checked before anything is written: a hald.py checkpoint, of a run with these settings, finite."""
    state = load_trusted(path, "checkpoint")
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise HaldError(f"{path} is not a checkpoint written by hald.py: move it away, or pass --overwrite to start again")
    if state["run"] != fingerprint(settings):
        then = json.loads(state.get("settings", "{}"))  # checkpoints before hald.py recorded them: {}
        changed = [f"--{k.replace('_', '-')} {then.get(k)} then, {settings.get(k)} now" for k in settings_differ(then, settings)
                   ] if then else ["not recorded in this older checkpoint"]
        raise HaldError(f"{path} belongs to a run with other settings ({'; '.join(changed)}): resume with the same flags, or use "
                        f"another --out")
    check_weights(state["model"], f"checkpoint {path}", "pass --overwrite to start again")
    return state


# ---------------------------------------------------------------------------- resolve
def auto_lr_eta(num_classes: int, image_size: int, model: str, ipc: int, recipe: str = "none") -> tuple:
    """-1 = auto for --lr and --eta: the AUTHORS_LR_ETA row of the dataset (--recipe, or 1,000 classes, 200, 100 at 32 px),
    student and largest IPC at or below --ipc (else the first). -> lr, eta, why (for the start-up line)."""
    dataset = recipe if recipe != "none" else {1000: "imagenet1k", 200: "tiny-imagenet"}.get(
        num_classes, "cifar100" if (num_classes, image_size) == (100, 32) else "")
    rows = AUTHORS_LR_ETA.get((dataset, model))
    if not rows:
        return 1e-3, 2.0 if ipc < 50 else 1.0, "hald.py's default, as the authors have no row for this setting"
    start, lr, eta = max((row for row in rows if row[0] <= ipc), default=rows[0])
    return lr, eta, f"the authors' {RECIPES[dataset][0]} {model} row from IPC {start}"


def resolve_settings(cfg: Config, num_classes: int, image_size: int = 0) -> Config:
    """The -1 = auto values, resolved once (summary.json records them), and --recipe's --normalize."""
    recipe = RECIPES.get(cfg.recipe)
    if recipe and recipe[1] != num_classes:
        raise HaldError(f"--recipe {cfg.recipe} is for {recipe[0]}'s {recipe[1]:,} classes but --data has {num_classes:,}: "
                        f"drop --recipe or name the dataset of --data")
    measured = num_classes <= AUTO_MEASURED_CLASSES and not recipe
    lr, eta, _ = auto_lr_eta(num_classes, image_size, cfg.model, cfg.ipc, cfg.recipe)
    auto = {"label_smoothing": AUTO_LABEL_SMOOTHING if measured else AUTHORS_LABEL_SMOOTHING,
            "temperature": AUTO_TEMPERATURE if measured else AUTHORS_TEMPERATURE,
            "soft_epochs": cfg.epochs * 4 // 5 if cfg.model.startswith("convnet_bn") else cfg.epochs // 2, "lr": lr, "eta": eta}
    return dataclasses.replace(cfg, normalize=normalization(cfg), **{k: v for k, v in auto.items() if getattr(cfg, k) == -1})


def with_demo_defaults(cfg: Config) -> Config:
    """The bundled demo's files only without --data: a user's data never meets the demo's teacher or --val by accident."""
    if not cfg.data and not DEMO.is_dir():  # an installed hald (pip install .): the demo stays in the checkout
        raise HaldError("--data is missing: give --data, --val and --teacher (the bundled demo runs from a checkout: python hald.py)")
    if not cfg.data:
        return dataclasses.replace(cfg, data=str(DEMO / "distilled"), val=cfg.val or str(DEMO / "val"),
                                   teacher=cfg.teacher or str(DEMO / "teacher.pt"))
    if not cfg.val:
        raise HaldError("--val is missing: with --data, give the real validation set as an ImageFolder "
                        "(its class folders are paired with --data's by sorted position)")
    return cfg


def check_out(cfg: Config, replacing: bool = False) -> None:
    """Where a run writes: --out (no earlier run unless told, or the demo the claim replaces), --cache, --save-model."""
    out = check_target(cfg.out, "--out", folder=True)
    own = {out.resolve(), *((out / name).resolve() for name in RUN_FILES)}
    for path, flag in ((cfg.cache, "--cache"), (cfg.save_model, "--save-model")):  # and --save-model is not the cache
        if path and (check_target(path, flag).resolve() in own or (out / ".lock").resolve() in Path(path).resolve().parents):
            raise HaldError(f"{flag} {path} is --out, or a file hald.py writes there: give another name")
        own.add(Path(cfg.cache or out / "soft_labels.pt").resolve())
    free = cfg.overwrite or cfg.resume or replacing
    if not free and (out / "summary.json").exists():
        raise HaldError(f"--out {out} holds a finished run (summary.json): pass --overwrite to replace it, or another --out")
    if not free and (out / "checkpoint.pt").exists():
        raise HaldError(f"--out {out} holds an unfinished run (checkpoint.pt): pass --resume to continue it, "
                        f"--overwrite to start again, or another --out")


def check_run(cfg: Config, schedule, world: int) -> None:
    """Checks of the settings that need the schedule but no image."""
    soft = any(phase != "hard" for phase, _ in schedule)
    for name, flag in [(cfg.model, "--model")] + [(a, "--teacher-arch") for a in cfg.teacher_arch.split(",")]:  # a typo found now
        if name:
            torchvision_models(name, flag)
    if soft and not cfg.teacher:
        raise HaldError(f"--teacher is missing: the soft phases of --schedule {cfg.schedule} need one (a hald.py checkpoint, "
                        f"weights with --teacher-arch, or a torchvision name such as resnet18); --schedule hard needs none")
    for spec in cfg.teacher.split(",") if soft else []:  # a missing checkpoint or an unknown name, before any image is decoded
        if not Path(spec).is_file():
            torchvision_weights(spec)
            if cfg.teacher_arch:
                raise HaldError(f"--teacher-arch is for a --teacher file; the torchvision teacher {spec} brings its own: drop it")
    if soft and cfg.slc % cfg.ipc:
        raise HaldError(f"--slc {cfg.slc} is not a multiple of --ipc {cfg.ipc}: use e.g. --slc "
                        f"{max(1, round(cfg.slc / cfg.ipc)) * cfg.ipc} (slc/ipc crops per image)")
    if cfg.batch_size % world:
        raise HaldError(f"--batch-size {cfg.batch_size} is the global batch: make it a multiple of the {world} processes")


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """Under torchrun join the process group (NCCL on CUDA, gloo on the CPU) -> device, rank, world size; else 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def seen_alike(path: Path, device: torch.device, world: int) -> bool:
    """Whether `path` exists, refused unless every process sees the same (under torchrun: an --out on each node's own disk)."""
    seen = torch.tensor(float(path.exists()), device=device)
    if world > 1:
        torch.distributed.all_reduce(seen)
        if 0 < seen.item() < world:
            raise HaldError(f"{path} exists for {seen.item():.0f} of the {world} processes: put --out and --cache on a file "
                            f"system that every node shares")
    return bool(seen)


def resolve(cfg: Config, log=print) -> SimpleNamespace:
    """Read and check everything the runs depend on, writing nothing: flags, every schedule and seed, every output path, the
    checkpoints of --resume, the distilled set, the teachers, --val and the teacher check, the caches. -> the plan: the runs
    (a Config and schedule per seed and schedule, seed-major) and what they share (images and labels on the device, ...)."""
    demo, replace_demo = not cfg.data, False
    cfg = with_demo_defaults(cfg)
    check_flags(cfg)
    seeds, schedules = [int(k) for k in cfg.seeds.split(",")] if cfg.seeds else [cfg.seed], cfg.schedule.split() or [cfg.schedule]
    device, rank, world = init_distributed(pick_device(cfg.device))
    log = log if rank == 0 else (lambda *args: None)  # rank 0 speaks and writes for all
    several = len(seeds) * len(schedules) > 1
    for refused, why in ((cfg.cuda_graph and (device.type != "cuda" or world > 1), "--cuda-graph needs a CUDA device and a single "
                          "process: drop it here (or under torchrun)"),
                         (cfg.cache and len(seeds) > 1, "--cache holds one seed's soft labels: with several --seeds each seed "
                          "builds its own in OUT/seed<k>/; drop --cache"),
                         (cfg.save_model and several, "--save-model names one file, which each run of several --schedule or "
                          "--seeds would overwrite: train one schedule at one seed, or drop --save-model"),
                         (cfg.labels and Path(cfg.data).suffix not in TENSOR_SUFFIXES, "--labels is for a --data tensor file (.pt, "
                          ".pth); an ImageFolder's classes are its folders: drop it")):
        if refused:
            raise HaldError(why)
    tensors = load_tensor_set(cfg.data, cfg.ipc, cfg.image_size, mean_std_of(normalization(cfg)), cfg.labels, log) \
        if Path(cfg.data).suffix in TENSOR_SUFFIXES else None  # read once, de-normalised with the statistics it was saved with
    files, classes = (None, tensors[2]) if tensors else list_image_folder(cfg.data, log=lambda *_: None)
    size = tensors[0].shape[-1] if tensors else cfg.image_size
    if not size and (first := next((p for class_files in files for p in class_files), None)):  # its height: the authors' lr row
        from PIL import Image

        with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError), Image.open(first) as image:  # the header only
            size = image.height
    given, cfg = cfg, resolve_settings(cfg, len(classes), size)
    out, runs = Path(cfg.out), []
    # `python hald.py` again replaces the default --out that holds finished demos only (each summary.json in it or a folder
    # down names the bundled images); anything else is left to check_out
    earlier = {p.parent for name in ("summary.json", "checkpoint.pt") for p in (*out.glob(name), *out.glob(f"*/{name}"))} \
        if demo and cfg.out == Config.out and not cfg.resume else ()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # an unfinished run, or a file hald.py did not write
        replace_demo = bool(earlier) and all(json.loads((r / "summary.json").read_text())["config"]["data"] == str(DEMO / "distilled") for r in earlier)
    for k in seeds:
        folder = out / f"seed{k}" if len(seeds) > 1 else out
        for spec in schedules:
            run = dataclasses.replace(cfg, schedule=spec, seed=k, seeds="", cache=cfg.cache or (str(folder / "soft_labels.pt") if several else ""),
                                      out=str(folder / re.sub(r"[^\w.-]+", "-", spec) if len(schedules) > 1 else folder))
            schedule = build_schedule(spec, run.epochs, run.soft_epochs, run.slc // run.ipc)
            check_run(run, schedule, world)
            check_out(run, replacing=replace_demo)
            if run.resume and seen_alike(checkpoint := Path(run.out) / "checkpoint.pt", device, world):
                read_checkpoint(checkpoint, run_settings(run))
            elif run.resume:
                log(f"note: --resume: {checkpoint} does not exist, so this run starts at epoch 1")
            runs.append((run, schedule))
    images, labels, classes = tensors[:3] if tensors else load_distilled(cfg.data, cfg.ipc, cfg.image_size, log)  # u8 or float
    if cfg.batch_size > len(images):
        raise HaldError(f"--batch-size {cfg.batch_size} is larger than the {len(images)} distilled images: lower it")
    if 0 < len(images) % cfg.batch_size < world:
        raise HaldError(f"the last batch ({len(images) % cfg.batch_size} images) needs an image per process ({world}): change --batch-size")
    soft = any(phase != "hard" for _, schedule in runs for phase, _ in schedule)
    teacher = soft and load_teachers(cfg.teacher, cfg.teacher_weights, classes, images.shape[-1], mean_std_of(cfg.normalize), log, cfg.teacher_arch)
    classes = list(teacher[2]) if tensors and teacher and teacher[2] else classes  # a tensor set's classes are numbers: the teacher's names
    val = load_val(cfg.val, classes, images.shape[-1], device, cfg.val_storage, None, log)  # too large for memory: a sample
    plan = SimpleNamespace(given=given, runs=runs, device=device, rank=rank, world=world, images=images.to(device), labels=labels.to(device),
                           classes=classes, layout=tensors[3] if tensors else "", teacher=teacher and (teacher[0].to(device).eval(), *teacher[1:]),
                           val=val, check={}, caches={}, replace_demo=replace_demo, log=log,
                           images_sha256=tensors_digest({"images": images, "labels": labels}) if soft else "")  # hashed once, for every cache
    plan.check = check_teacher(plan, cfg) if teacher and cfg.check_teacher else {}
    for run, schedule in runs:
        path = Path(run.cache or Path(run.out) / "soft_labels.pt")
        if any(phase != "hard" for phase, _ in schedule) and not (run.rebuild_cache or replace_demo) and str(path) not in plan.caches \
                and seen_alike(path, device, world):
            plan.caches[str(path)] = load_cache(path, cache_header_of(run, plan))
    return plan


@torch.no_grad()
def check_teacher(plan, cfg: Config) -> dict:
    """Each teacher (and their ensemble) in eval mode before training: its agreement (%) with the labels of --data, top-1 and
    top-5 on --val (every k-th image, at least CHECK_IMAGES). Near chance on either, a class order is wrong: refused."""
    teacher, members, stats = plan.teacher[0], list(zip(cfg.teacher.split(","), getattr(plan.teacher[0], "teachers", []))), plan.teacher[3]
    step = max(1, len(plan.val["labels"]) // CHECK_IMAGES)
    sample = {"images": plan.val["images"][::step], "labels": plan.val["labels"][::step]}  # a view: no copy of a mapped file
    for who, model in [(f" of {spec}", m) for spec, m in members] + [(" of the ensemble" if members else "", teacher.eval())]:
        agree = torch.zeros((), dtype=torch.long, device=plan.device)
        for s in range(0, len(plan.images), 256):
            with autocast(plan.device, cfg.precision):
                logits = check_finite(model(model_layout(normalize(plan.images[s:s + 256], *stats))), *TEACHER_OUTPUTS)
            agree += (logits.argmax(1) == plan.labels[s:s + 256]).sum()
        top1, top5 = evaluate(model, sample, plan.device, stats, rank=plan.rank, world=plan.world, precision=cfg.precision)
        check = {"teacher_agreement": 100 * agree.item() / len(plan.images), "teacher_top1": top1, "teacher_top5": top5,
                 "teacher_check_val_images": len(sample["labels"])}
        figures = (f"agrees with the labels of --data on {check['teacher_agreement']:.1f} % of {len(plan.images)} images (chance "
                   f"{100 / len(plan.classes):.2f} %);\n  on --val: top-1 {check['teacher_top1']:.2f} %, top-5 {check['teacher_top5']:.2f} % "
                   f"on {check['teacher_check_val_images']:,} of {plan.val.get('count', len(plan.val['labels'])):,} images")
        plan.log(f"teacher check{who}: {figures}")
        bad = [what for what, key in (("--data", "teacher_agreement"), ("--val", "teacher_top1")) if check[key] < chance_floor(len(plan.classes))]
        if bad:
            raise HaldError(f"the class order of {' and '.join(bad)} does not match the teacher's (it {figures.replace(chr(10), '')}): classes pair by "
                            f"sorted folder position, so name the folders in the teacher's order (or pass --no-check-teacher)")
    return check


# ------------------------------------------------------------------------------ claim
HELD = {}  # --out -> (its lock, whether this run made the folder), released when main() returns


def claim(plan, out: Path) -> None:
    """The first write, after the last refusal (by rank 0): the earlier demo replaced, --out made and locked (OUT/.lock, freed
    when the process ends), a killed run's temporary files removed; then a --val too large for memory decoded into --out."""
    if plan.rank == 0:
        if plan.replace_demo:
            shutil.rmtree(out, ignore_errors=True)
            plan.log(f"note: replacing the earlier demo in {out}/ (give --out to keep a run)")
        made = [p for p in (*reversed(out.parents), out) if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
            lock = open(out / ".lock", "a+")
        except OSError as e:
            if made:  # a refused claim leaves no folder behind: all under made[0] is this run's
                shutil.rmtree(made[0], ignore_errors=True)
            raise HaldError(f"cannot write in {e.filename or out} ({e.strerror or e}): make it writable or choose another --out") from None
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except BlockingIOError:  # held
            lock.seek(0)
            raise HaldError(f"--out {out} is in use by {lock.read().strip() or 'another run'}: wait for it to end, or choose another "
                            f"--out") from None
        except OSError as e:  # a file system without locks (Lustre mounted without -o flock): said, not taken for a held lock
            print(f"note: {out} cannot be locked ({e.strerror or e}): nothing stops a second run from writing into this --out meanwhile")
        lock.truncate(0)
        lock.write(f"the run of process {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        HELD[str(out)] = lock, bool(made)
        for tmp in out.rglob(".*.tmp"):  # atomic_path's, of a run killed while writing
            tmp.unlink(missing_ok=True)
    if plan.val["storage"] == "sample":  # checked on its sample: now the whole set, into its file
        cfg = plan.runs[0][0]
        plan.val = load_val(cfg.val, plan.classes, plan.images.shape[-1], plan.device, cfg.val_storage, out, plan.log)


# ---------------------------------------------------------------------------- execute
def make_generators(seed: int) -> dict[str, torch.Generator]:
    """Independent CPU streams: a reused cache gives the run a rebuilt one gives, on any device."""
    return {name: torch.Generator().manual_seed(seed * 1000 + i) for i, name in enumerate(("relabel", "pool", "hard", "drift"))}


def cache_header_of(cfg: Config, plan) -> dict:
    """The settings a run's soft labels depend on (cache_header), with the teacher's identity and the images' digest."""
    return cache_header(classes=plan.classes, num_images=len(plan.images), ipc=cfg.ipc, slc=cfg.slc, passes=cfg.slc // cfg.ipc,
                        image_size=plan.images.shape[-1], batch_size=cfg.batch_size, temperature=cfg.temperature, teacher=plan.teacher[1],
                        teacher_mode=cfg.teacher_mode, crop_scale=cfg.crop_scale, crop_ratio=[3 / 4, 4 / 3], cutmix=cfg.cutmix,
                        seed=cfg.seed, values="probs", images_sha256=plan.images_sha256,
                        label_topk=cfg.label_topk, label_bits=cfg.label_bits,
                        **({"teacher_mean_std": plan.teacher[3]} if plan.teacher[3] != NORMALIZATIONS["imagenet"] else {}))


class GraphedForward:
    """The student's forward and backward replayed from a CUDA graph per input shape; BatchNorm statistics kept as they were."""

    def __init__(self, model: nn.Module, precision: str = "bf16"):
        self.model, self.graphs, self.precision = model, {}, precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape not in self.graphs:
            saved = [b.clone() for b in self.model.buffers()]
            with autocast(x.device, self.precision):  # one wrapper per shape: make_graphed_callables patches its forward
                self.graphs[x.shape] = torch.cuda.make_graphed_callables(nn.Sequential(self.model), (x.clone(),))
            for b, value in zip(self.model.buffers(), saved):
                b.copy_(value)
        return self.graphs[x.shape](x)


def soft_labels(cfg: Config, plan, gens) -> tuple:
    """The run's cache: the one resolve() read, or that this seed's first run wrote, or a relabel. -> the cache, its bytes."""
    path, header = Path(cfg.cache or Path(cfg.out) / "soft_labels.pt"), cache_header_of(cfg, plan)
    cache = plan.caches.get(str(path))
    if cache is None and not cfg.rebuild_cache and seen_alike(path, plan.device, plan.world):  # written by this seed's first run
        cache = load_cache(path, header)
    if cache is not None:
        plan.log(f"reusing soft-label cache {path}")
    else:
        cache = SoftLabelCache.build(plan.teacher[0], plan.images, size=plan.images.shape[-1], crops_per_image=cfg.slc // cfg.ipc,
                                     batch_size=cfg.batch_size, temperature=cfg.temperature, gen=gens["relabel"],
                                     crop_scale=cfg.crop_scale, cutmix=cfg.cutmix, teacher_mode=cfg.teacher_mode, mean=plan.teacher[3][0],
                                     std=plan.teacher[3][1], precision=cfg.precision, log=plan.log, rank=plan.rank, world=plan.world)
        packed = compact_labels_(cache, cfg.label_topk, cfg.label_bits)
        if plan.rank == 0:  # for the reader, beside the fingerprint: the class names of the teacher and of --val
            save_cache(cache, packed, {**header, "teacher_classes": plan.teacher[2], "val_classes": plan.val["classes"]}, path)
    cache_bytes = path.stat().st_size if plan.rank == 0 else 0
    plan.log(f"soft labels: {len(cache.probs)} ({cfg.slc} per class) in {cache_bytes:,} bytes, {cache_bytes / len(cache.probs):.0f} a label")
    return cache.to(plan.device), cache_bytes


def build_student(cfg: Config, num_classes: int, size: int, device, world: int, log=print):
    """The student (evaluated and saved), what training calls (DDP, compiled or graphed) and its optimizer."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, size).to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    net = model
    if world > 1:  # BatchNorm statistics over the global batch on GPUs, as a single process computes them
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        if device.type == "cpu" and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            log(f"note: on the CPU each of the {world} processes keeps its own BatchNorm statistics (SyncBatchNorm needs "
                f"CUDA), so this run trains differently from one process; --model convnet has no BatchNorm")
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:  # with inductor's CUDA graphs when both are asked
        net = torch.compile(net, mode="reduce-overhead" if cfg.cuda_graph else None)
    elif cfg.cuda_graph:
        net = GraphedForward(net, cfg.precision)
    return model, net, make_optimizer(model, cfg.lr, cfg.weight_decay, device)


def execute(cfg: Config, schedule, plan, later: int = 0, comparing: bool = False) -> dict:
    """One run: soft labels, the student trained epoch by epoch (a checkpoint after each), results written. -> its summary."""
    start, gens, log, given, rank, world = time.time(), make_generators(cfg.seed), plan.log, plan.given, plan.rank, plan.world
    out, n, C, size, stats = Path(cfg.out), len(plan.images), len(plan.classes), plan.images.shape[-1], mean_std_of(cfg.normalize)
    soft = any(phase != "hard" for phase, _ in schedule)
    auto = given.label_smoothing == -1 or soft and given.temperature == -1
    rule = f"recipe {cfg.recipe}" if cfg.recipe != "none" else "auto" + ("" if C <= AUTO_MEASURED_CLASSES else ": the authors' values")
    lr_rule = ("auto" if cfg.recipe == "none" else f"recipe {cfg.recipe}") + ": " + auto_lr_eta(C, size, cfg.model, cfg.ipc, cfg.recipe)[2]
    log(f"hald | torch {torch.__version__} | {plan.device} | {n} images of {size} px in {C} classes" + (f" ({plan.layout})" * bool(plan.layout)))
    log(f"  data {cfg.data}" + (f"\n  teacher {cfg.teacher} (BatchNorm mode {cfg.teacher_mode})" if soft else ""))
    log(f"  schedule {' / '.join(f'{p} {k}' for p, k in schedule)}" + (f", AdamW {cfg.phase_switch} at each switch" if len(schedule) > 1 else "")
        + f" | label smoothing {cfg.label_smoothing:g}" + (f", T {cfg.temperature:g}" if soft else "") + (f" ({rule})" if auto else ""))
    log(f"  lr {cfg.lr:g}, eta {cfg.eta:g}" + (f" ({lr_rule})" if -1 in (given.lr, given.eta) else ""))
    if cfg.schedule == "shs" and not comparing and cfg.slc // cfg.ipc > (1 if cfg.phase_switch == "keep" else 4):
        log(f"note: {cfg.slc // cfg.ipc} stored crops per image: HALD's lead over soft-only shrinks as they grow (README: When HALD helps)")
        log('  --schedule "shs soft" trains both from one cache and compares them, --seeds 0,1,2 at three seeds')
    cache, cache_bytes = soft_labels(cfg, plan, gens) if soft else (None, 0)
    model, net, opt = build_student(cfg, C, size, plan.device, world, log)
    phases = [phase for phase, count in schedule for _ in range(count)]
    epoch_settings = dict(batch_size=cfg.batch_size, size=size, temperature=cfg.temperature, smoothing=cfg.label_smoothing,
                          crop_scale=cfg.crop_scale, cutmix=cfg.cutmix, mean=stats[0], std=stats[1], hybrid_lambda=cfg.hybrid_lambda,
                          hybrid_crops=cfg.hybrid_crops, t2=cfg.hybrid_t2 or cfg.phase_switch == "t2", precision=cfg.precision,
                          warmup=cfg.warmup_steps if cfg.phase_switch == "warmup" else 0)
    settings, pool, history, first = run_settings(cfg), [], [], 0
    runaway = 10 * math.log(max(C, 2)) * (cfg.temperature**2 if epoch_settings["t2"] else 1) * (1 + cfg.hybrid_lambda)
    if cfg.resume and seen_alike(out / "checkpoint.pt", plan.device, world):
        state = read_checkpoint(out / "checkpoint.pt", settings)
        model.load_state_dict(state["model"]), opt.load_state_dict(state["optimizer"]), torch.set_rng_state(state["torch_rng"])
        for k, g in gens.items():
            g.set_state(state["generators"][k])
        first, pool, history = state["epoch"], state["pool"].tolist(), json.loads(state["history"])
        log(f"resuming after epoch {first} from {out / 'checkpoint.pt'}")
    if rank == 0:
        save_atomic("".join(json.dumps(row) + "\n" for row in history), out / "metrics.jsonl")
    model.train()
    started = time.time()
    for epoch in range(first, len(phases)):
        phase, t0 = begin_epoch(opt, epoch, phases, lr=cfg.lr, eta=cfg.eta, phase_switch=cfg.phase_switch), time.time()
        loss = run_epoch(phase, net, opt, plan.images, plan.labels, C, gens, cache, pool, **epoch_settings, log=log, rank=rank,
                         world=world).item()
        if not math.isfinite(loss):  # can only fail here: from finite images, labels and weights (each checked), divergence
            raise HaldError(f"the loss became {loss} in epoch {epoch + 1} ({phase} phase): lower --lr (now {cfg.lr:g})")
        row = {"epoch": epoch + 1, "phase": phase, "loss": loss, "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        if loss > runaway and not any("warning" in r for r in history):  # a uniform guess scores ln C (x T^2, + the hybrid's)
            row["warning"] = (f"the loss in epoch {epoch + 1} ({loss:.3g}) is over 10 times a uniform guess's: training is running "
                              f"away (the student may end at chance); lower --lr (now {cfg.lr:g})")
            log(f"warning: {row['warning']}")
        if epoch + 1 == len(phases) or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):  # and always the last
            row["top1"], row["top5"] = evaluate(model, plan.val, plan.device, stats, rank=rank, world=world, precision=cfg.precision)
        history.append(row)
        if rank == 0:  # everything needed to continue exactly (CHECKPOINT_KEYS); metrics.jsonl rewritten whole: never half a line
            save_atomic({"run": fingerprint(settings), "settings": json.dumps(settings), "epoch": epoch + 1, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "pool": torch.tensor(pool, dtype=torch.long), "history": json.dumps(history),
                         "generators": {k: g.get_state() for k, g in gens.items()}, "torch_rng": torch.get_rng_state()}, out / "checkpoint.pt")
            save_atomic("".join(json.dumps(r) + "\n" for r in history), out / "metrics.jsonl")
        acc = f" | top1 {row['top1']:.2f} top5 {row['top5']:.2f}" if "top1" in row else ""
        elapsed = time.time() - started
        left = elapsed / (epoch + 1 - first) * (len(phases) - epoch - 1 + later)
        log(f"epoch {epoch + 1:>4}/{len(phases)} {phase:<6} loss {loss:.4f} lr {row['lr']:.2e} {row['seconds']:.1f}s | "
            f"{elapsed / 60:.1f} min, {left / 60:.1f} min left{' in all' if later else ''}{acc}")
    if rank > 0:  # rank 0 writes the results: drift diagnostics, the saved student, summary.json and curves.png
        return {}
    evals, teacher = [row for row in history if "top1" in row], plan.teacher if soft else None
    top1, top5, best = evals[-1]["top1"], evals[-1]["top5"], max((row["top1"], row["epoch"]) for row in evals)
    drift = drift_report(teacher and teacher[0], model, plan.images, plan.labels, cfg.drift_crops, size, cfg.crop_scale, gens["drift"],
                         (teacher and teacher[3], stats)) if cfg.drift_crops else {}
    if drift:
        log(f"drift on {drift['drift_images']} images: " + (f"teacher crop trace {drift['teacher_crop_trace_mean']:.3g} (median "
            f"{drift['teacher_crop_trace_median']:.3g}), mismatch {drift['teacher_crop_mismatch']:.3g}; " if teacher else "")
            + f"student two-crop JS {drift['student_crop_js_mean']:.3g}")
    if cfg.save_model:
        save_checkpoint(model, cfg.model, plan.classes, size, cfg.save_model, stats)
    seconds = time.time() - start + sum(row["seconds"] for row in history[:first])  # with the epochs of earlier starts
    try:  # a result names its code: hald.py's sha256, and the git commit in a checkout (outside one git says so on stderr)
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git
        git = ""
    summary = {"final_top1": top1, "final_top5": top5, "best_top1": best[0], "best_epoch": best[1],
               "schedule": [list(p) for p in schedule], "soft_labels_per_class": cfg.slc if cache else 0,
               "soft_label_bytes": cache_bytes, "bytes_per_label": cache_bytes / (C * cfg.slc) if cache else 0,
               **(plan.check if soft else {}), "drift": drift, "warnings": [row["warning"] for row in history if "warning" in row],
               "seconds": seconds, "config": dataclasses.asdict(cfg),
               "classes": {"data": plan.classes, "val": plan.val["classes"], "teacher": teacher and teacher[2]},
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "hald_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), **({"git_commit": git} if git else {})},
               "device": torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    save_atomic(json.dumps(summary, indent=2), out / "summary.json")
    budget = f" | SLC {cfg.slc} ({cfg.slc // cfg.ipc} per image)" if cache else ""
    plot_curves({cfg.schedule: [history]}, out / "curves.png", f"{cfg.schedule}: {' / '.join(f'{p} {k}' for p, k in schedule)}{budget} | "
                f"final top-1 {top1:.2f} %", log)
    log(f"final top-1 {top1:.2f}% (best {best[0]:.2f}% at epoch {best[1]}), top-5 {top5:.2f}% | soft labels {cache_bytes:,} bytes | "
        f"{seconds:.0f}s\n  outputs in {out}/")
    return summary


# ----------------------------------------------------------------------------- report
def crop_prob_spread(probs: torch.Tensor) -> torch.Tensor:
    """Trace of the covariance of k probability vectors per image. probs (N, k, C) -> (N,)."""
    centred = probs - probs.mean(1, keepdim=True)
    return centred.pow(2).sum((1, 2)) / max(probs.shape[1] - 1, 1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, at most ln 2) between rows of p and q. -> (N,)."""
    m = (p + q) / 2
    kl = lambda a: torch.xlogy(a, a).sum(1) - torch.xlogy(a, m).sum(1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


@torch.no_grad()
def crop_probs(model, images, k: int, size: int, scale: float, gen, stats, batch_size: int = 256) -> torch.Tensor:
    """Eval-mode probabilities (T = 1) of k random crops per image -> (N, k, C)."""
    model.eval()
    n = len(images)
    boxes, flips = sample_crops(n * k, size, size, gen, scale=(scale, 1.0))
    index = torch.arange(n).repeat_interleave(k)
    out = [F.softmax(model(replay(images, index[s:s + batch_size], boxes[s:s + batch_size], flips[s:s + batch_size],
                                  None, None, size, *stats)).float(), 1).cpu() for s in range(0, n * k, batch_size)]
    return torch.cat(out).view(n, k, -1)


def drift_report(teacher, student, images, labels, k: int, size: int, scale: float, gen, stats=(NORMALIZATIONS["imagenet"],) * 2,
                 max_images: int = 1000) -> dict:
    """The teacher's local semantic drift over relabel crops, and the student's Jensen-Shannon between two crops (the paper's)."""
    pick = torch.randperm(len(images), generator=gen)[:max_images].sort().values
    images, labels = images[pick.to(images.device)], labels[pick]
    report = {"drift_images": len(pick)}
    if teacher is not None:
        probs = crop_probs(teacher, images, k, size, scale, gen, stats[0])
        spread = crop_prob_spread(probs)
        report.update(teacher_crop_trace_mean=spread.mean().item(), teacher_crop_trace_median=spread.median().item(),
                      teacher_crop_mismatch=(probs.argmax(2) != labels[:, None].cpu()).float().mean().item())
    pair = crop_probs(student, images, 2, size, scale, gen, stats[1])
    report["student_crop_js_mean"] = js_divergence(pair[:, 0], pair[:, 1]).mean().item()
    return report


def train_all(cfg: Config, log=print) -> list:
    """The program: resolve, claim, execute each run (a seed of --seeds and schedule of --schedule each, into
    OUT/[seed<k>/][<schedule>/], a seed's schedules from one cache), then report a comparison of several. -> the summaries."""
    plan = resolve(cfg, log)
    out, runs = Path(cfg.out), [run for run, _ in plan.runs]
    claim(plan, out)
    summaries = [execute(run, schedule, plan, later=run.epochs * (len(runs) - 1 - i), comparing=len(runs) > 1)
                 for i, (run, schedule) in enumerate(plan.runs)]
    if len(runs) > 1 and plan.rank == 0:  # the report
        schedules = list(dict.fromkeys(run.schedule for run in runs))
        table, numbers = comparison(schedules, summaries)
        save_atomic(json.dumps({"schedules": schedules, "seeds": list(dict.fromkeys(run.seed for run in runs)), "results": numbers,
                                "summaries": [str(Path(r.out) / "summary.json") for r in runs], "table": table}, indent=2), out / "comparison.json")
        histories = [[json.loads(line) for line in (Path(r.out) / "metrics.jsonl").read_text().splitlines()] for r in runs]
        plot_curves({spec: histories[i::len(schedules)] for i, spec in enumerate(schedules)}, out / "comparison.png",
                    table.splitlines()[0].rstrip(":"), log)
        log(table)
    return summaries


def spread(values: list[float], sign: str = "") -> str:
    """Results over seeds as shown: one value as it is, several as mean +- sample std."""
    return f"{values[0]:{sign}.2f}" if len(values) == 1 else f"{statistics.mean(values):{sign}.2f} +- {statistics.stdev(values):.2f}"


def comparison(schedules: list[str], summaries: list[dict]) -> tuple:
    """A comparison (summaries seed-major) -> its text table (top-1: spread() and each seed's; the paired difference, bytes, time)
    and its numbers by schedule: each seed's top-1 and top-5, their mean, sample std (None for one seed) and n, and the paired
    difference to the first schedule's top-1 (vs_first: mean, std, n)."""
    runs = {spec: summaries[i::len(schedules)] for i, spec in enumerate(schedules)}
    top1 = {spec: [s["final_top1"] for s in rows] for spec, rows in runs.items()}
    over = lambda v: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}  # noqa: E731
    numbers = {spec: {"top1": top1[spec], "top5": [s["final_top5"] for s in rows], **over(top1[spec]),
                      "vs_first": over([a - b for a, b in zip(top1[spec], top1[schedules[0]])])} for spec, rows in runs.items()}
    cfg, n = summaries[0]["config"], len(top1[schedules[0]])
    w = 16 if n > 1 else 8  # "mean +- std" or one value
    lines = [(f"comparison over {n} seeds, the schedules of each seed on its own" if n > 1 else "comparison on the same")
             + f" soft-label cache ({cfg['slc']} labels per class, {cfg['slc'] // cfg['ipc']} per image):",
             f"  {'schedule':<24} {'top-1 %':>{w}} {'vs ' + schedules[0]:>{w + 2}} {'best %':>8} {'label bytes':>12} {'minutes':>8}"
             + ("  top-1 of each seed" if n > 1 else "")]
    for spec, rows in runs.items():
        diff = spread([a - b for a, b in zip(top1[spec], top1[schedules[0]])], "+") if spec != schedules[0] else ""
        each = "  " + ", ".join(f"{v:.2f}" for v in top1[spec]) if n > 1 else ""
        lines.append(f"  {spec:<24} {spread(top1[spec]):>{w}} {diff:>{w + 2}} {statistics.mean(s['best_top1'] for s in rows):>8.2f} "
                     f"{rows[0]['soft_label_bytes']:>12,} {statistics.mean(s['seconds'] for s in rows) / 60:>8.1f}{each}")
    return "\n".join(lines), numbers


def plot_curves(runs: dict[str, list[list[dict]]], path: Path, title: str = "", log=print) -> None:
    """Validation top-1 over the epochs, non-soft phases shaded: one run (curves.png, over its loss by phase, log scale) or the
    schedules of a comparison (a colour each, a line per seed). runs: schedule -> histories. Needs matplotlib, else a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"note: pip install matplotlib to get {path.name}")
        return
    colours, one = {"soft": "tab:blue", "hard": "tab:orange", "hybrid": "tab:purple"}, sum(map(len, runs.values())) == 1
    fig, axes = plt.subplots(2 if one else 1, 1, figsize=(7, 5 if one else 4), sharex=True, squeeze=False)
    top, bottom = axes[0, 0], axes[-1, 0]
    for i, (name, histories) in enumerate(runs.items()):
        for ax in {top, bottom}:
            for row in (row for row in histories[0] if row["phase"] != "soft"):
                ax.axvspan(row["epoch"] - 1, row["epoch"], color=colours[row["phase"]] if one else f"C{i}", alpha=0.12, lw=0)
        finals = [[r for r in h if "top1" in r][-1]["top1"] for h in histories]
        label = f"{name}: {spread(finals)} %" + (f" ({', '.join(f'{v:.2f}' for v in finals)})" if len(finals) > 1 else "")
        for j, history in enumerate(histories):
            evals = [r for r in history if "top1" in r]
            top.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], "o-", color="tab:green" if one else f"C{i}", ms=3,
                     label=None if j else label, alpha=1 if len(histories) == 1 else 0.6)
    top.set(ylabel="validation top-1 (%)", title=title)
    if one:  # the run's training loss by phase
        for phase in dict.fromkeys(r["phase"] for r in histories[0]):
            rows = [r for r in histories[0] if r["phase"] == phase]
            bottom.semilogy([r["epoch"] for r in rows], [r["loss"] for r in rows], ".", ms=2, color=colours[phase], label=f"{phase} loss")
    bottom.legend(title=None if one else "final top-1")
    bottom.set_xlabel("epoch (shaded: orange hard, purple hybrid; white soft)" if one else "epoch (shaded: a schedule's hard phase)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def evaluate_file(cfg: Config, log=print) -> dict:
    """--evaluate: a model file's top-1 and top-5 (%) on --val, printed and (with --out) written to OUT/evaluation.json."""
    check_flags(cfg)
    if cfg.out:
        check_target(Path(cfg.out) / "evaluation.json", "--out")
    if not cfg.val:
        raise HaldError("--evaluate needs --val: the real validation images as an ImageFolder")
    device, weights = pick_device(cfg.device), read_weights(cfg.evaluate, cfg.teacher_arch, log=log)
    classes = list_image_folder(cfg.val, log=lambda *_: None)[1]
    if weights["classes"]:  # a hald.py checkpoint: its classes paired with --val's by position
        pair_classes(classes, weights["classes"], f"model {cfg.evaluate}", log, ours="--val")
    with tempfile.TemporaryDirectory() as spill:
        val = load_val(cfg.val, None, cfg.image_size or weights["image_size"] or 0, device, cfg.val_storage, spill, log)
        size = val["images"].shape[-1]
        layout = torch.channels_last if device.type == "cuda" else torch.preserve_format  # as the student was evaluated
        model = model_from_weights(weights, len(classes), size, f"model {cfg.evaluate}").to(device, memory_format=layout)
        stats = weights["stats"] or mean_std_of(normalization(cfg))  # a hald.py checkpoint's own, else --normalize (or --recipe's)
        top1, top5 = evaluate(model, val, device, stats, precision=cfg.precision)
    result = {"model": cfg.evaluate, "identity": weights["identity"], "arch": weights["arch"], "image_size": size,
              "mean": list(stats[0]), "std": list(stats[1]), "val": cfg.val, "val_images": len(val["labels"]), "top1": top1, "top5": top5}
    log(f"evaluate {cfg.evaluate} ({weights['arch']}, {size} px) on the {len(val['labels']):,} images of --val {cfg.val}: "
        f"top-1 {top1:.2f} %, top-5 {top5:.2f} %")
    if cfg.out:
        save_atomic(json.dumps(result, indent=2), Path(cfg.out) / "evaluation.json")
    return result


# ------------------------------------------------------------------------------- main
def stopped(number, frame):
    """SIGTERM, SIGHUP, SIGUSR1/2 and SIGXCPU (schedulers' warnings before a limit) stop a run as Ctrl-C does."""
    raise KeyboardInterrupt(number)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, code, speaks = parse_config(argv), 2, os.environ.get("RANK", "0") == "0"  # under torchrun: rank 0 says it once
    stops = {sig: signal.signal(sig, stopped) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)
             if threading.current_thread() is threading.main_thread()}
    try:
        evaluate_file(cfg) if cfg.evaluate else train_all(cfg)
        code = 0
    except (HaldError, OSError) as e:  # an OSError that no check foresaw (a path the file system refuses): one line too
        if cfg.debug:
            raise
        if speaks:
            print(f"hald: error: {e if isinstance(e, HaldError) else f'{e.strerror or e}: {e.filename}: check the path'}", file=sys.stderr)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; the checkpoint of the last finished epoch stays
        code, python = 128 + (e.args[0] if e.args else signal.SIGINT), os.path.relpath(sys.executable)  # .venv/bin/python, or a name
        again = ("the same torchrun command with --resume" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else shlex.join(
            [python if not python.startswith("..") else Path(sys.executable).name, sys.argv[0], *argv] + ["--resume"] * (not cfg.resume)))
        if speaks:
            print(f"hald: {'interrupted' if code == 130 else 'stopped by ' + signal.Signals(code - 128).name}"
                  + ("" if cfg.evaluate else f"; to continue from the last finished epoch: {again}"), file=sys.stderr)
    finally:  # also after --debug or an unexpected exception
        for sig, handler in stops.items():
            signal.signal(sig, handler)
        while HELD:
            out, (lock, created) = HELD.popitem()
            lock.close()
            if code and created and [p.name for p in Path(out).iterdir()] == [".lock"]:
                shutil.rmtree(out, ignore_errors=True)
        distributed = "torch.distributed" in sys.modules and torch.distributed.is_initialized()
        if distributed:
            if code == 0:  # the other ranks wait while rank 0 writes the results: a rank that left the group
                torch.distributed.barrier()  # early made gloo abort the run about once in 30 runs
            torch.distributed.destroy_process_group()
    if distributed:  # all written, the group destroyed: leave before torch's C++ teardown of gloo at exit, which aborted
        sys.stdout.flush(), sys.stderr.flush()  # about one 2-process CPU run in 60 (SIGABRT, no Python frame left)
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
