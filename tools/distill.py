"""Make an IPC-k distilled image set from a real training set and a teacher, the two ways HALD's
users make theirs, so that hald.py can be measured on generator-made images.

    python tools/distill.py recover --train ../shared/data/cifar10/train --teacher demo/teacher.pt --out sets/cifar10-recover
    python tools/distill.py select  --train ../shared/data/cifar10/train --teacher demo/teacher.pt --out sets/cifar10-select

recover (SRe2L-style; VILA-Lab/SRe2L recover/): images start as noise in normalised space (or as
random real images, --init real) and are optimised with Adam (betas 0.5 / 0.9, cosine LR) so that
the teacher (eval mode) classifies them as their class and, at every BatchNorm layer, the batch mean
and variance of its input match the running statistics (L2 distances, the first layer weighted x10);
each step sees the batch shifted by a random roll of up to --jitter pixels and flipped with p = 0.5
(--rrc adds a RandomResizedCrop first, as SRe2L's Tiny-ImageNet recipe). The defaults are SRe2L's
published small-image recipe (recover_cifar.sh: lr 0.25, r_bn 0.01, 1,000 iterations, batch 100,
jitter 4); its Tiny-ImageNet recipe (recover_tiny.sh) is --lr 0.1 --r-bn 1 --iterations 4000
--batch-size 200 --rrc. Layout: new000/class000_id000.png, ... (SRe2L's).

select (RDED-style; LINs-lab/RDED synthesize/): for each class, --candidates random training images,
--crops square RandomResizedCrops of each at size/factor; each crop is scored by the teacher's
cross-entropy to its class (eval mode; a crop smaller than the input is zero-padded in normalised
space, i.e. to the mean colour), each image keeps its best crop, the IPC * factor^2 best of the class
are kept and stitched factor x factor into IPC images (RDED's CIFAR and Tiny-ImageNet scripts: factor
1, 5 crops, 300 candidates; ImageNet: factor 2). Layout: 00000/class00000_id00000.png, ... (RDED's).

Both write PNGs (lossless), a contact sheet (contact.png: the first 20 classes, one row each) and
distill.json (settings, time, the teacher's agreement with the class folders) into --out, built in a
temporary folder and renamed at the end. The same --seed on the same CPU gives identical bytes (CUDA
kernels are not all deterministic).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hald  # noqa: E402

CONTACT_CLASSES = 20


# ------------------------------------------------------------------------------ shared
def pixel_bounds(device=torch.device("cpu")):
    """The normalised values of pixel 0 and pixel 1 per channel, each (1, 3, 1, 1)."""
    mean, std = hald.mean_std(device)  # hald.normalize's constants
    return -mean / std, (1 - mean) / std


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Normalised float (N, 3, S, S) -> uint8 pixels, rounded: the inverse of hald.normalize."""
    mean, std = hald.mean_std(x.device)
    return (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


class Progress:
    """A line every 10 seconds with the fraction done and the time left."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.start, self.shown = what, total, time.time(), time.time()

    def __call__(self, done: int, extra=lambda: "") -> None:
        """extra: a function giving the line's end, called only when a line is printed (no GPU sync otherwise)."""
        if time.time() - self.shown >= 10 or done == self.total:
            elapsed = time.time() - self.start
            left = elapsed / max(done, 1) * (self.total - done)
            print(f"{self.what} {done}/{self.total} | {elapsed / 60:.1f} min, {left / 60:.1f} min left{extra()}", flush=True)
            self.shown = time.time()


@torch.no_grad()
def agreement(teacher: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    """The teacher's top-1 agreement (%) with the class of each image (eval mode, full images)."""
    teacher.eval()
    hits = sum((teacher(hald.normalize(images_u8[s:s + 256])).argmax(1) == labels[s:s + 256]).sum().item()
               for s in range(0, len(images_u8), 256))
    return 100 * hits / len(images_u8)


def contact_sheet(images_u8: torch.Tensor, labels: torch.Tensor, path: Path, scale: int = 2) -> None:
    """One row per class (the first CONTACT_CLASSES), its images left to right, each scaled up `scale` times."""
    from PIL import Image

    classes = sorted(set(labels.tolist()))[:CONTACT_CLASSES]
    rows = [images_u8[labels == c] for c in classes]
    S, cols = images_u8.shape[-1] * scale, max(len(r) for r in rows)
    sheet = torch.full((3, S * len(rows), S * cols), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            sheet[:, i * S:(i + 1) * S, j * S:(j + 1) * S] = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    Image.fromarray(sheet.permute(1, 2, 0).numpy()).save(path)


def write_set(images_u8: torch.Tensor, labels: torch.Tensor, layout: str, out: Path, info: dict) -> None:
    """PNGs in the generator's layout, contact.png and distill.json, into a temporary folder renamed to out."""
    from PIL import Image

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[int, int] = {}
    for image, c in zip(images_u8, labels.tolist()):
        i = counts[c] = counts.get(c, -1) + 1
        name = f"new{c:03d}/class{c:03d}_id{i:03d}.png" if layout == "recover" else f"{c:05d}/class{c:05d}_id{i:05d}.png"
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / name)
    contact_sheet(images_u8, labels, tmp / "contact.png")
    (tmp / "distill.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ----------------------------------------------------------------------------- recover
class BatchNormStatistics:
    """Forward hooks on every BatchNorm2d: the distance of each batch's input mean and (biased) variance
    per channel to the layer's running statistics, ||mean - running_mean||_2 + ||var - running_var||_2."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self.hook) for m in self.layers]

    def hook(self, module, inputs, output):
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def pop(self, first_multiplier: float) -> torch.Tensor:
        """The weighted sum over layers of the last forward (the first layer x first_multiplier)."""
        losses, self.losses = self.losses, []
        return first_multiplier * losses[0] + sum(losses[1:])


def roll_flip_rrc(x: torch.Tensor, gen: torch.Generator, jitter: int, rrc: bool) -> torch.Tensor:
    """One random view of the whole batch: RandomResizedCrop (optional, one box for all), a roll of up to
    `jitter` pixels each way, a horizontal flip with p = 0.5. Differentiable in x."""
    S = x.shape[-1]
    if rrc:
        boxes, _ = hald.sample_crops(1, S, S, gen)
        x = hald.crop_resize(x, boxes.expand(len(x), 4), torch.zeros(len(x), dtype=torch.bool), S)
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.flip(3) if torch.rand(1, generator=gen).item() < 0.5 else x


def recover(teacher: nn.Module, num_classes: int, args, gen: torch.Generator, start_u8=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SRe2L-style recovery of IPC images per class; returns the optimised images (N, 3, S, S), float, normalised with
    ImageNet's statistics as hald.normalize makes them (to_uint8 gives their pixels), and labels (N,).
    Batches take the classes in order for ipc index 0, then 1, ...; start_u8: uint8 images in that order
    to start from instead of noise."""
    stats = BatchNormStatistics(teacher)
    if not stats.layers:
        raise hald.HaldError("recover matches the teacher's BatchNorm statistics, and this teacher has no BatchNorm layer: "
                             "use a BatchNorm teacher (such as convnet_bn) or the select sub-command")
    teacher.eval().requires_grad_(False)
    S, device = args.image_size, next(teacher.parameters()).device
    labels = torch.arange(num_classes).repeat(args.ipc)  # (ipc * C,): class-major inside each ipc index
    low, high = pixel_bounds(device)
    out = []
    batches = range(0, len(labels), args.batch_size)
    progress = Progress("recover: step", len(batches) * args.iterations)
    for b, start in enumerate(batches):
        target = labels[start:start + args.batch_size].to(device)
        if start_u8 is None:
            x = torch.randn(len(target), 3, S, S, generator=gen).to(device)
        else:
            x = hald.normalize(start_u8[start:start + args.batch_size]).to(device)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        for it in range(args.iterations):
            opt.param_groups[0]["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * it / args.iterations))
            logits = teacher(roll_flip_rrc(x, gen, args.jitter, args.rrc))
            ce, bn = F.cross_entropy(logits, target), stats.pop(args.first_bn_multiplier)
            loss = ce + args.r_bn * bn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # pixels stay in [0, 1]
                x.clamp_(low, high)
            progress(b * args.iterations + it + 1, lambda: f" | batch {b + 1}/{len(batches)}, cross-entropy {ce.item():.3f}, BN {bn.item():.3f}")
        out.append(x.detach().cpu())
    for h in stats.handles:
        h.remove()
    return torch.cat(out), labels


# ------------------------------------------------------------------------------ select
@torch.no_grad()
def select(teacher: nn.Module, files: list[list[Path]], args, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED-style selection: per class, the IPC * factor^2 most teacher-confident crops of random training
    images, stitched factor x factor. Returns uint8 images (C * ipc, 3, S, S) and labels."""
    teacher.eval()
    S, f, device = args.image_size, args.factor, next(teacher.parameters()).device
    cell = S // f
    images, labels = [], []
    progress = Progress("select: class", len(files))
    for c, class_files in enumerate(files):
        chosen = [class_files[i] for i in torch.randperm(len(class_files), generator=gen)[:args.candidates].tolist()]
        real = hald.decode_images(chosen, S)  # (M, 3, S, S) uint8
        M, k = len(real), args.crops
        boxes, _ = hald.sample_crops(M * k, S, S, gen, scale=(0.08, 1.0), ratio=(1.0, 1.0))
        index = torch.arange(M).repeat_interleave(k)  # (M * k,): the k crops of image 0, then of image 1, ...
        crops = hald.crop_resize(hald.normalize(real[index]), boxes, torch.zeros(M * k, dtype=torch.bool), cell)
        padded = F.pad(crops, ((S - cell) // 2, S - cell - (S - cell) // 2) * 2)  # zeros = the mean colour
        scores = torch.cat([F.cross_entropy(teacher(padded[s:s + 500].to(device)), torch.full((len(padded[s:s + 500]),), c, device=device),
                                            reduction="none").cpu() for s in range(0, M * k, 500)]).view(M, k)
        best_crop = scores.argmin(1)  # (M,): each image's best crop
        best_image = scores.min(1).values.argsort()[:args.ipc * f * f]  # the most confident images of the class
        if len(best_image) < args.ipc * f * f:
            raise hald.HaldError(f"class {c} has {len(best_image)} candidate images, fewer than ipc x factor^2 = "
                                 f"{args.ipc * f * f}: lower --ipc or --factor")
        patches = crops.view(M, k, 3, cell, cell)[best_image, best_crop[best_image]]  # (ipc f^2, 3, cell, cell)
        grid = patches.view(f, f, args.ipc, 3, cell, cell).permute(2, 3, 0, 4, 1, 5).reshape(args.ipc, 3, f * cell, f * cell)
        stitched = grid if f * cell == S else F.interpolate(grid, size=(S, S), mode="bilinear", align_corners=False)
        images.append(to_uint8(stitched))
        labels.append(torch.full((args.ipc,), c))
        progress(c + 1)
    return torch.cat(images), torch.cat(labels)


# -------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, help in (("recover", "SRe2L-style: optimise noise to the teacher's BatchNorm statistics and class"),
                       ("select", "RDED-style: the teacher's most confident crops of real images, stitched")):
        p = sub.add_parser(kind, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--train", required=True, help="ImageFolder of real training images (its class folders name the classes)")
        p.add_argument("--teacher", required=True, help="teacher: hald.py checkpoint or torchvision name (as hald.py --teacher)")
        p.add_argument("--out", required=True, help="folder to write the set into (refused if it exists, unless --overwrite)")
        p.add_argument("--ipc", type=int, default=10, help="images per class")
        p.add_argument("--image-size", type=int, default=0, help="pixels; 0 = the height of the first training image")
        p.add_argument("--seed", type=int, default=0, help="one seed for every random draw")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        if kind == "recover":
            p.add_argument("--iterations", type=int, default=1000, help="Adam steps per batch")
            p.add_argument("--lr", type=float, default=0.25, help="Adam learning rate (cosine to 0)")
            p.add_argument("--r-bn", type=float, default=0.01, help="weight of the BatchNorm statistics loss")
            p.add_argument("--first-bn-multiplier", type=float, default=10.0, help="extra weight of the first BatchNorm layer")
            p.add_argument("--jitter", type=int, default=4, help="largest random roll in pixels, each way")
            p.add_argument("--rrc", action="store_true", help="a RandomResizedCrop of the batch before the roll (SRe2L's Tiny recipe)")
            p.add_argument("--batch-size", type=int, default=100, help="images optimised together (their BatchNorm statistics are matched)")
            p.add_argument("--init", default="noise", choices=("noise", "real"), help="start from noise or from random real images")
            p.add_argument("--save-tensor", default="", help="also write the images before their rounding to 8 bits, as hald.py "
                           "--data FILE.pt reads them: {'images': float (N, 3, S, S) normalised with ImageNet's statistics, 'labels'}")
        else:
            p.add_argument("--factor", type=int, default=1, choices=(1, 2), help="crops stitched per side")
            p.add_argument("--crops", type=int, default=5, help="random crops scored per candidate image")
            p.add_argument("--candidates", type=int, default=300, help="random training images per class to score")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise hald.HaldError(f"--out {out} exists: pass --overwrite to replace it, or another --out")
        if args.ipc < 1 or (args.kind == "recover" and (args.iterations < 1 or args.batch_size < 1)):
            raise hald.HaldError("--ipc, --iterations and --batch-size must be >= 1")
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        device = hald.pick_device(args.device)
        files, classes = hald.list_image_folder(args.train)
        args.image_size = args.image_size or hald.decode_image(files[0][0], 0).shape[1]
        teacher, teacher_id, *_ = hald.load_teacher(args.teacher, classes, args.image_size)
        teacher = teacher.to(device)
        t0 = time.time()
        print(f"distill {args.kind} | {len(classes)} classes of {args.train} | IPC {args.ipc} at {args.image_size} px | "
              f"teacher {args.teacher} | {device}", flush=True)
        if args.kind == "recover":
            start = None
            if args.init == "real":  # random training images, in the order recover makes its images (ipc index-major)
                picks = [[f[i] for i in torch.randperm(len(f), generator=gen)[:args.ipc].tolist()] for f in files]
                start = hald.decode_images([picks[c][i] for i in range(args.ipc) for c in range(len(classes))], args.image_size)
            floats, labels = recover(teacher, len(classes), args, gen, start)
            images = to_uint8(floats)
        else:
            images, labels = select(teacher, files, args, gen)
        order = torch.argsort(labels * len(labels) + torch.arange(len(labels)))  # class by class, in making order
        images, labels = images[order], labels[order]
        if args.kind == "recover" and args.save_tensor:  # the set before its rounding to 8-bit pixels, in the PNGs' order
            hald.save_atomic({"images": floats[order], "labels": labels}, args.save_tensor)
        agree = agreement(teacher.cpu(), images, labels)
        seconds = time.time() - t0
        info = {"kind": args.kind, "command": "python tools/distill.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "settings": {k: v for k, v in vars(args).items() if k not in ("kind", "overwrite")}, "teacher_id": teacher_id,
                "classes": classes, "teacher_agreement": agree, "seconds": round(seconds, 1),
                "torch": torch.__version__, "device": str(device)}
        write_set(images, labels, args.kind, out, info)
        print(f"wrote {len(images)} images to {out} in {seconds / 60:.1f} min; the teacher agrees with their classes on "
              f"{agree:.1f} % (chance {100 / len(classes):.1f} %)", flush=True)
        return 0
    except hald.HaldError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the set is written only at the end: nothing half-made is left in --out
        print(f"distill: interrupted; nothing was written to {args.out}: run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
