"""The paper's gradient alignment as a signal known before training: the cosine between the gradients of the soft loss
(KL to a stored crop's teacher label) and of the hard loss (label-smoothed, CutMix-mixed cross-entropy of the same crop's
class) with respect to all the student's weights, on the same stored batches, over the first soft epochs.

    python tools/alignment.py --tiny /tmp/tiny            # every setting of tools/when_hald_helps.py, missing ones only
    python tools/alignment.py --only "CIFAR-10 real"      # some of them
    python tools/alignment.py --show                      # the committed values

Per setting (student, image set, stored crops per image s) and seed 0: the soft-label cache the runs used (same seed,
T 4, crop scale 0.08, CutMix, teacher in train mode), the student as hald.py builds it, then --epochs soft epochs with
hald.py's run_epoch and learning rate; before the first and after each, the cosine on the first --batches stored batches
(BatchNorm on batch statistics, as training sees them; the running statistics put back). Written to
results/alignment.json: the cosine at epoch 0, the mean over epochs 0 to --epochs, and the curve.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hald  # noqa: E402

RESULTS = ROOT / "results" / "alignment.json"
CIFAR_TEACHER, TINY_TEACHER = ROOT / "demo" / "teacher.pt", ROOT / "results" / "tiny-imagenet" / "teacher.pt"
# setting (as tools/when_hald_helps.py names it) -> (images: a folder, "tiny-real" for the Tiny draw or "tiny-c<k>" for its
# k-class subset with the teacher restricted to it (tools/evidence_classes.py), teacher, image size, student); every
# budget s the setting was measured at
SETTINGS = {
    "CIFAR-10 real, ConvNet-3 BN": ("demo/distilled", CIFAR_TEACHER, 32, "convnet_bn", (1, 2, 4, 10)),
    "CIFAR-10 real, ResNet-18": ("demo/distilled", CIFAR_TEACHER, 32, "resnet18", (1, 2, 10)),
    "CIFAR-10 real, ConvNet-3 IN": ("demo/distilled", CIFAR_TEACHER, 32, "convnet", (1, 2, 10)),
    "CIFAR-10 recover, ConvNet-3 BN": ("sets/cifar10-recover", CIFAR_TEACHER, 32, "convnet_bn", (1, 2, 10)),
    "CIFAR-10 select, ConvNet-3 BN": ("sets/cifar10-select", CIFAR_TEACHER, 32, "convnet_bn", (1, 2, 10)),
    "Tiny 32 px real, ConvNet-3 BN 64": ("tiny-real", TINY_TEACHER, 32, "convnet_bn64", (1, 2, 10)),
    "Tiny 32 px real, ConvNet-3 BN 128": ("tiny-real", TINY_TEACHER, 32, "convnet_bn", (1,)),
    "Tiny 32 px real, ConvNet-3 IN 64": ("tiny-real", TINY_TEACHER, 32, "convnet64", (1,)),
    "Tiny 32 px recover, ConvNet-3 BN 64": ("sets/tiny32-recover", TINY_TEACHER, 32, "convnet_bn64", (1, 2)),
    "Tiny 32 px recover, ConvNet-3 BN 128": ("sets/tiny32-recover", TINY_TEACHER, 32, "convnet_bn", (1,)),
    "Tiny 32 px select, ConvNet-3 BN 64": ("sets/tiny32-select", TINY_TEACHER, 32, "convnet_bn64", (1, 2)),
    "Tiny 32 px select, ConvNet-3 BN 128": ("sets/tiny32-select", TINY_TEACHER, 32, "convnet_bn", (1,)),
    **{f"Tiny 32 px real, {k} classes, ConvNet-3 BN 64": (f"tiny-c{k}", None, 32, "convnet_bn64", (1, 2, 4, 10)) for k in (10, 50)},
}


def flat_grad(loss: torch.Tensor, params: list, retain: bool = False) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=retain)])


def cosine(net, cache, images, labels, num_classes: int, batches: list[int], smoothing: float, temperature: float, stats) -> float:
    """Mean over the stored batches of cos(grad soft loss, grad hard loss), the student's weights all together."""
    params = [p for p in net.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    net.train()
    values = []
    for k in batches:
        x, probs, index, partner, box = cache.batch(k, images, *stats)
        lam = hald.cutmix_lambda(box, cache.size, cache.size) if box is not None else 1.0
        targets = hald.mixed_targets(labels[index], num_classes, smoothing, partner, lam)
        logits = net(hald.model_layout(x))
        soft = flat_grad(hald.soft_loss(logits, probs, temperature), params, retain=True)
        hard = flat_grad(hald.hard_loss(logits, targets), params)
        values.append(torch.nn.functional.cosine_similarity(soft, hard, dim=0).item())
    for name, b in net.named_buffers():
        b.copy_(buffers[name])
    return statistics.mean(values)


def measure(folder, teacher_path: Path, size: int, model: str, s: int, epochs: int = 10, batches: int = 8, seed: int = 0,
            smoothing: float = 0.1, temperature: float = 4.0, ipc: int = 10, log=print) -> dict:
    """The cosine before the first soft epoch and after each of `epochs`, as a run with these settings would start."""
    images, labels, classes = hald.load_distilled(folder, ipc, size, log=lambda *_: None)
    cfg = hald.resolve_settings(hald.Config(data=str(folder), model=model, seed=seed, slc=ipc * s, epochs=300), len(classes), size)
    gens = hald.make_generators(seed)
    teacher, _, _, stats = hald.load_teachers(str(teacher_path), "", classes, size, hald.NORMALIZATIONS["imagenet"], log=lambda *_: None)
    cache = hald.SoftLabelCache.build(teacher.eval(), images, size=size, crops_per_image=s, batch_size=cfg.batch_size,
                                      temperature=temperature, gen=gens["relabel"], mean=stats[0], std=stats[1], log=lambda *_: None)
    hald.compact_labels_(cache)  # the fp16 labels a run trains from
    _, net, opt = hald.build_student(cfg, len(classes), size, torch.device("cpu"), 1)
    chosen, student = list(range(min(batches, len(cache)))), hald.mean_std_of(cfg.normalize)  # the student's statistics
    curve, pool = [cosine(net, cache, images, labels, len(classes), chosen, smoothing, temperature, student)], []
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = hald.lr_at(epoch, cfg.lr, cfg.epochs, cfg.eta)
        hald.run_epoch("soft", net, opt, images, labels, len(classes), gens, cache, pool, batch_size=cfg.batch_size,
                       temperature=temperature, smoothing=smoothing, mean=student[0], std=student[1])
        curve.append(cosine(net, cache, images, labels, len(classes), chosen, smoothing, temperature, student))
    return {"cosine_start": curve[0], "cosine_mean": statistics.mean(curve), "curve": curve, "epochs": epochs, "batches": len(chosen),
            "seed": seed, "model": model, "images": len(images)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", default="/tmp/tiny", help="unpacked Tiny-ImageNet-200 (its IPC-10 draw, for the Tiny real rows)")
    parser.add_argument("--only", default="", help="settings whose name contains this text")
    parser.add_argument("--epochs", type=int, default=10, help="soft epochs measured over")
    parser.add_argument("--batches", type=int, default=8, help="stored batches the cosine is averaged over")
    parser.add_argument("--show", action="store_true", help="print the committed values, measure nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, (where, source, size, model, budgets) in SETTINGS.items():
        for s in budgets:
            folder, teacher = where, source
            key = f"{name} | s={s}"
            if args.show or key in done or args.only not in name:
                if key in done:
                    print(f"{key}: cosine {done[key]['cosine_start']:+.3f} at the start, {done[key]['cosine_mean']:+.3f} over "
                          f"{done[key]['epochs']} epochs")
                continue
            if folder.startswith("tiny-"):
                from evidence_classes import prepare
                from evidence_tiny import draw_distilled
                if not (Path(args.tiny) / "train").is_dir():
                    print(f"{key}: skipped (no {args.tiny}/train: pass --tiny)")
                    continue
                if folder == "tiny-real":
                    folder = draw_distilled(Path(args.tiny) / "train", ROOT / "runs" / "tiny" / "distilled-ipc10-seed0")
                else:
                    folder, _, teacher = prepare(Path(args.tiny), int(folder[6:]), ROOT / "runs" / "classes")
            start = time.time()
            done[key] = measure(ROOT / folder, teacher, size, model, s, args.epochs, args.batches)
            print(f"{key}: cosine {done[key]['cosine_start']:+.3f} at the start, {done[key]['cosine_mean']:+.3f} over "
                  f"{args.epochs} epochs ({time.time() - start:.0f}s)", flush=True)
            hald.save_atomic(json.dumps(done, indent=1), RESULTS)


if __name__ == "__main__":
    main()
