"""HALD in your own PyTorch loop: a torchvision ResNet-18 trained Soft -> Hard -> Soft from hald.py's pieces (the
soft-label cache, the schedule, the crops and the losses), without hald.py's command line or its epoch loop.

    python examples/hald_in_your_loop.py               # the bundled CIFAR-10 demo (10 images per class), 60 epochs
    python examples/hald_in_your_loop.py --epochs 300  # the paper's length

Your own data: `images` uint8 (N, 3, H, W) (or float in [0, 1] units), `labels` (N,), any `teacher` nn.Module.
"""
import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # hald.py beside examples/ (or: pip install .)
from hald import (SoftLabelCache, build_schedule, cutmix_lambda, draw_soft_batches, hard_loss, lr_at, mixed_targets,  # noqa: E402
                  replay, sample_crops, sample_cutmix_boxes, soft_loss)


def train_hald(student, teacher, images, labels, num_classes: int, crops_per_image: int = 1, epochs: int = 300,
               batch_size: int = 16, lr: float = 1e-3, temperature: float = 4.0, smoothing: float = 0.1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size, n = images.shape[-1], len(images)
    cache = SoftLabelCache.build(teacher, images, size=size, crops_per_image=crops_per_image, batch_size=batch_size,
                                 temperature=temperature, gen=gen)  # the fixed budget: n * crops_per_image labels
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    phases = [phase for phase, count in build_schedule("shs", epochs) for _ in range(count)]  # soft / hard / soft
    pool = []  # stored batches not yet replayed: every batch once per pass over the cache
    for epoch, phase in enumerate(phases):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, lr, epochs, eta=2)
        if epoch and phase != phases[epoch - 1]:  # AdamW afresh in each phase (hald.py's default; the authors keep its state):
            opt.state.clear()  # its memory of the other phase's gradient sizes would set this phase's step sizes
        student.train()
        if phase == "soft":  # whole stored batches, replayed exactly, with the teacher's stored labels
            for k in draw_soft_batches(pool, len(cache) // crops_per_image, len(cache), gen):
                x, probs, *_ = cache.batch(k, images)
                loss = soft_loss(student(x), probs, temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:  # fresh crops, CutMix with the batch reversed, label-smoothed hard targets
            for index in torch.randperm(n, generator=gen).split(batch_size):
                boxes, flips = sample_crops(len(index), size, size, gen)
                box, partner = sample_cutmix_boxes(1, size, size, gen)[0], torch.arange(len(index) - 1, -1, -1)
                x = replay(images, index, boxes, flips, partner, box, size)
                targets = mixed_targets(labels[index], num_classes, smoothing, partner, cutmix_lambda(box, size, size))
                loss = hard_loss(student(x), targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
        print(f"epoch {epoch + 1}/{epochs} {phase} loss {loss.item():.4f}", flush=True)
    return student


if __name__ == "__main__":
    import hald  # the demo's files and the evaluation only; training above uses the pieces alone

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    images, labels, classes = hald.load_distilled(hald.DEMO / "distilled", ipc=10)
    teacher = hald.model_from_weights(hald.read_weights(hald.DEMO / "teacher.pt"), len(classes), 32, "teacher")
    torch.manual_seed(0)
    student = torchvision.models.resnet18(num_classes=len(classes))
    train_hald(student, teacher, images, labels, len(classes), epochs=args.epochs)
    top1, top5 = hald.evaluate(student, hald.load_val(hald.DEMO / "val", classes, 32, log=lambda *_: None), torch.device("cpu"))
    print(f"top-1 {top1:.2f} %, top-5 {top5:.2f} % on the {len(classes)}-class demo validation images")
