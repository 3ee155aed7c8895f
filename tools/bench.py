"""How close do hald.py's epochs and relabel come to the speed of the model itself?

    python tools/bench.py                                   # CIFAR-style ResNet-18, 32 px, batch 16, CPU
    python tools/bench.py --model resnet18 --image-size 224 --device cuda --batch-size 128
    python tools/bench.py --val-jpegs 2000                  # also the validation path on synthetic JPEGs

Everything is measured in one process on synthetic images, after a warm-up, with CUDA synchronised
before every clock read. What is compared (the ceiling and an epoch, teacher forward and relabel)
runs in turns, one of each per round, so that both sides of a ratio see the same load; a ratio is the
median of the per-round ratios, with their spread. Prints a table and writes bench.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

ROOT = Path(__file__).resolve().parent.parent
T = 20.0  # temperature of the synthetic soft labels and of the soft loss
RATIO_LIMIT = 1.1  # a ratio that cannot exceed 1, measured above this, is a broken measurement (noise stays below)
VAL_IMAGES = 50_000  # ImageNet-1K's validation set
VAL_PASSES = 15 + 5_000 / VAL_IMAGES  # the student's evaluations (every 20 of 300 epochs) and the teacher check's 5,000-image sample
sys.path.insert(0, str(ROOT))
import hald  # noqa: E402


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over repeats, after warm-up."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_rounds(fns: dict, device, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each fn per round, the fns run in turns (one call of each per round), so that each
    round's times see the same state of the machine: load that comes and goes moves them together."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device, 1, warmup=0))
    return times


def bounded_ratio(ceiling: list[float], work: list[float], limit: float = RATIO_LIMIT) -> tuple[float, list[float], bool]:
    """Per-round ceiling / work seconds (work's img/s over the ceiling's; work does all the ceiling does
    and more, so at most 1): the median, [min, max], and whether the median is above limit, where the
    load changed between the two within the rounds and the figure says nothing about the code."""
    ratios = [c / w for c, w in zip(ceiling, work)]
    median = statistics.median(ratios)
    return median, [min(ratios), max(ratios)], median > limit


def ratio_keys(key: str, ceiling: list[float], work: list[float], broken: list[str]) -> dict:
    """key: the median per-round ratio, or None with a line in broken; key_spread: [min, max]."""
    median, spread, bad = bounded_ratio(ceiling, work)
    if bad:
        broken.append(f"{key}: median per-round ratio {median:.2f} (rounds {spread[0]:.2f} to {spread[1]:.2f}) is above "
                      f"{RATIO_LIMIT} and cannot exceed 1: the machine's load changed within the rounds; rerun")
    return {key: None if bad else median, f"{key}_spread": spread}


def naive_replay(images_u8, cache, k, size):
    """The authors' way: crop, resize and flip image by image in Python, stack, then CutMix."""
    s, e = cache.batches[k]
    crops = []
    for i in range(s, e):
        image = hald.normalize(images_u8[cache.index[i].long()][None])[0]
        H, W = image.shape[-2:]
        top, left, h, w = (cache.boxes[i] * torch.tensor([H, W, H, W], device=image.device)).round().int().tolist()
        crop = TF.resized_crop(image, top, left, h, w, [size, size], antialias=False)
        crops.append(TF.hflip(crop) if cache.flips[i] else crop)
    x = torch.stack(crops)
    y0, y1, x0, x1 = cache.cut[k].tolist()
    x[:, :, y0:y1, x0:x1] = x[cache.partner[s:e].long()][:, :, y0:y1, x0:x1]
    return x


def replay_vs_naive(images, cache, size: int, device, repeats: int) -> tuple[float, float]:
    """img/s of our batched replay and of the per-image loop over the same stored batches, timed in turns."""
    t = timed_rounds({"ours": lambda: [cache.batch(k, images) for k in range(len(cache))],
                      "naive": lambda: [naive_replay(images, cache, k, size) for k in range(len(cache))]}, device, max(repeats, 5))
    return len(images) / statistics.median(t["ours"]), len(images) / statistics.median(t["naive"])


def build_cache(teacher, images, batch_size: int):
    """A soft-label cache of one pass over the images: T 20, CutMix, a train-mode teacher, full fp16 labels."""
    return hald.SoftLabelCache.build(teacher, images, size=images.shape[-1], crops_per_image=1, batch_size=batch_size, temperature=T,
                                     gen=torch.Generator().manual_seed(0), log=lambda *_: None)


def replay_at_size(size: int, n: int, classes: int, batch_size: int, device, repeats: int) -> dict:
    """Replay vs per-image loop alone at another image size (a small ConvNet labels the cache)."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    teacher = hald.build_model("convnet8", classes, size).to(device)
    cache = build_cache(teacher, images, batch_size).to(device)
    ours, naive = replay_vs_naive(images, cache, size, device, repeats)
    return {"replay_ips": ours, "naive_replay_ips": naive, "replay_speedup_vs_naive": ours / naive}


def graphed(step, device):
    """step captured in one CUDA graph (after warm-up on a side stream, as PyTorch's whole-network
    capture recipe); on the CPU step itself, run eagerly."""
    if device.type != "cuda":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def full_batches(cache, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and first rows of the stored batches of full size, on the device."""
    full = [k for k, (s, e) in enumerate(cache.batches) if e - s == cache.batch_size]
    return torch.tensor(full, device=device), torch.tensor([cache.batches[k][0] for k in full], device=device)


def replay_on_device(cache, images, full, k: torch.Tensor):
    """cache.batch's crops and probabilities for the k-th full batch, k a (1,) device tensor: no host
    sync (index_select with device tensors, never a 0-dim tensor as an index), so it can be captured."""
    ids, starts = full
    rows = starts.index_select(0, k) + torch.arange(cache.batch_size, device=k.device)  # (B,)
    box = cache.cut.index_select(0, ids.index_select(0, k))[0].long()
    x = hald.replay(images, cache.index.index_select(0, rows).long(), cache.boxes.index_select(0, rows),
                    cache.flips.index_select(0, rows), cache.partner.index_select(0, rows).long(), box, cache.size)
    return x, cache.probs.index_select(0, rows).float()


def whole_step_graph(model_name: str, images, cache, classes: int, device, repeats: int, broken: list[str]) -> dict:
    """Experiment, the next step for batch 16 on a GPU: a whole soft step (replay, forward, loss,
    backward, capturable fused AdamW with a tensor LR) in one CUDA graph, the stored batch picked
    on the device by a step counter, against the same graph around a pre-built batch (its ceiling),
    the two in turns. Full batches only (one shape, one graph). On the CPU both run eagerly: this
    checks the step, the timing means nothing there."""
    B, S, cuda = cache.batch_size, cache.size, device.type == "cuda"
    full = full_batches(cache, device)
    steps = len(full[0])  # full batches, one graph replay each

    def make_step(replayed: bool):
        torch.manual_seed(0)
        model = hald.build_model(model_name, classes, S).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=device) if cuda else 1e-3, fused=cuda, capturable=cuda)
        step_no = torch.zeros(1, dtype=torch.long, device=device)
        x_fixed, probs_fixed = hald.normalize(images[:B]), cache.probs[:B].float()

        def step():
            if replayed:
                x, probs = replay_on_device(cache, images, full, step_no.remainder(steps))  # (1,): no host sync
            else:
                x, probs = x_fixed, probs_fixed
            opt.zero_grad(set_to_none=True)  # under capture: the backward writes fresh gradients at every replay
            with hald.autocast(device):
                loss = hald.soft_loss(model(hald.model_layout(x)), probs, T)
            loss.backward()
            opt.step()
            step_no.add_(1)

        step = graphed(step, device)
        return lambda: [step() for _ in range(steps)]

    t = timed_rounds({"model_step": make_step(False), "soft_epoch": make_step(True)}, device, max(repeats, 3))
    out = {f"whole_graph_{k}_ips": steps * B / statistics.median(v) for k, v in t.items()}
    return out | ratio_keys("efficiency_soft_whole_graph", t["model_step"], t["soft_epoch"], broken)


def val_set(images, labels) -> dict:
    """An in-memory validation set as hald.evaluate reads it (the dict of hald.load_val)."""
    return {"images": images, "labels": labels}


def write_val_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """count synthetic 500 x 375 JPEGs (ImageNet's most common size) at quality 90: random colour
    fields with 4-px detail and mild noise, about 115 KB each, near ImageNet's mean file size."""
    from PIL import Image

    gen, paths = torch.Generator().manual_seed(seed), []
    for start in range(0, count, 32):
        low = torch.rand((min(32, count - start), 3, 96, 128), generator=gen) * 255
        x = F.interpolate(low, (375, 500), mode="bicubic", align_corners=False)
        for image in x.add_(torch.randn(x.shape, generator=gen), alpha=10).clamp_(0, 255).to(torch.uint8):
            paths.append(folder / f"{len(paths):05d}.jpg")
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1], quality=90)
    return paths


def val_path(paths: list[Path], size: int, model, device, eval_images: int, rounds: int) -> dict:
    """The validation path on JPEGs, at hald's ImageNet transform (short side to size * 256 / 224, centre
    crop): decode rates on one thread and on hald.decode_images' threads, in turns; then one evaluation
    decoding every image again (what hald.py did with sets over its 2 GiB cap: decode + normalize +
    forward) against the set kept decoded as uint8 (normalize + forward), in turns, on the first
    eval_images and scaled to the set and to ImageNet's 50,000."""
    one = lambda: [hald.decode_image(p, size, center_crop=True) for p in paths]  # noqa: E731
    threads = lambda: hald.decode_images(paths, size, center_crop=True)  # noqa: E731
    t = timed_rounds({"one_thread": one, "threads": threads}, device, rounds, warmup=1)
    sub, batch = paths[:eval_images], 500  # hald.evaluate's batch
    m, labels = len(sub), torch.zeros(len(sub), dtype=torch.long)
    kept = val_set(hald.decode_images(sub, size, center_crop=True).to(device), labels)

    def before():  # batch by batch: decode, then hald.evaluate's normalize + forward
        for s in range(0, m, batch):
            hald.evaluate(model, val_set(hald.decode_images(sub[s:s + batch], size, center_crop=True), labels[s:s + batch]), device)

    e = timed_rounds({"before": before, "after": lambda: hald.evaluate(model, kept, device)}, device, rounds, warmup=1)
    per_image = {k: statistics.median(v) / m for k, v in e.items()}
    return {"val_decode_ips_one_thread": len(paths) / statistics.median(t["one_thread"]),
            "val_decode_ips": len(paths) / statistics.median(t["threads"]), "val_decode_threads": min(8, os.cpu_count() or 1),  # as hald.decode_images
            "val_eval_images": m,
            **{f"val_eval_seconds_{k}": v * len(paths) for k, v in per_image.items()},
            **{f"val_eval_seconds_{k}_50k": v * VAL_IMAGES for k, v in per_image.items()},
            "val_eval_speedup": per_image["before"] / per_image["after"]}


def projection(ips: dict, decode_ips) -> dict:
    """Minutes of the authors' ImageNet-1K IPC 10 recipe at the measured rates, term by term: 150 soft and
    150 hard epochs of 10,000 images, 100,000 crops relabelled, VAL_PASSES evaluations of the 50,000
    validation images and their one-time decode (None, and left out of the total, when not measured)."""
    seconds = {"soft": 1.5e6 / ips["soft_epoch_ips"], "hard": 1.5e6 / ips["hard_epoch_ips"], "relabel": 1e5 / ips["relabel_ips"],
               "eval": VAL_PASSES * VAL_IMAGES / ips["eval_ips"], "val_decode": VAL_IMAGES / decode_ips if decode_ips else None}
    out = {f"projected_minutes_{k}": None if v is None else v / 60 for k, v in seconds.items()}
    return out | {"projected_imagenet_ipc10_minutes": sum(v for v in out.values() if v is not None)}


def show(k, v) -> str:
    """One table line: floats to 3 decimals, a spread as min to max."""
    if isinstance(v, float):
        return f"{k:<36} {v:,.3f}"
    if isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        return f"{k:<36} {v[0]:,.3f} to {v[1]:,.3f}"
    return f"{k:<36} {v}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (at least 3: the ratios report a spread)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student, as hald.py --compile")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA graphs for the student, as hald.py --cuda-graph")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="CUDA arithmetic, as hald.py --precision")
    parser.add_argument("--replay-sizes", default="64,128,224", help="also time replay vs the per-image loop alone at these image sizes")
    parser.add_argument("--profile", action="store_true", help="also print where a soft and a hard epoch spend their time")
    parser.add_argument("--whole-step-graph", action="store_true", help="experiment: also time a soft epoch whose whole step is one CUDA graph")
    parser.add_argument("--val-jpegs", type=int, default=0, help="also time the validation path on this many synthetic 500 x 375 JPEGs (0 = skip)")
    parser.add_argument("--val-size", type=int, default=224, help="decode size of the JPEGs (ImageNet's resize + centre crop) and input size of their eval model")
    parser.add_argument("--val-model", default="", help="eval model on the JPEGs (default: --model)")
    parser.add_argument("--val-eval-images", type=int, default=100, help="evaluate on the first this many JPEGs, scaled to the set (keeps a CPU run at 224 px short)")
    parser.add_argument("--out", default=str(ROOT / "bench.json"))
    args = parser.parse_args(argv)
    device = hald.pick_device(args.device)
    B, S, C = args.batch_size, args.image_size, args.classes
    rounds = max(args.repeats, 3)
    torch.manual_seed(0)
    n = C * args.ipc
    images = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, device=device)
    labels = torch.arange(C, device=device).repeat_interleave(args.ipc)
    teacher = hald.build_model(args.model, C, S).to(device).eval()
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    student = hald.Config(model=args.model, lr=1e-3, compile=args.compile, cuda_graph=args.cuda_graph, precision=args.precision)
    model, net, opt = hald.build_student(student, C, S, device, 1)  # net: what the ceiling and the epochs both run
    cache = build_cache(teacher, images, B).to(device)

    x_fixed = hald.normalize(images[:B])
    x_fixed = hald.model_layout(x_fixed)
    probs_fixed = torch.softmax(torch.randn(B, C, device=device), 1)

    # the ceilings run pre-built batches of the epoch's own sizes (100 images at batch 16: 6 x 16 + 4),
    # so that a smaller last batch costs the ceiling what it costs the epoch
    batch_sizes = [e - s for s, e in cache.batches]

    def model_steps():  # the ceiling: forward + backward + step on pre-built batches, one epoch's worth
        for b in batch_sizes:
            with hald.autocast(device, args.precision):
                loss = hald.soft_loss(net(x_fixed[:b]), probs_fixed[:b], T)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    gens, pool = hald.make_generators(0), []
    epoch = {p: (lambda p=p: hald.run_epoch(p, net, opt, images, labels, C, gens, cache, pool, batch_size=B, temperature=T,
                                                precision=args.precision)) for p in ("soft", "hard")}

    @torch.no_grad()
    def teacher_forward():
        hald.bn_train_mode(teacher, True)
        for b in batch_sizes:
            with hald.autocast(device, args.precision):
                teacher(x_fixed[:b])
        teacher.eval()

    relabel = lambda: build_cache(teacher, images, B)  # noqa: E731
    seconds = timed_rounds({"model_step": model_steps, "soft_epoch": epoch["soft"], "hard_epoch": epoch["hard"],
                            "teacher_forward": teacher_forward, "relabel": relabel}, device, rounds)
    ips = {f"{k}_ips": n / statistics.median(v) for k, v in seconds.items()}  # every timing covers the n images once
    ips["replay_ips"], ips["naive_replay_ips"] = replay_vs_naive(images, cache, S, device, args.repeats)
    # evaluation: normalize + forward in eval mode over the n images kept decoded, in hald.evaluate's batches of 500
    ips["eval_ips"] = n / timed(lambda: hald.evaluate(model, val_set(images, labels), device), device, args.repeats, warmup=1)
    broken = []
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "model": args.model, "batch_size": B, "image_size": S, "compile": args.compile, "cuda_graph": args.cuda_graph, "precision": args.precision,
              "torch": torch.__version__, "rounds": rounds, **ips,
              **ratio_keys("efficiency_soft", seconds["model_step"], seconds["soft_epoch"], broken),
              **ratio_keys("efficiency_hard", seconds["model_step"], seconds["hard_epoch"], broken),
              **ratio_keys("relabel_vs_teacher_forward", seconds["teacher_forward"], seconds["relabel"], broken),
              "replay_speedup_vs_naive": ips["replay_ips"] / ips["naive_replay_ips"]}
    if args.whole_step_graph:  # an experiment on a path hald.py does not have yet: a failure is recorded, not fatal
        try:
            result.update(whole_step_graph(args.model, images, cache, C, device, args.repeats, broken))
        except Exception as e:
            result["whole_step_graph_error"] = f"{type(e).__name__}: {e}"
    if args.val_jpegs:
        val_model = hald.build_model(args.val_model or args.model, C, args.val_size).to(device)
        if device.type == "cuda":
            val_model = val_model.to(memory_format=torch.channels_last)
        with tempfile.TemporaryDirectory() as folder:
            paths = write_val_jpegs(Path(folder), args.val_jpegs)
            result.update({"val_jpegs": len(paths), "val_jpeg_kb": sum(p.stat().st_size for p in paths) / len(paths) / 1e3,
                           "val_size": args.val_size, "val_eval_model": args.val_model or args.model})
            result.update(val_path(paths, args.val_size, val_model, device, args.val_eval_images, rounds))
    result.update(projection(ips, result.get("val_decode_ips")))
    result["broken"] = broken
    other_sizes = [int(s) for s in args.replay_sizes.split(",") if s and int(s) != S]
    result["replay_by_image_size"] = {s: replay_at_size(s, n, C, B, device, args.repeats) for s in other_sizes}
    for k, v in result.items():
        if k == "replay_by_image_size":
            for s, r in v.items():
                print(f"replay at {s} px{'':<22} {r['replay_ips']:,.0f} vs per-image {r['naive_replay_ips']:,.0f} img/s: "
                      f"{r['replay_speedup_vs_naive']:.2f}x")
        elif k != "broken":
            print(show(k, v))
    if result["projected_minutes_val_decode"] is None:
        print("note: the projection leaves out the one-time decode of the validation JPEGs: --val-jpegs N measures it")
    for line in broken:
        print(f"WARNING: broken measurement, not written as a result: {line}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.profile:  # operator self-times over one soft and one hard epoch: model vs data path vs optimizer
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            epoch["soft"](), epoch["hard"]()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=45))
    return result


if __name__ == "__main__":
    main()
