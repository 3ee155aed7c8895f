"""Tests of hald.py: properties of the pure pieces, batched vs per-image equivalence, and
end-to-end runs of the CLI on tiny generated data on the CPU. Run: make test."""
import ast
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import hald

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- schedule
@given(epochs=st.integers(1, 400), soft_frac=st.floats(0, 1), n=st.integers(1, 12),
       spec=st.sampled_from(hald.PRESETS))
def test_every_preset_covers_the_epochs(epochs, soft_frac, n, spec):
    soft = round(epochs * soft_frac)
    plan = hald.build_schedule(spec, epochs, soft, n)
    assert sum(count for _, count in plan) == epochs
    assert all(count > 0 and phase in ("soft", "hard", "hybrid") for phase, count in plan)


@given(epochs=st.integers(1, 400), soft_frac=st.floats(0, 1))
def test_shs_splits_the_soft_epochs_around_the_hard_phase(epochs, soft_frac):
    soft = round(epochs * soft_frac)
    plan = hald.build_schedule("shs", epochs, soft, 1)
    expected = [("soft", soft // 2), ("hard", epochs - soft), ("soft", soft - soft // 2)]
    assert plan == [(p, c) for p, c in expected if c > 0]
    assert hald.build_schedule("shs", 300, 150, 10) == [("soft", 75), ("hard", 150), ("soft", 75)]  # the authors'
    auto = {model: hald.resolve_settings(hald.Config(model=model), 10).soft_epochs for model in ("convnet_bn64", "resnet18", "convnet")}
    assert hald.build_schedule("shs", 300, auto["convnet_bn64"], 10) == [("soft", 120), ("hard", 60), ("soft", 120)]
    assert auto["resnet18"] == auto["convnet"] == 150  # other students: the authors'


@given(epochs=st.integers(1, 200), n=st.integers(1, 10), start=st.sampled_from(["hard", "soft"]),
       double=st.booleans())
def test_alternating_blocks(epochs, n, start, double):
    plan = hald.build_schedule(f"alt-{start}-{'2n' if double else 'n'}", epochs, 0, n)
    block = n * (2 if double else 1)
    assert all(count == block for _, count in plan[:-1]) and 0 < plan[-1][1] <= block
    other = "soft" if start == "hard" else "hard"
    assert [phase for phase, _ in plan] == [start if i % 2 == 0 else other for i in range(len(plan))]


def test_explicit_schedule_and_bad_specs():
    assert hald.build_schedule("soft:75,hard:150,soft:75", 300, 0, 1) == [("soft", 75), ("hard", 150), ("soft", 75)]
    for bad in ["soft:75,hard:100", "soft:10,warm:290", "shs2", "", "soft:-3", "alt-hard-3n", "hard:300,"]:
        with pytest.raises(hald.HaldError):
            hald.build_schedule(bad, 300, 150, 1)
    with pytest.raises(hald.HaldError, match="soft_epochs 11 must be between 0 and epochs 10"):
        hald.build_schedule("shs", 10, 11, 1)
    assert hald.build_schedule("shs", 300) == [("soft", 75), ("hard", 150), ("soft", 75)]  # soft_epochs None: the authors' half
    assert issubclass(hald.HaldError, ValueError)


def test_lr_schedule_ends_near_half_with_eta_2():
    assert hald.lr_at(0, 1e-3, 300, 2) == pytest.approx(1e-3)
    assert hald.lr_at(300, 1e-3, 300, 2) == pytest.approx(0.5e-3)
    assert hald.lr_at(300, 1e-3, 300, 1) == pytest.approx(0, abs=1e-12)


# ------------------------------------------------------------------------------- crops
@given(n=st.integers(1, 64), h=st.integers(4, 64), w=st.integers(4, 64), seed=st.integers(0, 2**31),
       smin=st.sampled_from([0.08, 0.35, 1.0]))
def test_crop_boxes_stay_inside_and_in_range(n, h, w, seed, smin):
    boxes, flips = hald.sample_crops(n, h, w, torch.Generator().manual_seed(seed), scale=(smin, 1.0))
    top, left, bh, bw = (boxes * torch.tensor([h, w, h, w])).round().unbind(1)  # back to pixels
    assert torch.allclose(boxes * torch.tensor([h, w, h, w]), torch.stack([top, left, bh, bw], 1), atol=1e-3)
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    # torchvision rounds w and h to integers: the real-valued draw lies within half a pixel
    fallback = (bh == h) | (bw == w)
    ok_ratio = ((bw + 0.5) / (bh - 0.5).clamp_min(1e-9) >= 3 / 4 - 1e-6) & ((bw - 0.5) / (bh + 0.5) <= 4 / 3 + 1e-6)
    ok_area = (bw + 0.5) * (bh + 0.5) >= smin * h * w - 1e-6
    assert (fallback | (ok_ratio & ok_area)).all()
    assert flips.dtype == torch.bool and flips.shape == (n,)


def test_same_seed_same_crops():
    a = hald.sample_crops(100, 32, 32, torch.Generator().manual_seed(5))
    b = hald.sample_crops(100, 32, 32, torch.Generator().manual_seed(5))
    c = hald.sample_crops(100, 32, 32, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_crop_distribution_matches_torchvision():
    """Fast sampler vs torchvision's own get_params: same mean area, aspect and fallback use."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    size, n = 32, 4000
    ours, _ = hald.sample_crops(n, size, size, torch.Generator().manual_seed(0))
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, size, size), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float) / size
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 0] + b[:, 2] / 2):
        a, r = stat(ours), stat(ref)
        assert abs(a.mean() - r.mean()) < 4 * math.hypot(a.std(), r.std()) / math.sqrt(n)


@given(b=st.integers(1, 6), h=st.integers(4, 40), w=st.integers(4, 40), size=st.integers(4, 40), seed=st.integers(0, 10**6))
def test_batched_crop_equals_per_image_resized_crop(b, h, w, size, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g)
    boxes, flips = hald.sample_crops(b, h, w, g)
    fast = hald.crop_resize(images, boxes, flips, size)
    for i in range(b):
        top, left, bh, bw = (boxes[i] * torch.tensor([h, w, h, w])).round().int().tolist()
        ref = TF.resized_crop(images[i], top, left, bh, bw, [size, size], antialias=False)
        ref = TF.hflip(ref) if flips[i] else ref
        torch.testing.assert_close(fast[i], ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ CutMix
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))  # two code paths
@given(h=st.integers(2, 64), w=st.integers(2, 64), seed=st.integers(0, 10**6))
def test_cutmix_paste_is_exact_and_lambda_is_the_kept_area(device, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    box = hald.sample_cutmix_boxes(1, h, w, g)[0]
    y0, y1, x0, x1 = box.tolist()
    assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    images = torch.stack([torch.zeros(3, h, w), torch.ones(3, h, w) * 2, torch.ones(3, h, w) * 5]).to(device)
    partner = torch.tensor([1, 2, 0], device=device)
    batch = images.clone()
    mixed = hald.paste_cutmix_(batch, partner, box)
    assert mixed is batch  # in place, as the underscore says
    inside = torch.zeros(h, w, dtype=torch.bool, device=device)
    inside[y0:y1, x0:x1] = True
    for i in range(3):
        assert torch.equal(mixed[i][:, inside], images[partner[i]][:, inside])
        assert torch.equal(mixed[i][:, ~inside], images[i][:, ~inside])
    lam = hald.cutmix_lambda(box, h, w)
    assert lam.item() == pytest.approx(1 - inside.float().mean().item())


@given(b=st.integers(2, 16), c=st.integers(2, 50), smoothing=st.floats(0, 0.95), lam=st.floats(0, 1), seed=st.integers(0, 99))
def test_mixed_targets_sum_to_one(b, c, smoothing, lam, seed):
    labels = torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))
    t = hald.mixed_targets(labels, c, smoothing, torch.arange(b - 1, -1, -1), lam)
    torch.testing.assert_close(t.sum(1), torch.ones(b))
    assert (t >= 0).all()


# ------------------------------------------------------------------------------ losses
@given(b=st.integers(1, 8), c=st.integers(2, 20), t=st.floats(0.5, 30), seed=st.integers(0, 10**6))
def test_soft_loss_is_nonnegative_and_zero_at_the_teacher(b, c, t, seed):
    g = torch.Generator().manual_seed(seed)
    teacher, student = torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3
    probs = F.softmax(teacher / t, 1)
    assert hald.soft_loss(student, probs, t) >= -1e-6
    assert hald.soft_loss(teacher, probs, t).abs() < 1e-5


def test_hard_loss_without_smoothing_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(7, 5, generator=g), torch.randint(0, 5, (7,), generator=g)
    targets = hald.mixed_targets(labels, 5, 0.0, None, 1.0)
    torch.testing.assert_close(hald.hard_loss(logits, targets), F.cross_entropy(logits, labels))


def test_smoothed_targets_have_the_authors_values():
    t = hald.smooth_one_hot(torch.tensor([2]), 1000, 0.8)
    assert t[0, 2].item() == pytest.approx(1 - 0.8 + 0.8 / 1000) and t[0, 0].item() == pytest.approx(0.8 / 1000)


@pytest.mark.parametrize("given, classes, resolved", [
    ((-1.0, -1.0, -1, "convnet_bn"), 10, (0.1, 4.0, 8)), ((-1.0, -1.0, -1, "resnet18"), 200, (0.1, 4.0, 5)),
    ((-1.0, -1.0, -1, "convnet_bn"), 201, (0.8, 20.0, 8)), ((-1.0, -1.0, 4, "resnet18"), 1000, (0.8, 20.0, 4)),
    ((0.8, 20.0, 4, "convnet_bn"), 10, (0.8, 20.0, 4)), ((0.0, -1.0, 0, "convnet"), 10, (0.0, 4.0, 0)), ((0.3, -1.0, 0, "convnet"), 201, (0.3, 20.0, 0))])
def test_auto_settings_fill_only_what_is_left_to_auto(given, classes, resolved):
    """-1 is replaced (smoothing 0.1 and T 4 up to 200 classes, the largest count measured, the authors' 0.8 and T 20
    above; soft 4/5 of the epochs for BatchNorm ConvNets, else half) and every explicit value kept, 0 included."""
    smoothing, temperature, soft_epochs, model = given
    cfg = hald.resolve_settings(hald.Config(epochs=10, label_smoothing=smoothing, temperature=temperature, soft_epochs=soft_epochs,
                                            model=model), classes)
    assert (cfg.label_smoothing, cfg.temperature, cfg.soft_epochs) == resolved


@pytest.mark.parametrize("classes, size, model, ipc, given, resolved", [
    (100, 32, "resnet18", 1, {}, (5e-4, 2.0)), (100, 32, "resnet18", 10, {}, (1e-3, 2.0)), (100, 32, "resnet18", 50, {}, (1e-3, 1.0)),
    (100, 32, "resnet18", 20, {}, (1e-3, 2.0)), (100, 32, "resnet101", 20, {}, (5e-4, 1.0)), (100, 64, "resnet18", 1, {}, (1e-3, 2.0)),
    (1000, 224, "resnet101", 1, {}, (3.5e-3, 2.0)), (1000, 224, "resnet101", 60, {}, (5e-4, 1.0)), (1000, 64, "mobilenet_v2", 1, {}, (1e-3, 2.0)),
    (200, 64, "resnet50", 10, {}, (5e-4, 2.0)), (200, 32, "resnet50", 50, {}, (5e-4, 1.0)), (200, 32, "convnet_bn64", 10, {}, (1e-3, 2.0)),
    (1000, 224, "convnet_bn", 49, {}, (1e-3, 2.0)), (1000, 224, "convnet_bn", 50, {}, (1e-3, 1.0)), (10, 224, "resnet50", 1, {}, (1e-3, 2.0)),
    (100, 32, "resnet18", 1, {"lr": 2e-3}, (2e-3, 2.0)), (100, 32, "resnet50", 1, {"eta": 2.0}, (1e-3, 2.0))])
def test_auto_lr_and_eta_are_the_authors_row_for_their_dataset_and_student(classes, size, model, ipc, given, resolved):
    """1,000 classes: ImageNet-1K, 200: Tiny-ImageNet, 100 at 32 px: CIFAR-100, with the row from the largest IPC at or
    below --ipc (below the first: the first); anything else, 100 classes at 64 px and 10 without --recipe included:
    1e-3 and eta 2 (1 from IPC 50). A given value wins."""
    cfg = hald.resolve_settings(hald.Config(model=model, ipc=ipc, **given), classes, size)
    assert (cfg.lr, cfg.eta) == resolved


def test_defaults_and_evidence_keep_their_lr_eta_and_fingerprints(monkeypatch):
    """The demo and every setting of the committed evidence (10 and 200 classes at 32 px, IPC 10, hald.py's ConvNets
    and ResNet-18) resolve to lr 1e-3 and eta 2, as before the auto values; a resolved run keeps the fingerprint it had
    then (hashes from hald.py before --recipe), so an unfinished run still resumes."""
    demo = hald.with_demo_defaults(hald.parse_config([]))
    assert (lambda c: (c.lr, c.eta))(hald.resolve_settings(demo, 10, 32)) == (1e-3, 2.0)
    for classes in (10, 200):
        for model in ("convnet", "convnet_bn", "convnet_bn64", "convnet64", "resnet18"):
            cfg = hald.resolve_settings(hald.Config(model=model), classes, 32)
            assert (cfg.lr, cfg.eta, cfg.normalize) == (1e-3, 2.0, "imagenet")
    before = {("convnet_bn", 10): "6ec1dadea879d5bc", ("resnet18", 10): "f2f337ac1e4bc2aa", ("convnet_bn64", 200): "f79cae98c3f986a9"}
    for (model, classes), fingerprint in before.items():
        cfg = hald.resolve_settings(hald.Config(data="d", val="v", teacher="t", model=model, phase_switch="keep"), classes, 32)
        assert hald.fingerprint(hald.run_settings(cfg))[:16] == fingerprint  # AdamW kept across phases, as then


def test_recipe_applies_the_authors_dataset_settings():
    """--recipe names the dataset (the 10-class subsets have no count of their own): their normalisation, smoothing 0.8,
    T 20 and row; every value given wins; a class count that is not the recipe's is refused."""
    cfg = hald.resolve_settings(hald.Config(recipe="imagenette", model="resnet18"), 10, 224)
    assert (cfg.label_smoothing, cfg.temperature, cfg.normalize, cfg.lr, cfg.eta) == (0.8, 20.0, "imagenet", 5e-4, 2.0)
    cfg = hald.resolve_settings(hald.Config(recipe="cifar100", model="resnet18", ipc=1), 100, 64)  # the recipe, not the size
    assert (cfg.normalize, cfg.lr, cfg.label_smoothing) == ("cifar100", 5e-4, 0.8)
    cfg = hald.resolve_settings(hald.Config(recipe="cifar100", normalize="cifar10", label_smoothing=0.1, lr=2e-3, ipc=50), 100, 32)
    assert (cfg.normalize, cfg.label_smoothing, cfg.temperature, cfg.lr, cfg.eta) == ("cifar10", 0.1, 20.0, 2e-3, 1.0)
    with pytest.raises(hald.HaldError, match="--recipe imagenet1k is for ImageNet-1K's 1,000 classes but --data has 10"):
        hald.resolve_settings(hald.Config(recipe="imagenet1k"), 10, 224)
    assert hald.auto_lr_eta(100, 32, "resnet18", 20)[2] == "the authors' CIFAR-100 resnet18 row from IPC 10"


def test_recipe_on_the_command_line(tmp_path, capsys, monkeypatch):
    """The start-up line names the rule of each auto value; an unknown --recipe and one whose class count is not the data's
    are refused in one line before any image is decoded, with nothing written."""
    data, val = write_folder(tmp_path / "data", 10, 1, 16, 0), write_folder(tmp_path / "val", 10, 1, 16, 1)
    args = ["--data", str(data), "--val", str(val), "--ipc", "1", "--schedule", "hard", "--epochs", "1", "--batch-size", "5",
            "--model", "resnet18", "--drift-crops", "0", "--out", str(tmp_path / "out")]
    assert hald.main([*args, "--recipe", "imagenette"]) == 0
    out = capsys.readouterr().out
    assert "| label smoothing 0.8 (recipe imagenette)\n" in out
    assert "  lr 0.0005, eta 2 (recipe imagenette: the authors' ImageNette resnet18 row from IPC 1)\n" in out
    config = json.loads((tmp_path / "out" / "summary.json").read_text())["config"]
    assert (config["recipe"], config["lr"], config["eta"], config["label_smoothing"]) == ("imagenette", 5e-4, 2.0, 0.8)
    monkeypatch.setattr(hald, "decode_image", None)  # a call fails the test
    for recipe, message in (("imagenet", "--recipe must be one of none, imagenet1k, tiny-imagenet, cifar100, imagenette, "
                             "imagewoof, got 'imagenet'"), ("cifar100", "--recipe cifar100 is for CIFAR-100's 100 classes but --data has 10")):
        assert hald.main([*args[:-1], str(tmp_path / recipe), "--recipe", recipe]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hald: error:") and message in err and "\n" not in err
        assert not (tmp_path / recipe).exists()


def test_hybrid_loss_terms():
    g = torch.Generator().manual_seed(0)
    s, h, probs = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), F.softmax(torch.randn(4, 6, generator=g), 1)
    targets = hald.smooth_one_hot(torch.tensor([0, 1, 2, 3]), 6, 0.1)
    torch.testing.assert_close(hald.hybrid_loss(s, probs, 4.0, h, targets, 0.0), hald.soft_loss(s, probs, 4.0))
    both = hald.hybrid_loss(s, probs, 4.0, h, targets, 0.5, t2=True)
    torch.testing.assert_close(both, 16 * hald.soft_loss(s, probs, 4.0) + 0.5 * hald.hard_loss(h, targets))


# --------------------------------------------------------------------- soft-label cache
def tiny_cache(passes=3, n=10, batch=4, cutmix=True, mode="train"):
    torch.manual_seed(0)
    teacher = hald.build_model("convnet_bn8", 5, 16)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    cache = hald.SoftLabelCache.build(teacher, images, size=16, crops_per_image=passes, batch_size=batch, temperature=4.0,
                                      gen=torch.Generator().manual_seed(1), cutmix=cutmix, teacher_mode=mode, log=lambda *_: None)
    return cache, teacher, images


TINY_HEADER = dict(format=hald.CACHE_FORMAT, num_images=10, passes=3, image_size=16, batch_size=4, classes=list("abcde"), cutmix=True,
                   fingerprint="f" * 64)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cache_holds_exactly_slc_labels_and_replays_to_the_same_labels(mode):
    cache, teacher, images = tiny_cache(mode=mode)
    assert len(cache.probs) == 3 * 10 and torch.equal(torch.bincount(cache.index.long(), minlength=10), torch.full((10,), 3))
    torch.testing.assert_close(cache.probs.float().sum(1), torch.ones(30), atol=3e-3, rtol=0)
    assert [e - s for s, e in cache.batches] == [4, 4, 2] * 3
    hald.bn_train_mode(teacher, mode == "train")
    with torch.no_grad():
        for k in range(len(cache)):
            x, probs, _, _, _ = cache.batch(k, images)
            torch.testing.assert_close(F.softmax(teacher(x) / 4.0, 1), probs, atol=2e-3, rtol=0)


def test_relabel_leaves_the_teacher_unchanged():
    """Train-mode BatchNorm updates running statistics; relabel must restore them, since the
    drift diagnostics use the teacher in eval mode afterwards."""
    torch.manual_seed(0)
    teacher = hald.build_model("convnet_bn8", 5, 16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    hald.SoftLabelCache.build(teacher, images, size=16, crops_per_image=2, batch_size=4, temperature=4.0, gen=torch.Generator().manual_seed(0),
                              log=lambda *_: None)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


@pytest.mark.parametrize("cutmix", [True, False])
def test_cache_round_trip_and_refusals(tmp_path, cutmix):
    cache, _, images = tiny_cache(cutmix=cutmix)
    path, header = tmp_path / "cache.pt", {**TINY_HEADER, "cutmix": cutmix, "temperature": 4.0}
    size = hald.save_cache(cache, hald.compact_labels_(cache), header, path)
    assert size == path.stat().st_size and not list(tmp_path.glob(".*tmp"))
    loaded = hald.load_cache(path, header)
    for name in ("index", "boxes", "flips", "partner", "cut", "probs"):
        assert (getattr(loaded, name) is None) if name == "cut" and not cutmix else torch.equal(getattr(loaded, name), getattr(cache, name))
    assert all(torch.equal(a, b) for k in range(len(cache)) for a, b in zip(loaded.batch(k, images)[:2], cache.batch(k, images)[:2]))
    with pytest.raises(hald.HaldError, match="other settings.*temperature"):
        hald.load_cache(path, {**header, "temperature": 3.0, "fingerprint": "0" * 64})
    path.write_bytes(path.read_bytes()[: size // 2])  # truncated
    with pytest.raises(hald.HaldError, match="cannot load"):
        hald.load_cache(path, header)


def test_cache_with_altered_labels_is_detected(tmp_path):
    cache, _, _ = tiny_cache()
    hald.save_cache(cache, hald.compact_labels_(cache), TINY_HEADER, tmp_path / "c.pt")
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    blob["labels"]["values"][0, 0] += 1
    torch.save(blob, tmp_path / "c.pt")
    with pytest.raises(hald.HaldError, match="corrupted"):
        hald.load_cache(tmp_path / "c.pt", TINY_HEADER)


def test_cache_of_float_images_of_another_size_with_own_statistics():
    """The library use: float images in [0, 1] units (values outside kept), not square, at another size than the
    crops, and the teacher's own mean and std: the stored labels are what the teacher says of the replayed crops."""
    torch.manual_seed(0)
    teacher = hald.build_model("convnet_bn8", 5, 12)
    images = torch.rand(9, 3, 20, 28) * 1.4 - 0.2
    mean, std = hald.NORMALIZATIONS["cifar10"]
    cache = hald.SoftLabelCache.build(teacher, images, size=12, crops_per_image=2, batch_size=3, temperature=2.0, teacher_mode="eval",
                                      gen=torch.Generator().manual_seed(0), mean=mean, std=std, log=lambda *_: None)
    assert [e - s for s, e in cache.batches] == [3] * 6 and cache.probs.shape == (18, 5)
    with torch.no_grad():
        for k in range(len(cache)):
            x, probs, *_ = cache.batch(k, images, mean, std)
            assert x.shape == (3, 3, 12, 12)
            torch.testing.assert_close(F.softmax(teacher(x) / 2.0, 1), probs, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature > 0"), (dict(crops_per_image=0), "crops_per_image >= 1"),
    (dict(teacher_mode="batch"), "teacher_mode train or eval")])
def test_cache_refuses_bad_arguments_in_library_words(kwargs, message):
    args = dict(size=16, crops_per_image=1, batch_size=4, temperature=4.0, gen=torch.Generator()) | kwargs
    with pytest.raises(ValueError, match=message):
        hald.SoftLabelCache.build(hald.build_model("convnet8", 5, 16), torch.zeros(4, 3, 16, 16, dtype=torch.uint8), **args)


def test_cache_refuses_a_teacher_that_returns_probabilities():
    """A teacher ending in a softmax passes the teacher check (the argmax is the same) but would be stored as
    softmax(p / T), near uniform: refused. One ending in a log-softmax returns logits up to a constant, and is kept."""
    torch.manual_seed(0)
    net, images = hald.build_model("convnet8", 5, 16), torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    args = dict(size=16, crops_per_image=1, batch_size=4, temperature=4.0, log=lambda *_: None)
    with pytest.raises(ValueError, match="returns probabilities .* drop its final softmax"):
        hald.SoftLabelCache.build(torch.nn.Sequential(net, torch.nn.Softmax(1)), images, gen=torch.Generator().manual_seed(0), **args)
    logs = hald.SoftLabelCache.build(torch.nn.Sequential(net, torch.nn.LogSoftmax(1)), images, gen=torch.Generator().manual_seed(0), **args)
    plain = hald.SoftLabelCache.build(net, images, gen=torch.Generator().manual_seed(0), **args)
    torch.testing.assert_close(logs.probs.float(), plain.probs.float(), atol=2e-3, rtol=0)


def test_pieces_check_their_inputs():
    """Bad values from a foreign trainer fail loudly, where before they trained silently (smoothing -1 gave targets
    [1.75, -0.25, ...]) or replayed part of the cache (a batch size other than the stored batches')."""
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\), got -1"):
        hald.smooth_one_hot(torch.tensor([0]), 4, -1.0)
    with pytest.raises(ValueError, match=r"soft_loss takes a temperature > 0 .* got 0.0 and \(2, 3\)"):
        hald.soft_loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), 0.0)
    labels = torch.arange(10)  # class indices where targets belong: with a batch of C images they would broadcast and train
    with pytest.raises(ValueError, match=r"hard_loss takes targets \(B, C\) shaped like the logits \(10, 10\), got \(10,\)"):
        hald.hard_loss(torch.zeros(10, 10), labels)
    with pytest.raises(ValueError, match=r"teacher probabilities \(B, C\) shaped like the logits \(10, 10\), got 4.0 and \(10,\)"):
        hald.soft_loss(torch.zeros(10, 10), labels, 4.0)
    cache, _, images = tiny_cache()
    net = hald.build_model("convnet8", 5, 16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gens = {"pool": torch.Generator(), "hard": torch.Generator()}
    for settings in (dict(batch_size=8, temperature=4.0), dict(batch_size=4, temperature=20.0)):  # both the cache's or refused
        with pytest.raises(ValueError, match="the cache holds batches of 4 labelled at T 4 but batch_size is"):
            hald.run_epoch("soft", net, opt, images, torch.zeros(10, dtype=torch.long), 5, gens, cache, [], **settings)
    with pytest.raises(ValueError, match=r"gens must hold the CPU generators 'pool' and 'hard', got \['hard'\]"):
        hald.run_epoch("soft", net, opt, images, torch.zeros(10, dtype=torch.long), 5, {"hard": gens["hard"]}, cache, [], batch_size=4,
                       temperature=4.0)
    with pytest.raises(ValueError, match="pass cache"):
        hald.run_epoch("soft", net, opt, images, torch.zeros(10, dtype=torch.long), 5, gens, batch_size=4)


@given(L=st.integers(1, 20), C=st.integers(2, 40), k_frac=st.floats(0, 1), bits=st.sampled_from([8, 16]),
       t=st.floats(0.5, 30), seed=st.integers(0, 10**6))
def test_label_packing_round_trip(L, C, k_frac, bits, t, seed):
    probs = F.softmax(torch.randn(L, C, generator=torch.Generator().manual_seed(seed)) * 3 / t, 1)
    k = round(k_frac * C)
    back = hald.unpack_labels(hald.pack_labels(probs, k, bits), C)
    assert back.shape == (L, C) and (back >= 0).all()
    if 0 < k < C:
        torch.testing.assert_close(back.sum(1), torch.ones(L), atol=1e-5, rtol=0)
    kept = probs.topk(k, 1).indices if 0 < k < C else torch.arange(C).expand(L, C)
    step = (probs.max(1, keepdim=True).values - probs.min(1, keepdim=True).values) / 255 * 1.01 + 2e-3 if bits == 8 else 1e-3
    assert ((back.gather(1, kept) - probs.gather(1, kept)).abs() <= step).all()
    if k in (0, C) and bits == 16:
        assert torch.equal(back, probs.half().float())


def test_topk_storage_at_1000_classes_is_under_a_tenth():
    probs = F.softmax(torch.randn(64, 1000), 1)
    full = sum(v.numel() * v.element_size() for v in hald.pack_labels(probs).values())
    top = sum(v.numel() * v.element_size() for v in hald.pack_labels(probs, 10).values())
    assert top <= 0.1 * full


def test_soft_pool_shows_every_batch_once_per_pass():
    pool, g, seen = [], torch.Generator().manual_seed(0), []
    for _ in range(6):
        seen += hald.draw_soft_batches(pool, 5, 10, g)
    for start in (0, 10, 20):
        assert sorted(seen[start:start + 10]) == list(range(10))


# ------------------------------------------------------------------------- diagnostics
def test_drift_diagnostics_on_constructed_cases():
    p = F.softmax(torch.randn(4, 6), 1)
    identical = p[:, None].expand(4, 5, 6)
    assert torch.allclose(hald.crop_prob_spread(identical), torch.zeros(4), atol=1e-7)
    assert torch.allclose(hald.js_divergence(p, p), torch.zeros(4), atol=1e-7)
    one_hot = torch.eye(2)
    assert hald.js_divergence(one_hot[:1], one_hot[1:]).item() == pytest.approx(math.log(2))

    class AlwaysClassZero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return F.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float() * 10 + self.w

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    report = hald.drift_report(AlwaysClassZero(), AlwaysClassZero(), images, torch.tensor([1, 2] * 3), 4, 8, 0.08,
                               torch.Generator().manual_seed(0))
    assert report["teacher_crop_mismatch"] == 1.0 and report["teacher_crop_trace_mean"] == pytest.approx(0, abs=1e-9)
    assert report["student_crop_js_mean"] == pytest.approx(0, abs=1e-6)


# -------------------------------------------------------------------------- end to end
def write_folder(root: Path, classes: int, per_class: int, size: int, seed: int, mode="RGB"):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 + 50 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            pixels[: size // 2, :, c % 3] = 255  # a class-dependent pattern the models can learn
            Image.fromarray(pixels).convert(mode).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """4 classes x 3 images of 16 px to distil from, 4 x 4 validation images, and a teacher
    trained by hald.py itself with --schedule hard (20 epochs: far above chance, which the teacher check needs)."""
    root = tmp_path_factory.mktemp("tiny")
    data, val = write_folder(root / "data", 4, 3, 16, 0), write_folder(root / "val", 4, 4, 16, 1)
    teacher = root / "teacher.pt"
    assert hald.main(["--data", str(data), "--val", str(val), "--ipc", "3", "--schedule", "hard", "--epochs", "20",
                      "--model", "convnet_bn8", "--batch-size", "4", "--out", str(root / "t"), "--save-model", str(teacher),
                      "--drift-crops", "0"]) == 0
    return {"data": data, "val": val, "teacher": teacher, "root": root}


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory):
    """The bundled demo with 10 validation images per class (100 of its 2,000, for speed), and the weights of its
    teacher (ConvNet-3 BN, 32 px, CIFAR-10) saved as other projects save them: a plain state_dict, and under
    "state_dict" with DataParallel's module. prefixes."""
    root = tmp_path_factory.mktemp("demo_small")
    for d in sorted((HERE / "demo" / "val").iterdir()):
        (root / "val" / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:10]:
            (root / "val" / d.name / f.name).write_bytes(f.read_bytes())
    state = torch.load(HERE / "demo" / "teacher.pt", weights_only=True)["state_dict"]
    torch.save(state, root / "plain.pt")
    torch.save({"epoch": 90, "state_dict": {"module." + k: v for k, v in state.items()}}, root / "wrapped.pth")
    return {"data": HERE / "demo" / "distilled", "val": root / "val", "plain": root / "plain.pt", "wrapped": root / "wrapped.pth",
            "state": state}


def demo_args(demo, out, *extra):
    """A short run on the bundled distilled images (2 per class) with a small student."""
    return ["--data", str(demo["data"]), "--val", str(demo["val"]), "--ipc", "2", "--slc", "2", "--epochs", "2",
            "--eval-every", "0", "--drift-crops", "0", "--model", "convnet8", "--out", str(out), *extra]


def tiny_args(tiny, out, *extra):
    return ["--data", str(tiny["data"]), "--val", str(tiny["val"]), "--ipc", "2", "--slc", "4", "--teacher", str(tiny["teacher"]),
            "--epochs", "4", "--model", "convnet8", "--batch-size", "4", "--eval-every", "2", "--drift-crops", "2",
            "--out", str(out), *extra]


SUMMARY_FIELDS = {"final_top1", "final_top5", "best_top1", "schedule", "soft_labels_per_class", "soft_label_bytes",
                  "bytes_per_label", "seconds", "config", "versions", "device", "drift"}


@pytest.mark.parametrize("schedule", hald.PRESETS + ("soft:1,hybrid:1,hard:2",))
def test_every_schedule_runs_end_to_end(tiny, tmp_path, schedule):
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", schedule)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert sum(n for _, n in summary["schedule"]) == 4 and 0 <= summary["final_top1"] <= 100
    assert summary["final_top5"] >= summary["final_top1"] and summary["best_top1"] >= summary["final_top1"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert "student_crop_js_mean" in summary["drift"]
    if any(phase != "hard" for phase, _ in summary["schedule"]):
        assert summary["soft_labels_per_class"] == 4 and summary["soft_label_bytes"] == (tmp_path / "soft_labels.pt").stat().st_size
        assert 0 <= summary["drift"]["teacher_crop_mismatch"] <= 1


def test_hybrid_on_stored_crops_and_with_t2(tiny, tmp_path):
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", "hybrid", "--hybrid-crops", "stored", "--hybrid-t2",
                               "--label-smoothing", "0.8")) == 0
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["hybrid_crops"] == "stored" and config["label_smoothing"] == 0.8  # an explicit value is kept


def test_compact_labels_end_to_end(tiny, tmp_path, capsys):
    """--label-topk and --label-bits reach the cache, whose header records the format; it trains and is reused."""
    flags = ("--label-topk", "2", "--label-bits", "8")
    assert hald.main(tiny_args(tiny, tmp_path, *flags)) == 0
    blob = torch.load(tmp_path / "soft_labels.pt", weights_only=True)
    assert blob["header"]["label_topk"] == 2 and blob["header"]["label_bits"] == 8
    assert set(blob["labels"]) == {"indices", "codes", "lo", "hi"} and blob["labels"]["codes"].shape == (16, 2)
    capsys.readouterr()
    assert hald.main(tiny_args(tiny, tmp_path, *flags, "--overwrite")) == 0
    assert "reusing soft-label cache" in capsys.readouterr().out
    assert hald.main(tiny_args(tiny, tmp_path, "--label-topk", "3", "--overwrite")) == 2  # another format is another cache
    assert "label_bits, label_topk differ" in capsys.readouterr().err


def test_same_seed_same_numbers_and_cache_reuse(tiny, tmp_path):
    runs = []
    for name in ("a", "b", "a"):  # the second "a" reuses the cache of the first
        assert hald.main(tiny_args(tiny, tmp_path / name, "--save-model", str(tmp_path / f"{name}.pt"), "--seed", "3", "--overwrite")) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs.append((summary["final_top1"], summary["drift"], torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"]))
    for other in runs[1:]:
        assert other[0] == runs[0][0] and other[1] == runs[0][1]
        assert all(torch.equal(other[2][k], runs[0][2][k]) for k in runs[0][2])


def test_saved_student_is_a_teacher_and_cache_mismatch_is_refused(tiny, tmp_path, capsys):
    student = tmp_path / "student.pt"
    assert hald.main(tiny_args(tiny, tmp_path / "a", "--save-model", str(student))) == 0
    assert hald.main(tiny_args(tiny, tmp_path / "b", "--teacher", str(student), "--temperature", "7", "--no-check-teacher")) == 0
    # the cache of run a was made at T = 4 (auto, 4 classes) by another teacher: reusing it is refused, then rebuilt on request
    assert hald.main(tiny_args(tiny, tmp_path / "a", "--temperature", "7", "--overwrite")) == 2
    assert "other settings" in capsys.readouterr().err
    assert hald.main(tiny_args(tiny, tmp_path / "a", "--temperature", "7", "--rebuild-cache", "--overwrite")) == 0


@pytest.mark.parametrize("extra, message", [
    (["--slc", "3"], "is not a multiple of --ipc"),
    (["--ipc", "5", "--slc", "10"], "fewer than --ipc 5"),
    (["--batch-size", "9"], "larger than the 8 distilled images"),
    (["--schedule", "soft:1,hard:1"], "covers 2 epochs"),
    (["--schedule", "banana"], "bad schedule"),
    (["--teacher", "missing.pt"], "does not exist"),
    (["--teacher-mode", "test"], "--teacher-mode must be one of train, eval"),
    (["--label-bits", "4"], "--label-bits must be one of 16, 8"),
    (["--model", "nonexistent_net"], "unknown architecture 'nonexistent_net' for --model"),
    (["--lr", "1e9", "--schedule", "hard", "--label-smoothing", "0"], "loss became"),
])
def test_bad_input_gives_a_one_line_error(tiny, tmp_path, capsys, extra, message):
    assert hald.main(tiny_args(tiny, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hald: error:") and message in err and "\n" not in err
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "summary.json").exists()


def test_bad_folders(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "0.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "a" / "1.png").write_bytes(b"not a png")
    write_folder(tmp_path / "five", 5, 2, 16, 2)
    cases = [(["--val", str(tmp_path / "five")], "has 5 classes but --data has 4"), (["--data", str(tmp_path / "nowhere")], "is not a folder"),
             (["--data", str(tmp_path / "empty")], "no class folders"), (["--data", str(tmp_path / "broken")], "0.png")]
    for extra, message in cases:
        assert hald.main(tiny_args(tiny, tmp_path / "out", *extra)) == 2
        assert message in capsys.readouterr().err


def test_teacher_with_other_classes_is_refused(tiny, tmp_path, capsys):
    data = write_folder(tmp_path / "five", 5, 2, 16, 3)
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--data", str(data), "--val", str(data))) == 2
    assert f"teacher {tiny['teacher']} has 4 classes but --data has 5" in capsys.readouterr().err


def renamed_copy(src: Path, dst: Path, names: list[str]) -> Path:
    """The class folders of src (in sorted order) copied under new names."""
    for old, name in zip(sorted(d.name for d in src.iterdir()), names):
        (dst / name).mkdir(parents=True)
        for f in (src / old).iterdir():
            (dst / name / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("naming", [[f"new{c:03d}" for c in range(4)], [f"{c:05d}" for c in range(4)]])
def test_released_distilled_layouts_pair_by_position(tiny, tmp_path, capsys, naming):
    """SRe2L/FADRM (new000...) and RDED (00000...) folders against validation folders named like ImageNet's,
    with a teacher that learned a third naming (class0...): paired by position, the note shows it, and it trains."""
    data = renamed_copy(tiny["data"], tmp_path / "data", naming)
    val = renamed_copy(tiny["val"], tmp_path / "val", ["n01440764", "n01443537", "n01484850", "n01491361"])
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--data", str(data), "--val", str(val))) == 0
    out = capsys.readouterr().out
    assert f"classes of --data paired with --val {val} by sorted position: {naming[0]} -> n01440764, {naming[1]} -> n01443537" in out
    assert f"paired with teacher {tiny['teacher']} by sorted position: {naming[0]} -> class0" in out
    assert "(BatchNorm mode train)" in out  # RDED's layout too, which the authors relabel in eval mode (README)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["teacher_mode"] == "train"
    assert summary["classes"] == {"data": naming, "val": sorted(d.name for d in val.iterdir()), "teacher": [f"class{c}" for c in range(4)]}
    assert summary["teacher_agreement"] >= hald.chance_floor(4) and summary["teacher_top1"] >= hald.chance_floor(4)
    header = torch.load(tmp_path / "out" / "soft_labels.pt", weights_only=True)["header"]
    assert header["classes"] == naming and header["val_classes"] == summary["classes"]["val"]
    assert header["teacher_classes"] == summary["classes"]["teacher"]


@pytest.mark.parametrize("side", ["data", "val"])
def test_class_order_that_does_not_match_the_teacher_is_refused(tiny, tmp_path, capsys, side):
    """--data in reversed class order, or --val rotated by one: refused before training, nothing written to --out;
    --no-check-teacher trains anyway."""
    names = [f"class{c}" for c in range(4)]
    order = names[::-1] if side == "data" else names[1:] + names[:1]
    moved = renamed_copy(tiny[side], tmp_path / side, order)
    args = tiny_args(tiny, tmp_path / "out", f"--{side}", str(moved))
    assert hald.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hald: error: the class order of --{side} does not match the teacher's") and "\n" not in err
    assert "--no-check-teacher" in err and not (tmp_path / "out").exists()
    assert hald.main(args + ["--no-check-teacher"]) == 0
    assert "teacher_agreement" not in json.loads((tmp_path / "out" / "summary.json").read_text())


def test_missing_val_or_teacher_with_own_data_is_refused(tiny, tmp_path, capsys):
    """The bundled demo's validation set and teacher are used only when --data is not given."""
    base = ["--data", str(tiny["data"]), "--ipc", "2", "--epochs", "2", "--out", str(tmp_path / "out")]
    assert hald.main(base + ["--teacher", str(tiny["teacher"])]) == 2
    assert "--val is missing" in capsys.readouterr().err
    assert hald.main(base + ["--val", str(tiny["val"]), "--slc", "4"]) == 2
    assert "--teacher is missing" in capsys.readouterr().err
    for teacher, message in (("missing.pt", "does not exist"), ("resnet18:V7", "no weights 'V7'")):  # refused before decoding
        assert hald.main(base + ["--val", str(tmp_path / "nowhere"), "--slc", "4", "--teacher", teacher]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert hald.main(base + ["--val", str(tiny["val"]), "--schedule", "hard", "--batch-size", "4", "--drift-crops", "0"]) == 0  # no teacher needed


def test_unpadded_numeric_folders_get_a_note(tiny, tmp_path, capsys):
    names = [str(c) for c in (0, 1, 2, 10)]  # sorted as text: 0, 1, 10, 2
    data = renamed_copy(tiny["data"], tmp_path / "data", sorted(names))
    hald.load_distilled(data, 2, 16)
    assert "unpadded numbers, paired in text order (0, 1, 10, 2, ...)" in capsys.readouterr().out
    hald.load_distilled(tiny["data"], 2, 16)
    assert "unpadded" not in capsys.readouterr().out


def test_validation_storage_modes_give_the_same_accuracy(tiny, tmp_path):
    """Device, host memory or a memory-mapped file: the same decoded pixels, the same top-1 and top-5; the
    file is written once and reused."""
    classes = [f"class{c}" for c in range(4)]
    student, *_ = hald.load_teacher(str(tiny["teacher"]), classes, 16)
    results, stored = {}, {}
    for storage in ("device", "memory", "file", "file"):
        val = hald.load_val(tiny["val"], classes, 16, torch.device("cpu"), storage, tmp_path / "spill")
        assert val["storage"] == storage and val["images"].dtype == torch.uint8 and val["images"].shape == (16, 3, 16, 16)
        results[storage], stored[storage] = hald.evaluate(student, val, torch.device("cpu"), batch_size=5), val["images"].clone()
    assert results["device"] == results["memory"] == results["file"]
    assert torch.equal(stored["memory"], stored["file"])
    assert len(list((tmp_path / "spill").iterdir())) == 1  # one file, no temporary left
    assert hald.val_storage_for(10, torch.device("cpu")) == "memory" and hald.val_storage_for(2**60, torch.device("cpu")) == "file"


def test_torchvision_teacher_weights_tag():
    assert hald.torchvision_weights("resnet18")[1].name == "IMAGENET1K_V1"  # the authors' weights without a tag
    assert hald.torchvision_weights("resnet50:IMAGENET1K_V2")[1].name == "IMAGENET1K_V2"
    assert hald.torchvision_weights("resnet50:DEFAULT")[1].name == "IMAGENET1K_V2"
    with pytest.raises(hald.HaldError, match="no weights 'V9' for resnet50: use one of IMAGENET1K_V1, IMAGENET1K_V2"):
        hald.torchvision_weights("resnet50:V9")
    with pytest.raises(hald.HaldError, match="neither a file nor a torchvision model"):
        hald.torchvision_weights("nonexistent_net")


@given(c=st.integers(2, 2000))
def test_chance_floor_lies_between_chance_and_certainty(c):
    assert 100 / c < hald.chance_floor(c) < 100


def test_grayscale_rgba_and_resized_images_load(tmp_path):
    write_folder(tmp_path / "g", 2, 2, 12, 0, mode="L")
    write_folder(tmp_path / "g2", 2, 2, 20, 0, mode="RGBA")
    for c in range(2):
        for i in range(2):
            (tmp_path / "g2" / f"class{c}" / f"{i:03d}.png").rename(tmp_path / "g" / f"class{c}" / f"z{i}.png")
    (tmp_path / "g" / "class0" / "notes.txt").write_text("ignored")
    images, labels, classes = hald.load_distilled(tmp_path / "g", 4, 16)
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8 and labels.tolist() == [0] * 4 + [1] * 4
    assert classes == ["class0", "class1"]


def test_cli_subprocess_and_help(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(HERE / "hald.py"), *tiny_args(tiny, tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "final top-1" in run.stdout and (tmp_path / "summary.json").exists()
    helptext = subprocess.run([sys.executable, str(HERE / "hald.py"), "--help"], capture_output=True, text=True).stdout
    for flag in ("--data", "--ipc", "--slc", "--teacher-mode", "--hybrid-lambda", "--label-smoothing", "--save-model"):
        assert flag in helptext


@pytest.mark.parametrize("procs", [1, 2])
def test_killed_run_resumes_to_the_same_weights(tiny, tmp_path, procs):
    """Kill a CLI run (one process, or two under torchrun) after some epochs' checkpoints, resume
    it, and compare bit for bit with an uninterrupted run of the same seed."""
    args = tiny_args(tiny, tmp_path / "killed", "--epochs", "60", "--eval-every", "20", "--save-model", str(tmp_path / "killed.pt"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if procs > 1 else []), str(HERE / "hald.py")]
    proc = subprocess.Popen(cli + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.01)
    # One process dies by SIGKILL. torchrun starts its workers in sessions of their own, so a SIGKILL of
    # the launcher would leave them running to the end of the run; SIGTERM (a scheduler's preemption)
    # makes the launcher kill them (default action: no cleanup either) and wait for them before it exits.
    os.killpg(proc.pid, signal.SIGTERM if procs > 1 else signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run ended before it could be killed"
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    done = state["epoch"]
    assert 5 <= done < 60
    # as if the epochs before the kill had taken 1,000 s each: the resumed run's summary must count them
    state["history"] = json.dumps([{**row, "seconds": 1000.0} for row in json.loads(state["history"])])
    torch.save(state, tmp_path / "killed" / "checkpoint.pt")
    # the same thread count everywhere: CPU kernels may sum in another order with more threads
    whole = tiny_args(tiny, tmp_path / "whole", "--epochs", "60", "--eval-every", "20", "--save-model", str(tmp_path / "whole.pt"))
    # no retry: the gloo abort at interpreter exit (1 run in 60 before, 0 in 255 after hald.py leaves by os._exit)
    resumed = subprocess.run(cli + args + ["--resume"], capture_output=True, text=True, env=env)
    uninterrupted = subprocess.run(cli + whole, capture_output=True, text=True, env=env)
    for finished in (resumed, uninterrupted):
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming after epoch {done} " in resumed.stdout, "the checkpoint moved on after the kill: a process survived it"
    a = torch.load(tmp_path / "killed.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("killed", "whole"))
    assert sa["final_top1"] == sb["final_top1"] and sa["best_top1"] == sb["best_top1"]
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 61))
    assert sa["seconds"] > 1000 * done > sb["seconds"]  # the epochs before the kill count too


def test_resume_with_other_settings_is_refused_and_nan_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", "hard")) == 0
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", "hard", "--lr", "0.5", "--resume")) == 2
    assert "other settings" in capsys.readouterr().err
    out = tmp_path / "nan"
    assert hald.main(tiny_args(tiny, out, "--schedule", "hard", "--lr", "1e30", "--label-smoothing", "0")) == 2
    failed = int(re.search(r"in epoch (\d+) \(hard phase\)", capsys.readouterr().err)[1])
    assert not (out / "summary.json").exists()
    if failed > 1:  # the checkpoint of the last finite epoch is kept
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == failed - 1
    else:
        assert not (out / "checkpoint.pt").exists()


def test_untrusted_pickles_and_missing_cuda_are_refused(tiny, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": hald.MODEL_FORMAT, "model": torch.nn.Linear(2, 2)}, evil)  # needs arbitrary unpickling
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--teacher", str(evil))) == 2
    assert "cannot load teacher" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert hald.main(tiny_args(tiny, tmp_path / "out", "--device", "cuda")) == 2
        assert "CUDA is not available" in capsys.readouterr().err
        assert hald.main(tiny_args(tiny, tmp_path / "out", "--cuda-graph")) == 2
        assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


# a distilled set saved as tensors (DC / DM / MTT), --data FILE.pt
CIFAR10 = [torch.tensor(v).view(1, 3, 1, 1) for v in hald.NORMALIZATIONS["cifar10"]]


def tensor_set(tiny, seed=0):
    """tiny's 12 distilled images as dataset condensation code saves them: float, normalised with the CIFAR-10 statistics,
    with noise that takes them outside [0, 1] (optimised pixels are unconstrained), classes in mixed order."""
    images, labels, _ = hald.load_distilled(tiny["data"], 3, 16)
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255 + 0.1 * torch.randn(images.shape, generator=g)
    order = torch.randperm(len(x), generator=g)
    return ((x - CIFAR10[0]) / CIFAR10[1])[order], labels[order]


def save_tensor_set(layout: str, x, y, root: Path) -> tuple:
    """The set in one of the layouts --data reads; returns its path and the flags it needs."""
    root.mkdir(parents=True, exist_ok=True)
    if layout in ("images_best", "--labels"):  # MTT: images alone, labels in a file beside them
        torch.save(x, root / "images_best.pt")
        torch.save(y, root / ("labels_best.pt" if layout == "images_best" else "y.pth"))
        return root / "images_best.pt", ["--labels", str(root / "y.pth")] if layout == "--labels" else []
    blob = {"images": {"images": x, "labels": y}, "image_syn": {"image_syn": x, "label_syn": y, "syn_lr": torch.tensor(0.01)},
            "res": {"data": [[x[:4] * 0, y[:4]], [x, y]], "accs_all_exps": {"ConvNet": [0.3, 0.4]}},  # DC / DM: the last pair
            "pair": (x, y)}[layout]
    torch.save(blob, root / "set.pth")
    return root / "set.pth", []


@pytest.mark.parametrize("layout", ["images", "image_syn", "res", "pair", "images_best", "--labels"])
def test_tensor_set_layouts_train_end_to_end(tiny, tmp_path, capsys, layout):
    """Each layout trains with the teacher, checked, on the set de-normalised with --normalize; its classes take the
    teacher's names; the start-up line names the file and the layout."""
    path, extra = save_tensor_set(layout, *tensor_set(tiny), tmp_path / "set")
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--data", str(path), "--normalize", "cifar10", *extra)) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["teacher_agreement"] > 50 and summary["classes"]["data"] == [f"class{c}" for c in range(4)]
    assert "student_crop_js_mean" in summary["drift"] and summary["soft_labels_per_class"] == 4
    out = capsys.readouterr().out
    assert re.search(rf"8 images of 16 px in 4 classes \(.+\)\n  data {re.escape(str(path))}\n", out)
    assert {"res": "the last of 2 [images, labels] pairs", "images_best": "labels from", "--labels": "y.pth",
            "pair": "an (images, labels) pair", "images": "a dict of images and labels"}.get(layout, layout) in out


def test_tensor_set_values_survive_loading_unchanged(tiny, tmp_path, capsys):
    """De-normalised (file * std + mean) in float32, values outside [0, 1] kept; the first IPC images of each class
    in file order, classes contiguous; 1 channel repeated to 3; --image-size resizes."""
    x, y = tensor_set(tiny)
    torch.save({"images": x, "labels": y}, tmp_path / "set.pt")
    images, labels, classes, layout = hald.load_tensor_set(tmp_path / "set.pt", 2, 0, hald.NORMALIZATIONS["cifar10"])
    first = torch.cat([(y == c).nonzero().flatten()[:2] for c in range(4)])
    assert images.dtype == torch.float32 and torch.equal(images, x[first] * CIFAR10[1] + CIFAR10[0])
    assert images.min() < 0 and images.max() > 1
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and classes == ["0", "1", "2", "3"] and layout == "a dict of images and labels"
    assert "uses the first 1 of about 3 images per class" in (hald.load_tensor_set(tmp_path / "set.pt", 1) and capsys.readouterr().out)
    torch.save((x[:, :1], y), tmp_path / "grey.pt")
    grey = hald.load_tensor_set(tmp_path / "grey.pt", 3, 8, hald.NORMALIZATIONS["none"])[0]
    assert grey.shape == (12, 3, 8, 8) and torch.equal(grey[:, 0], grey[:, 2])


@pytest.mark.parametrize("case, message", [
    ("3-d", "the images must be float (N, C, H, W) with 1 or 3 channels and H = W, got (12, 3, 16)"),
    ("4 channels", "got (12, 4, 16, 16) torch.float32"),
    ("uint8", "got (12, 3, 16, 16) torch.uint8; 0-255 pixels: save images.float() / 255 and pass --normalize none"),
    ("label out of range", "the labels run from 0 to 99 but no image has class 4: give class indices 0 to C - 1"),
    ("1-based labels", "no image has class 0"),
    ("negative label", "the labels are torch.int64 from -1 to 3: give class indices as integers from 0"),
    ("float labels", "the labels are torch.float32 from 0 to 3"),
    ("11 labels", "12 images but labels (11,)"),
    ("5 classes", "has 4 classes but --data has 5"),
    ("fewer than ipc", "has 1 images, fewer than --ipc 2"),
    ("1e4", "de-normalised (x * std + mean), must be in [0, 1] units, got values from"),
    ("nan", "hold NaN or infinite values: the distillation diverged"),
    ("zca", "looks ZCA-whitened"),
    ("layout", "holds a dict of state_dict, epoch, no layout hald.py knows"),
    ("no labels", "holds images only"),
    ("missing", "does not exist"),
    ("--labels with a folder", "--labels is for a --data tensor file"),
])
def test_bad_tensor_sets_give_a_one_line_error_and_write_nothing(tiny, tmp_path, capsys, case, message):
    x, y = tensor_set(tiny)
    blob = {"3-d": (x[..., 0], y), "4 channels": (torch.cat([x, x[:, :1]], 1), y), "uint8": (x.to(torch.uint8), y),
            "11 labels": (x, y[:11]), "label out of range": (x, y.index_put((torch.tensor([0]),), torch.tensor(99))),
            "1-based labels": (x, y + 1), "negative label": (x, y.index_put((torch.tensor([0]),), torch.tensor(-1))),
            "float labels": (x, y.float()), "5 classes": (x, torch.arange(5).repeat(3)[:12]),
            "fewer than ipc": (x, torch.where((y == 3) & ((y == 3).cumsum(0) > 1), 0, y)), "1e4": (x * 1e4, y), "nan": (x.index_put((torch.tensor([5]),), torch.tensor(float("nan"))), y),
            "zca": (0.45 * torch.randn(x.shape), y),  # the statistics of whitened images: low contrast, no spatial correlation
            "layout": {"state_dict": {}, "epoch": 3}, "no labels": x}.get(case)
    path = tmp_path / "images.pt"
    if blob is not None:
        torch.save(blob, path)
    data = ["--data", str(tiny["data"]), "--labels", str(path)] if case == "--labels with a folder" else ["--data", str(path)]
    assert hald.main(tiny_args(tiny, tmp_path / "out", *data, "--normalize", "cifar10", "--schedule", "hard")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hald: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_one_hot_labels_give_the_same_run_as_indices_and_resume(tiny, tmp_path, capsys):
    x, y = tensor_set(tiny)
    torch.save({"image_syn": x, "label_syn": y}, tmp_path / "index.pt")
    torch.save({"image_syn": x, "label_syn": F.one_hot(y, 4).float() * 0.9}, tmp_path / "one_hot.pt")
    runs = {}
    for name in ("index", "one_hot"):
        args = ["--data", str(tmp_path / f"{name}.pt"), "--normalize", "cifar10", "--save-model", str(tmp_path / f"{name}.student")]
        assert hald.main(tiny_args(tiny, tmp_path / name, *args)) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        runs[name] = summary["final_top1"], summary["drift"], torch.load(tmp_path / f"{name}.student", weights_only=True)["state_dict"]
        assert capsys.readouterr().out.count("each image takes the class of its largest (argmax)") == (name == "one_hot")
    assert runs["index"][:2] == runs["one_hot"][:2] and all(torch.equal(v, runs["one_hot"][2][k]) for k, v in runs["index"][2].items())
    cache = torch.load(tmp_path / "index" / "soft_labels.pt", weights_only=True)["header"]
    assert cache == torch.load(tmp_path / "one_hot" / "soft_labels.pt", weights_only=True)["header"]  # same images, same cache
    assert hald.main(tiny_args(tiny, tmp_path / "index", "--data", str(tmp_path / "index.pt"), "--normalize", "cifar10", "--resume")) == 0
    out = capsys.readouterr().out
    assert "reusing soft-label cache" in out and "resuming after epoch 4" in out


# ------------------------------------------------- teachers of other projects, --evaluate, first contact
@pytest.mark.parametrize("saved", ["plain", "wrapped"])
def test_teacher_saved_by_another_project_trains_with_teacher_arch(demo_small, tmp_path, saved):
    """The bundled teacher's weights as a plain state_dict, and under "state_dict" with module. prefixes: loaded
    into --teacher-arch convnet_bn, paired with --data by position, checked, and fingerprinted by sha256 and arch."""
    path = demo_small[saved]
    assert hald.main(demo_args(demo_small, tmp_path, "--teacher", str(path), "--teacher-arch", "convnet_bn")) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["teacher_agreement"] > 50 and summary["teacher_top1"] > 50  # the teacher check passed, far above chance
    header = torch.load(tmp_path / "soft_labels.pt", weights_only=True)["header"]
    assert header["teacher"] == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()} as convnet_bn"
    assert header["teacher_classes"] is None and summary["classes"]["teacher"] is None  # a state_dict names no classes


def test_teacher_files_that_do_not_fit_are_refused_in_one_line_before_the_relabel(demo_small, tmp_path, capsys):
    state = demo_small["state"]
    torch.save(hald.build_model("convnet_bn", 10, 32), tmp_path / "module.pt")  # pickled code, not tensors
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pt")
    head = {"13.weight": torch.zeros(1000, 2048), "13.bias": torch.zeros(1000)}  # an ImageNet head
    torch.save({"model": {"_orig_mod." + k: head.get(k, v) for k, v in state.items()}}, tmp_path / "imagenet_head.pt")
    cases = [(demo_small["plain"], "", "is not a checkpoint written by hald.py --save-model: for the weights of another "
              "project's model, name its architecture with --teacher-arch"),
             (demo_small["plain"], "convnet_bn64", "does not fit convnet_bn64 at 32 px: misshapen (file vs model) 0.weight (128, 3, 3, 3) vs (64, 3, 3, 3)"),
             (demo_small["wrapped"], "resnet18", "does not fit resnet18 at 32 px: missing conv1.weight, bn1.weight, bn1.bias and 119 "
              "more; unexpected 0.weight, 0.bias, 1.weight and 20 more: give the architecture"),
             (demo_small["plain"], "resnet81", "unknown architecture 'resnet81' for --teacher-arch: did you mean resnet18"),
             (HERE / "demo" / "teacher.pt", "resnet18", "is a hald.py checkpoint of convnet_bn, not resnet18: drop --teacher-arch"),
             (tmp_path / "module.pt", "convnet_bn", "cannot load teacher"),
             (tmp_path / "no_weights.pt", "convnet_bn", "holds no state_dict (tensors by name), alone or under state_dict, model"),
             (tmp_path / "imagenet_head.pt", "convnet_bn", "predicts 1000 classes but the data has 10")]
    for teacher, arch, message in cases:
        assert hald.main(demo_args(demo_small, tmp_path / "out", "--teacher", str(teacher), "--teacher-arch", arch)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hald: error:") and message in err and "\n" not in err, (teacher, arch, err)
        assert not (tmp_path / "out").exists()  # found before the validation set, the teacher check and the relabel


def test_resnet_weights_get_the_stem_they_were_saved_with():
    """A torchvision ResNet from another project: a 3x3 conv1 is the CIFAR stem (no max-pool), a 7x7 the ImageNet one."""
    for saved_at, cifar in ((32, True), (224, False)):
        state = hald.build_model("resnet18", 10, saved_at).state_dict()  # the stem of its input size
        model = hald.model_from_weights({"arch": "resnet18", "state_dict": state}, 10, 32, "teacher")
        assert model.conv1.kernel_size == ((3, 3) if cifar else (7, 7)) and isinstance(model.maxpool, torch.nn.Identity) == cifar
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_evaluate_a_saved_student_gives_its_runs_final_top1(tiny, tmp_path, capsys, monkeypatch):
    student = tmp_path / "student.pt"
    assert hald.main(tiny_args(tiny, tmp_path / "run", "--save-model", str(student))) == 0
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final_top1"]
    capsys.readouterr()
    monkeypatch.chdir((tmp_path / "cwd").mkdir() or tmp_path / "cwd")
    assert hald.main(["--evaluate", str(student), "--val", str(tiny["val"])]) == 0
    assert f"top-1 {final:.2f} %" in capsys.readouterr().out and not list((tmp_path / "cwd").iterdir())  # no --out: nothing written
    torch.save({"net": torch.load(student, weights_only=True)["state_dict"]}, tmp_path / "plain.pt")  # the same weights, bare
    assert hald.main(["--evaluate", str(tmp_path / "plain.pt"), "--teacher-arch", "convnet8", "--val", str(tiny["val"]),
                      "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["top1"] == final and result["val_images"] == 16 and [p.name for p in (tmp_path / "eval").iterdir()] == ["evaluation.json"]
    assert hald.main(["--evaluate", str(student)]) == 2 and "--evaluate needs --val" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet81"], "unknown architecture 'resnet81' for --model: did you mean resnet18"),
    (["--teacher", "PLAIN", "--teacher-arch", "resnet81"], "unknown architecture 'resnet81' for --teacher-arch"),
    (["--teacher", "PLAIN", "--teacher-arch", "convnet_bn16"], "does not fit convnet_bn16 at 16 px"),
    (["--teacher", "resnet18", "--teacher-arch", "resnet18"], "--teacher-arch is for a --teacher file"),
    (["--model", "resnet18", "BROKEN"], "torchvision does not work with the installed torch"),
])
def test_mistakes_are_found_before_the_relabel(tiny, tmp_path, capsys, monkeypatch, extra, message):
    """Each exits 2 with one line and nothing in --out (BROKEN: a torchvision that cannot be imported)."""
    torch.save(torch.load(tiny["teacher"], weights_only=True)["state_dict"], tmp_path / "plain.pt")
    if "BROKEN" in extra:
        monkeypatch.setitem(sys.modules, "torchvision", None)
    extra = [str(tmp_path / "plain.pt") if e == "PLAIN" else e for e in extra if e != "BROKEN"]
    assert hald.main(tiny_args(tiny, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hald: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_says_how_to_resume_in_one_line(tiny, tmp_path):
    """SIGINT during a run: one line with the command that continues it, exit 130, a resumable checkpoint; that
    command then finishes the run."""
    args = tiny_args(tiny, tmp_path / "run", "--epochs", "200", "--eval-every", "100", "--drift-crops", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a test run started in the background (`make test &`) ignores SIGINT, the
    # child inherits that, and Python then installs no KeyboardInterrupt handler (the run ignored the signal, exit 0)
    proc = subprocess.Popen([sys.executable, str(HERE / "hald.py"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("hald: interrupted; to continue from the last finished epoch: ")
    command = shlex.split(err.split("epoch: ", 1)[1])
    python = os.path.relpath(sys.executable)  # the Python that ran it (.venv/bin/python), else its name
    assert command == [python if not python.startswith("..") else Path(sys.executable).name, str(HERE / "hald.py"), *args, "--resume"]
    done = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"]
    assert 3 <= done < 200 and not (tmp_path / "run" / "summary.json").exists()
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0 and f"resuming after epoch {done} " in resumed.stdout, resumed.stderr[-2000:]
    assert len(metrics.read_text().splitlines()) == 200 and (tmp_path / "run" / "summary.json").exists()


def test_auto_smoothing_above_the_largest_measured_class_count_is_the_authors(tmp_path, capsys):
    """201 classes, one more than measured: label smoothing 0.8 and T 20, and the start-up line says why."""
    data, val = write_folder(tmp_path / "data", 201, 1, 8, 0), write_folder(tmp_path / "val", 201, 1, 8, 1)
    assert hald.main(["--data", str(data), "--val", str(val), "--ipc", "1", "--schedule", "hard", "--epochs", "1",
                      "--model", "convnet8", "--drift-crops", "0", "--out", str(tmp_path / "out")]) == 0
    assert "label smoothing 0.8 (auto: the authors' values)" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "summary.json").read_text())["config"]
    assert (config["label_smoothing"], config["temperature"]) == (0.8, 20.0)


def test_hald_alone_beyond_four_stored_crops_per_image_suggests_the_comparison(tiny, tmp_path, capsys):
    """HALD alone gets a note suggesting the comparison where it was not ahead of soft-only everywhere measured: from 5
    stored crops per image with the reset (level within a point at 10), from 2 with AdamW's state kept; none at 4 with
    the reset (ahead everywhere measured up to 4), at 1, or when comparing already."""
    notes = {"5 stored crops per image: HALD's lead over soft-only shrinks": ["--slc", "10"],
             "2 stored crops per image: HALD's lead over soft-only shrinks": ["--phase-switch", "keep"]}
    for i, (note, args) in enumerate(notes.items()):
        assert hald.main(tiny_args(tiny, tmp_path / f"alone{i}", "--schedule", "shs", "--soft-epochs", "2", *args)) == 0
        out = capsys.readouterr().out
        assert f"note: {note}" in out and "--seeds 0,1,2 at three seeds" in out
    assert ", AdamW keep at each switch" in out and hald.main(tiny_args(tiny, tmp_path / "reset", "--schedule", "shs", "--soft-epochs", "2",
                                                                     "--slc", "8")) == 0
    out = capsys.readouterr().out
    assert ", AdamW reset at each switch" in out and "stored crops per image:" not in out  # the default, on the start-up line
    for args in (["--schedule", "shs soft", "--soft-epochs", "2", "--slc", "6"], ["--schedule", "shs", "--soft-epochs", "2", "--slc", "2",
                                                                                  "--phase-switch", "keep"]):
        assert hald.main(tiny_args(tiny, tmp_path / f"other{len(args)}", *args)) == 0
        assert "stored crops per image:" not in capsys.readouterr().out  # comparing already, or one crop per image


def documented_fields(heading: str) -> set:
    """The names docs/outputs.md lists in the first column of the table under `heading` (a file's fields)."""
    text = (HERE / "docs" / "outputs.md").read_text()
    section = text[text.index(heading):].split("\n## ")[0]
    return {name for line in section.splitlines() if line.startswith("| `") for name in re.findall(r"`(\w+)`", line.split("|")[1])}


def test_seeds_train_every_schedule_at_every_seed_and_report_mean_and_spread(tiny, tmp_path, capsys):
    """--seeds 0,1 with two schedules: four runs in OUT/seed<k>/<schedule>/, each seed's schedules from its own cache, each
    run the run --seed k gives alone; the table's mean +- std, paired difference and per-seed values are the summaries'.
    Bad --seeds, and --cache with several seeds, are refused before any work."""
    out = tmp_path / "seeds"
    assert hald.main(tiny_args(tiny, out, "--schedule", "shs soft", "--soft-epochs", "2", "--seeds", "0,1")) == 0
    text = capsys.readouterr().out
    top1 = {(k, s): json.loads((out / f"seed{k}" / s / "summary.json").read_text())["final_top1"] for k in (0, 1) for s in ("shs", "soft")}
    caches = [torch.load(out / f"seed{k}" / "soft_labels.pt", weights_only=True)["header"] for k in (0, 1)]
    assert [h["seed"] for h in caches] == [0, 1] and caches[0]["fingerprint"] != caches[1]["fingerprint"]
    assert text.count("reusing soft-label cache") == 2  # each seed's second schedule reuses its seed's cache
    table = text[text.index("comparison over 2 seeds, the schedules of each seed on its own soft-label cache (4 labels per class, "
                            "2 per image):"):].splitlines()
    for line, s in zip(table[2:4], ("shs", "soft")):
        values = [top1[0, s], top1[1, s]]
        assert line.split()[:4] == [s, f"{statistics.mean(values):.2f}", "+-", f"{statistics.stdev(values):.2f}"]
        assert line.endswith(f"{values[0]:.2f}, {values[1]:.2f}")
    diffs = [top1[k, "soft"] - top1[k, "shs"] for k in (0, 1)]
    assert table[3].split()[4:7] == [f"{statistics.mean(diffs):+.2f}", "+-", f"{statistics.stdev(diffs):.2f}"]
    compared = json.loads((out / "comparison.json").read_text())
    assert compared["seeds"] == [0, 1] and max(map(len, text.splitlines())) <= 120  # the log fits a terminal
    for s in ("shs", "soft"):  # the numbers a script reads, as the table shows them
        got, values = compared["results"][s], [top1[0, s], top1[1, s]]
        assert got["top1"] == values and got["n"] == 2 and math.isclose(got["mean"], statistics.mean(values))
        assert math.isclose(got["std"], statistics.stdev(values)) and len(got["top5"]) == 2
    assert math.isclose(compared["results"]["soft"]["vs_first"]["mean"], statistics.mean(diffs))
    summary = json.loads((out / "seed0" / "shs" / "summary.json").read_text())  # docs/outputs.md lists every field, and only those
    assert documented_fields("## `summary.json`") == set(summary) and documented_fields("## `comparison.json`") == set(compared)
    assert math.isclose(compared["results"]["soft"]["vs_first"]["std"], statistics.stdev(diffs))
    assert hald.main(tiny_args(tiny, tmp_path / "alone", "--schedule", "shs", "--soft-epochs", "2", "--seed", "1")) == 0
    assert json.loads((tmp_path / "alone" / "summary.json").read_text())["final_top1"] == top1[1, "shs"]  # the same run
    for bad, said in (("0,0", "--seeds takes different whole numbers"), ("0,a", "--seeds takes different whole numbers"),
                      ("0,1 --cache x.pt", "--cache holds one seed's soft labels")):
        assert hald.main(tiny_args(tiny, tmp_path / "bad", "--seeds", *bad.split())) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_bench_smoke(tmp_path):
    sys.path.insert(0, str(HERE / "tools"))
    import bench

    result = bench.main(["--model", "convnet8", "--image-size", "16", "--classes", "3", "--ipc", "4", "--batch-size", "4",
                         "--repeats", "1", "--device", "cpu", "--replay-sizes", "24", "--whole-step-graph",
                         "--val-jpegs", "8", "--val-size", "32", "--val-eval-images", "6", "--out", str(tmp_path / "bench.json")])
    stored = json.loads((tmp_path / "bench.json").read_text())
    terms = [f"projected_minutes_{t}" for t in ("soft", "hard", "relabel", "eval", "val_decode")]
    ratios = ("efficiency_soft", "efficiency_hard", "relabel_vs_teacher_forward", "efficiency_soft_whole_graph")
    for key in ("device", "model", "batch_size", "image_size", "model_step_ips", "soft_epoch_ips", "hard_epoch_ips",
                "efficiency_soft", "efficiency_hard", "relabel_ips", "teacher_forward_ips", "replay_ips", "naive_replay_ips",
                "eval_ips", "broken", "val_decode_ips", "val_decode_ips_one_thread", "val_eval_seconds_before", "val_eval_seconds_after",
                "val_eval_seconds_before_50k", "val_eval_seconds_after_50k", *terms, *(f"{r}_spread" for r in ratios)):
        assert key in stored
    assert all(result[k] > 0 for k in result if k.endswith("_ips"))
    assert stored["replay_by_image_size"]["24"]["replay_speedup_vs_naive"] > 0
    assert "whole_step_graph_error" not in stored and stored["whole_graph_soft_epoch_ips"] > 0
    for r in ratios:  # a ratio is a number, or None with its reason in broken (a load change the rounds could not absorb)
        assert (stored[r] is None) == any(line.startswith(f"{r}:") for line in stored["broken"])
    assert stored["val_jpegs"] == 8 and stored["val_eval_images"] == 6 and stored["val_eval_seconds_before"] > 0
    assert math.isclose(sum(stored[t] for t in terms), stored["projected_imagenet_ipc10_minutes"])
    # fabricated rounds: an epoch cannot be faster than its ceiling; above 1.1 the measurement is broken, not a result
    median, spread, broken = bench.bounded_ratio([1.0, 1.0, 1.0], [1.1, 1.0, 1.25])
    assert median == 1 / 1.1 and spread == [0.8, 1.0] and not broken
    median, spread, broken = bench.bounded_ratio([4.0, 5.0, 4.7], [1.0, 1.0, 1.0])
    assert median == 4.7 and spread == [4.0, 5.0] and broken
    lines = []
    assert bench.ratio_keys("efficiency_soft", [4.0, 5.0, 4.7], [1.0, 1.0, 1.0], lines) == {"efficiency_soft": None, "efficiency_soft_spread": [4.0, 5.0]}
    assert len(lines) == 1 and lines[0].startswith("efficiency_soft: median per-round ratio 4.70")


def test_bench_device_indexed_replay_equals_cache_batch():
    """The whole-step-graph experiment picks stored batches with device tensors (capturable): the
    crops and labels must be cache.batch's."""
    sys.path.insert(0, str(HERE / "tools"))
    import bench

    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cache = bench.build_cache(hald.build_model("convnet8", 3, 16), images, 4)
    full = bench.full_batches(cache, images.device)
    assert full[0].tolist() == [0, 1]  # 10 images = 4 + 4 + 2: the last batch is not full
    for j, k in enumerate(full[0].tolist()):
        x, probs = bench.replay_on_device(cache, images, full, torch.tensor([j]))
        ref, ref_probs, *_ = cache.batch(k, images)
        assert torch.equal(x, ref) and torch.equal(probs, ref_probs)


def test_no_argument_demo_in_short_and_again(tmp_path, capsys, monkeypatch, demo_small):
    """`python hald.py` runs the bundled demo: HALD and soft-only at 1 crop per image from one cache, then a
    comparison (table, comparison.json, comparison.png); here with 4 epochs instead of 200. A second demo (make demo
    again) replaces the first in its own folder, runs/hald; an --out given is never replaced."""
    monkeypatch.chdir(tmp_path)
    assert hald.main(["--epochs", "4", "--eval-every", "2"]) == 0
    out, tmp_path = capsys.readouterr().out, tmp_path / "runs" / "hald"
    summaries = {s: json.loads((tmp_path / s / "summary.json").read_text()) for s in ("shs", "soft")}
    table = out[out.index("comparison on the same soft-label cache (10 labels per class, 1 per image):"):].splitlines()
    for line, (spec, summary) in zip(table[2:4], summaries.items()):
        assert line.split()[:2] == [spec, f"{summary['final_top1']:.2f}"]
    assert table[3].split()[2] == f"{summaries['soft']['final_top1'] - summaries['shs']['final_top1']:+.2f}"
    assert json.loads((tmp_path / "comparison.json").read_text())["schedules"] == ["shs", "soft"]
    if matplotlib_installed():  # CI installs requirements.txt only, without matplotlib
        assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "note: pip install matplotlib to get comparison.png" in out
    assert out.count("reusing soft-label cache") == 1 and (tmp_path / "soft_labels.pt").exists()  # one cache for both
    assert "| label smoothing 0.1, T 4 (auto)\n  lr 0.001, eta 2 (auto: hald.py's default, as the authors have no row" in out  # 10 classes
    assert max(map(len, out.splitlines())) <= 120  # the run log fits a terminal
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]  # the time left covers both schedules
    assert all(" min left in all" in line for line in epochs[:4]) and not any("in all" in line for line in epochs[4:])
    summary = summaries["shs"]
    assert SUMMARY_FIELDS <= summary.keys() and summary["config"]["data"].endswith("distilled")
    assert summary["soft_labels_per_class"] == 10 and summary["soft_label_bytes"] > 0
    assert summary["config"]["model"] == "convnet_bn"  # the default student
    assert summary["schedule"] == [["soft", 1], ["hard", 1], ["soft", 2]] and summaries["soft"]["schedule"] == [["soft", 4]]
    assert summary["config"]["label_smoothing"] == 0.1 and summary["config"]["temperature"] == 4  # the auto values
    assert summary["config"]["soft_epochs"] == 3  # resolved: 4/5 of 4 epochs
    assert summary["versions"]["hald_sha256"] == hashlib.sha256((HERE / "hald.py").read_bytes()).hexdigest()
    if (HERE / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", summary["versions"]["git_commit"])
    for key in ("teacher_crop_trace_mean", "teacher_crop_trace_median", "teacher_crop_mismatch", "student_crop_js_mean"):
        assert math.isfinite(summary["drift"][key])
    assert 0 < summary["drift"]["teacher_crop_mismatch"] < 1  # a real teacher on real crops: some drift, mostly right
    assert summary["final_top1"] > 10  # above chance on 2,000 real CIFAR-10 test images
    assert summary["teacher_agreement"] > 60 and summary["teacher_top1"] > 60  # the bundled teacher on its own data
    # again (on 100 validation images, for speed): the earlier demo is replaced, and the output says so
    assert hald.main(["--epochs", "2", "--val", str(demo_small["val"]), "--drift-crops", "0"]) == 0
    assert "note: replacing the earlier demo in runs/hald/" in capsys.readouterr().out
    assert json.loads((tmp_path / "shs" / "summary.json").read_text())["config"]["epochs"] == 2
    assert hald.main(["--epochs", "2", "--out", str(tmp_path)]) == 2  # the same folder given as --out: refused
    assert f"--out {tmp_path / 'shs'} holds a finished run" in capsys.readouterr().err


def matplotlib_installed() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_comparison_picture_or_a_note(tmp_path, monkeypatch):
    """comparison.png holds the schedules of a comparison; without matplotlib a note says how to get it."""
    histories = [[{"epoch": e, "phase": p, "loss": 1.0, "top1": 10.0 * e} for e, p in enumerate(("soft", "hard", "soft"), 1)],
                 [{"epoch": e, "phase": "soft", "loss": 1.0, "top1": 9.0 * e} for e in (1, 2, 3)]]
    said = []
    hald.plot_curves({"shs": histories[:1], "soft": histories[1:] * 2}, tmp_path / "comparison.png", "two schedules", said.append)
    if matplotlib_installed():
        assert said == [] and (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    hald.plot_curves({"shs": histories[:1]}, tmp_path / "other.png", "", said.append)
    assert said[-1] == "note: pip install matplotlib to get other.png" and not (tmp_path / "other.png").exists()


def test_finished_or_unfinished_out_is_not_overwritten(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path, "--epochs", "2", "--drift-crops", "0")
    assert hald.main(args) == 0
    first = (tmp_path / "summary.json").read_text()
    assert hald.main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} holds a finished run (summary.json): pass --overwrite" in err
    assert (tmp_path / "summary.json").read_text() == first
    assert hald.main(args + ["--resume"]) == 0  # --resume is unaffected
    (tmp_path / "summary.json").unlink()  # as if the run had been interrupted
    assert hald.main(args + ["--seed", "1"]) == 2
    assert "holds an unfinished run (checkpoint.pt): pass --resume" in capsys.readouterr().err
    assert hald.main(args + ["--seed", "1", "--overwrite"]) == 2  # the cache is another matter: it names its own flag
    assert "other settings (seed differ): pass --rebuild-cache" in capsys.readouterr().err
    assert hald.main(args + ["--seed", "1", "--overwrite", "--rebuild-cache"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["seed"] == 1


def test_help_is_grouped_and_shows_no_checkout_path():
    helptext = subprocess.run([sys.executable, str(HERE / "hald.py"), "--help"], capture_output=True, text=True).stdout
    for group in ("data:", "soft labels:", "student and schedule:", "optimisation:", "run:"):
        assert f"\n{group}\n" in helptext
    assert str(HERE) not in helptext and "(default: )" not in helptext
    words = " ".join(helptext.split())  # argparse wraps lines
    assert "(one of: train, eval)" in words and "[default: 100; the demo without --data: 10]" in words
    assert "--teacher-arch TEACHER_ARCH" in words and "--evaluate EVALUATE" in words and "-1 = auto: 0.1 up to 200 classes" in words


def test_full_training_set_and_dataset_root_are_pointed_out(tiny, tmp_path, capsys):
    hald.load_distilled(tiny["val"], 1, 16)  # 4 images per class, 1 used
    assert "--ipc 1 uses the first 1 of about 4 images per class" in capsys.readouterr().out
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train").symlink_to(tiny["data"])
    (tmp_path / "root" / "val").symlink_to(tiny["val"])
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--data", str(tmp_path / "root"))) == 2
    assert f"{tmp_path / 'root' / 'train'} holds folders, not images" in capsys.readouterr().err


def test_torchvision_teacher_with_another_class_count_is_refused(tiny, tmp_path, capsys):
    """A torchvision name means ImageNet weights, whose 1,000 class names torchvision lists: refused against 4
    classes before any weights are downloaded (none can be in tests)."""
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--teacher", "resnet18")) == 2
    assert "teacher resnet18 has 1000 classes but --data has 4" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_torchvision_teacher_is_checked_and_its_weights_recorded(tiny, tmp_path, capsys, monkeypatch):
    """A stand-in for ImageNet weights with the data's class count that always says class 0: the teacher check
    refuses it (the one check of class order a torchvision teacher gets); without the check it trains, its class
    names paired by position, and the cache records the weights tag."""
    real = hald.build_model

    def always_class_0(name, n, size, weights=None):
        model = real("convnet8", n, size)
        with torch.no_grad():
            model[-1].bias.copy_(torch.tensor([100.0] + [0.0] * (n - 1)))
        return model

    monkeypatch.setattr(hald, "build_model", always_class_0)
    weights = hald.torchvision_weights("resnet50:IMAGENET1K_V2")[1]
    monkeypatch.setitem(weights.meta, "categories", ["tench", "goldfish", "great white shark", "tiger shark"])
    assert hald.main(tiny_args(tiny, tmp_path, "--teacher", "resnet50:IMAGENET1K_V2")) == 2
    assert "does not match the teacher's" in capsys.readouterr().err
    assert hald.main(tiny_args(tiny, tmp_path, "--teacher", "resnet50:IMAGENET1K_V2", "--no-check-teacher")) == 0
    assert "paired with teacher resnet50:IMAGENET1K_V2 by sorted position: class0 -> tench" in capsys.readouterr().out
    header = torch.load(tmp_path / "soft_labels.pt", weights_only=True)["header"]
    assert header["teacher"] == "torchvision:resnet50:IMAGENET1K_V2" and header["teacher_classes"][0] == "tench"


class PoolBlock(torch.nn.Module):
    """A residual block named as in CIFAR model pools: conv1 bn1 conv2 bn2 (conv3 bn3 for a bottleneck, its stride on
    the 3x3), and a `shortcut` of 1x1 conv and BatchNorm where the shape changes, an empty Sequential elsewhere."""

    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool):
        super().__init__()
        self.out = width * 4 if bottleneck else width
        convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, self.out, 1, 1)] if bottleneck else [(cin, width, 3, stride), (width, width, 3, 1)]
        for i, (a, b, k, s) in enumerate(convs, 1):
            setattr(self, f"conv{i}", torch.nn.Conv2d(a, b, k, s, k // 2, bias=False))
            setattr(self, f"bn{i}", torch.nn.BatchNorm2d(b))
        self.depth, self.shortcut = len(convs), torch.nn.Sequential()
        if stride != 1 or cin != self.out:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, self.out, 1, stride, bias=False), torch.nn.BatchNorm2d(self.out))

    def forward(self, x):
        y = x
        for i in range(1, self.depth + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            y = F.relu(y) if i < self.depth else y
        return F.relu(y + self.shortcut(x))


class PoolResNet(torch.nn.Module):
    """A ResNet named as in CIFAR model pools: 3x3 stride-1 conv1 and bn1, no max-pool, layer1..layer4, global average
    pool, a head named `linear`. blocks (2, 2, 2, 2) plain: ResNet-18; (3, 4, 6, 3) with bottlenecks: ResNet-50."""

    def __init__(self, blocks, bottleneck: bool, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1, cin = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(64), 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
            layer = []
            for j in range(n):
                layer.append(PoolBlock(cin, width, 2 if i > 1 and j == 0 else 1, bottleneck))
                cin = layer[-1].out
            setattr(self, f"layer{i}", torch.nn.Sequential(*layer))
        self.linear = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(x.mean((2, 3)))


class DCConvNet(torch.nn.Module):
    """The ConvNet named as in dataset condensation code: features = [conv 3x3, norm, ReLU, avg-pool 2] x depth,
    classifier; instance norm as GroupNorm(w, w)."""

    def __init__(self, width: int, depth: int, norm: str, size: int, num_classes: int = 10):
        super().__init__()
        layers = []
        for i in range(depth):
            norm_layer = torch.nn.GroupNorm(width, width) if norm == "instance" else torch.nn.BatchNorm2d(width)
            layers += [torch.nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), norm_layer, torch.nn.ReLU(), torch.nn.AvgPool2d(2)]
        self.features, self.classifier = torch.nn.Sequential(*layers), torch.nn.Linear(width * (size >> depth) ** 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms, so that eval-mode logits depend on every buffer (in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def assert_same_logits(theirs: torch.nn.Module, ours: torch.nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, blocks, bottleneck, wrap", [("resnet18", (2, 2, 2, 2), False, False),
                                                            ("resnet18", (2, 2, 2, 2), False, True),
                                                            ("resnet50", (3, 4, 6, 3), True, True)])
def test_model_pool_resnet_naming_loads_to_the_same_logits(tmp_path, arch, blocks, bottleneck, wrap):
    """A CIFAR model-pool ResNet (shortcut, linear), plain or under "model" with module. prefixes: renamed to
    torchvision's names with a note, given the CIFAR stem from its 3x3 conv1, and the same logits at 32 and 64 px."""
    theirs = randomized(PoolResNet(blocks, bottleneck))
    state = theirs.state_dict()
    torch.save({"epoch": 200, "model": {"module." + k: v for k, v in state.items()}} if wrap else state, tmp_path / "pool.pth")
    notes = []
    weights = hald.read_weights(tmp_path / "pool.pth", arch, "teacher", notes.append)
    assert notes == [f"note: teacher {tmp_path / 'pool.pth'}: the CIFAR model-pool ResNet naming (shortcut, linear), renamed to torchvision's"]
    assert weights["arch"] == arch and weights["identity"].endswith(f" as {arch}")
    for size in (32, 64):
        ours = hald.model_from_weights(weights, 10, size, "teacher")
        assert isinstance(ours.maxpool, torch.nn.Identity)
        assert_same_logits(theirs, ours, size)


@pytest.mark.parametrize("depth, size", [(3, 32), (4, 64)])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_dc_convnet_naming_loads_with_width_depth_and_norm_from_the_weights(tmp_path, depth, size, norm):
    """A DC / DM / MTT ConvNet (features, classifier) of width 32: --teacher-arch convnet or convnet_bn, whichever the
    norm, loads it as the ConvNet its weights describe, named in the note; the same logits."""
    theirs = randomized(DCConvNet(32, depth, norm, size))
    torch.save(theirs.state_dict(), tmp_path / "dc.pt")
    found = f"convnet{'_bn' if norm == 'batch' else ''}32" + ("_d4" if depth == 4 else "")
    for said in ("convnet", "convnet_bn"):
        notes = []
        weights = hald.read_weights(tmp_path / "dc.pt", said, "teacher", notes.append)
        assert weights["arch"] == found and len(notes) == 1
        assert notes[0] == (f"note: teacher {tmp_path / 'dc.pt'}: the DC/DM/MTT ConvNet naming (features, classifier), read as "
                            f"{found} (width 32, depth {depth}, {norm} norm) in place of {said}")
        assert_same_logits(theirs, hald.model_from_weights(weights, 10, size, "teacher"), size)
    ours = hald.build_model(found, 10, size)  # the name found builds that ConvNet, and a file in hald.py's names loads with no note
    torch.save(ours.state_dict(), tmp_path / "own.pt")
    notes = []
    assert hald.read_weights(tmp_path / "own.pt", found, "teacher", notes.append)["arch"] == found and not notes
    assert sum(isinstance(m, torch.nn.Conv2d) for m in ours) == depth and ours[-1].in_features == 32 * (size >> depth) ** 2


def test_depth_in_convnet_names_keeps_the_old_names():
    for name, convs, width, bn in [("convnet", 3, 128, False), ("convnet_bn64", 3, 64, True), ("convnet_d4", 4, 128, False),
                                   ("convnet_bn_d4", 4, 128, True), ("convnet_bn64_d4", 4, 64, True)]:
        model = hald.build_model(name, 10, 64)
        assert [m.out_channels for m in model if isinstance(m, torch.nn.Conv2d)] == [width] * convs, name
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model) == bn and model[-1].in_features == width * (64 >> convs) ** 2
    with pytest.raises(hald.HaldError, match="unknown architecture 'convnet_d0'"):
        hald.torchvision_models("convnet_d0", "--model")


def test_files_of_another_architecture_or_naming_are_still_refused_in_one_line(tmp_path):
    """No naming recognised, or the one recognised for another architecture: today's one-line misfit."""
    torch.save(PoolResNet((2, 2, 2, 2), False).state_dict(), tmp_path / "pool18.pt")
    torch.save(DCConvNet(32, 3, "instance", 32).state_dict(), tmp_path / "dc.pt")
    torch.save({"encoder.weight": torch.zeros(8, 3, 3, 3), "head.weight": torch.zeros(10, 8)}, tmp_path / "random.pt")
    cases = [("pool18.pt", "convnet", "does not fit convnet at 32 px: missing 0.weight, 0.bias, 1.weight and 11 more; unexpected conv1.weight"),
             ("pool18.pt", "resnet50", "does not fit resnet50 at 32 px: missing layer1.0.conv3.weight"),
             ("dc.pt", "resnet18", "does not fit resnet18 at 32 px: missing conv1.weight"),
             ("dc.pt", "convnet", "does not fit convnet32 at 64 px: misshapen (file vs model) 13.weight (10, 512) vs (10, 2048)"),
             ("random.pt", "resnet18", "does not fit resnet18 at 32 px: missing conv1.weight, bn1.weight, bn1.bias and 119 more; unexpected encoder.weight")]
    for file, arch, message in cases:
        size = 64 if "at 64 px" in message else 32
        with pytest.raises(hald.HaldError) as e:
            hald.model_from_weights(hald.read_weights(tmp_path / file, arch, "teacher", lambda *_: None), 10, size, "teacher")
        assert message in str(e.value) and "\n" not in str(e.value), (file, arch, str(e.value))


def test_model_pool_teacher_trains_and_evaluates_end_to_end(tiny, tmp_path, capsys):
    """A model-pool ResNet-18 file (random weights, so without the teacher check) as --teacher with --teacher-arch
    resnet18: the note, a run, the cache fingerprinted as resnet18; and the same file under --evaluate."""
    path = tmp_path / "pool18.pth"
    torch.save({"state_dict": randomized(PoolResNet((2, 2, 2, 2), False, 4)).state_dict()}, path)
    args = tiny_args(tiny, tmp_path / "run", "--teacher", str(path), "--teacher-arch", "resnet18", "--no-check-teacher",
                     "--epochs", "2", "--eval-every", "0", "--drift-crops", "0")
    assert hald.main(args) == 0
    assert f"note: teacher {path}: the CIFAR model-pool ResNet naming (shortcut, linear), renamed to torchvision's" in capsys.readouterr().out
    header = torch.load(tmp_path / "run" / "soft_labels.pt", weights_only=True)["header"]
    assert header["teacher"] == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()} as resnet18"
    assert hald.main(["--evaluate", str(path), "--teacher-arch", "resnet18", "--val", str(tiny["val"])]) == 0
    out = capsys.readouterr().out
    assert f"note: model {path}: the CIFAR model-pool ResNet naming" in out and f"evaluate {path} (resnet18, 16 px)" in out


# ------------------------------------------------------------------------ speed knobs
def test_compile_trains_like_eager(tiny, tmp_path):
    """--compile changes how the student runs, not what it computes (here on the CPU, with inductor)."""
    losses = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / ("compiled" if flags else "eager")
        assert hald.main(tiny_args(tiny, out, "--epochs", "2", "--drift-crops", "0", *flags)) == 0
        losses[flags] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[()] == pytest.approx(losses[("--compile",)], rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_trains_like_eager(tiny, tmp_path):
    summaries = []
    for flags in ((), ("--cuda-graph",)):
        assert hald.main(tiny_args(tiny, tmp_path / str(len(flags)), "--model", "resnet18", *flags)) == 0
        summaries.append(json.loads((tmp_path / str(len(flags)) / "summary.json").read_text()))
    assert summaries[0]["final_top1"] == summaries[1]["final_top1"]


# ---------------------------------------------------------------------------- torchrun
def test_cpu_batchnorm_under_several_processes_is_pointed_out(monkeypatch):
    """On the CPU SyncBatchNorm is not available: a BatchNorm student under torchrun says that it trains
    differently from one process; a student without BatchNorm says nothing."""
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)
    for model, noted in (("convnet_bn8", True), ("convnet8", False)):
        said = []
        hald.build_student(hald.resolve_settings(hald.Config(model=model), 3), 3, 16, torch.device("cpu"), 2, said.append)
        assert any("own BatchNorm statistics" in line for line in said) == noted


def test_torchrun_two_processes_match_one(tiny, tmp_path):
    """torchrun --nproc_per_node=2 on the CPU (gloo) against one process: the soft-label cache is
    byte-identical, the global batch is split (same losses), one summary is written, the teacher
    check's figures are the same, and the sharded evaluation equals a single-process evaluation of
    the saved student. The validation set spans two 500-image batches, so both ranks evaluate."""
    val = write_folder(tmp_path / "val", 4, 130, 16, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process in both runs: same CPU kernels
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        args = tiny_args(tiny, out, "--val", str(val), "--epochs", "3", "--save-model", str(out / "student.pt"))
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
        runs[procs] = subprocess.run([*launch, str(HERE / "hald.py"), *args], capture_output=True, text=True, env=env, timeout=300)
        assert runs[procs].returncode == 0, runs[procs].stderr[-3000:]
    assert (tmp_path / "p1" / "soft_labels.pt").read_bytes() == (tmp_path / "p2" / "soft_labels.pt").read_bytes()
    assert runs[2].stdout.count("final top-1") == 1 and runs[2].stdout.count("soft labels:") == 1  # rank 0 alone speaks
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("p1", "p2")]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    summary, alone = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("p2", "p1"))
    check = ("teacher_agreement", "teacher_top1", "teacher_top5", "teacher_check_val_images")
    assert [summary[k] for k in check] == [alone[k] for k in check]  # the teacher check, its val images shared out
    classes = [f"class{c}" for c in range(4)]
    student, *_ = hald.load_teacher(str(tmp_path / "p2" / "student.pt"), classes, 16)
    assert hald.evaluate(student, hald.load_val(val, classes, 16), torch.device("cpu")) == (summary["final_top1"], summary["final_top5"])
    bad = subprocess.run([*launch, str(HERE / "hald.py"), *tiny_args(tiny, tmp_path / "bad", "--batch-size", "3")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and bad.stderr.count("hald: error: --batch-size 3 is the global batch") == 1  # said once


def test_files_that_some_processes_do_not_see_are_refused(tmp_path):
    """Under torchrun with --out on each node's own disk, each process would decide alone whether to resume and whether
    to reuse the cache: their collectives no longer pair (a hang, or silently wrong training). Two gloo processes, each
    shown its own file: both answer alike where both or neither exist, and both refuse where only one does."""
    script = tmp_path / "ranks.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(HERE)!r})\nfrom pathlib import Path\nimport torch, hald\n"
                      "device, rank, world = hald.init_distributed(torch.device('cpu'))\n"
                      "said = []  # into a file per rank: the launcher interleaves the processes' output\n"
                      "for name in sys.argv[1:]:\n"
                      "    try:\n        said.append(f'{rank} {Path(name).name} {hald.seen_alike(Path(name + str(rank)), device, world)}')\n"
                      "    except hald.HaldError as e:\n        said.append(f'{rank} {Path(name).name} refused: {e}')\n"
                      "Path(sys.argv[1]).with_name(f'said{rank}').write_text('\\n'.join(said))\n"
                      "torch.distributed.destroy_process_group()\nos._exit(0)\n")
    for name in ("both0", "both1", "one0"):
        (tmp_path / name).touch()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                          *(str(tmp_path / name) for name in ("both", "none", "one"))],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = sorted((tmp_path / "said0").read_text().splitlines() + (tmp_path / "said1").read_text().splitlines())
    assert lines[:2] == ["0 both True", "0 none False"] and lines[3:5] == ["1 both True", "1 none False"]
    for rank in (0, 1):
        assert f"{rank} one refused: {tmp_path / 'one'}{rank} exists for 1 of the 2 processes: put --out" in lines[2 + 3 * rank]


# --------------------------------------------------------------------------- copy-paste
def readme_copy_table() -> dict:
    """The README's copy table: piece -> (names, lines stated, import statements)."""
    text = (HERE / "README.md").read_text()
    table = text[text.index("<!-- copy table -->"):text.index("<!-- end of copy table -->")]
    rows = {}
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]  # "the names of *crops*": that row's names too
        names = [n for row in re.findall(r"\*([\w -]+)\*", cells[1]) for n in rows[row][0]] + re.findall(r"`(\w+)`", cells[1])
        rows[cells[0]] = (sorted(set(names)), int(cells[3]), re.findall(r"`([^`]+)`", cells[2]))
    return rows


def globals_used(code) -> set:
    """The global names a compiled piece of code (and every function inside it) loads."""
    import dis

    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    return names.union(*(globals_used(c) for c in code.co_consts if hasattr(c, "co_code")))


def lift(names: list, imports: list):
    """The named top-level definitions taken out of hald.py's source as text, executed in a fresh namespace that holds
    only the import statements given (each one of hald.py's: the standard library and torch) and them; returns the
    namespace, their line count and the import statements of hald.py's that they use."""
    import builtins

    source = (HERE / "hald.py").read_text()
    tree = ast.parse(source)

    def name_of(node):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return node.name
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id

    lines = source.splitlines()
    chosen = [n for n in tree.body if name_of(n) in names]
    assert sorted({name_of(n) for n in chosen}) == sorted(set(names)), "a name of the table is not defined at the top of hald.py"
    spans = [(min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]), n.end_lineno) for n in chosen]
    pasted = "\n\n".join("\n".join(lines[a - 1:b]) for a, b in spans)
    ours = {alias.asname or alias.name.split(".")[0]: ast.get_source_segment(source, n) for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom)) for alias in n.names}  # bound name -> its statement
    assert set(imports) <= set(ours.values()), f"{sorted(set(imports) - set(ours.values()))} are not hald.py's imports"
    assert all(m.split(".")[0] in sys.stdlib_module_names | {"torch"} for m in re.findall(r"^(?:from|import) ([\w.]+)", "\n".join(imports), re.M))
    namespace = {"__name__": "pasted"}
    exec(compile("\n".join(imports) + "\n\n" + pasted, "pasted.py", "exec"), namespace)  # no `from __future__ import annotations`

    used = globals_used(compile(pasted, "pasted.py", "exec"))
    missing = used - set(namespace) - set(dir(builtins))
    assert not missing, f"the pasted names need {sorted(missing)} too: add them (or their imports) to the README's copy table"
    return namespace, sum(b - a + 1 for a, b in spans), sorted({ours[n] for n in used if n in ours}, key=list(ours.values()).index)


def use_crops(p, g):
    boxes, flips = p["sample_crops"](5, 20, 24, g)
    images = torch.rand(5, 3, 20, 24)
    crops = p["crop_resize"](images, boxes, flips, 8)
    assert crops.shape == (5, 3, 8, 8) and torch.equal(crops, hald.crop_resize(images, boxes, flips, 8))


def use_cutmix(p, g):
    box = p["sample_cutmix_boxes"](1, 16, 16, g)[0]
    images = torch.rand(4, 3, 16, 16)
    mixed = p["paste_cutmix_"](images.clone(), torch.arange(3, -1, -1), box)
    assert torch.equal(mixed, hald.paste_cutmix_(images.clone(), torch.arange(3, -1, -1), box))
    assert p["cutmix_lambda"](box, 16, 16) == hald.cutmix_lambda(box, 16, 16)


def use_losses(p, g):
    logits, probs, labels = torch.randn(4, 6, generator=g), F.softmax(torch.randn(4, 6, generator=g), 1), torch.tensor([0, 5, 2, 2])
    targets = p["mixed_targets"](labels, 6, 0.8, torch.arange(3, -1, -1), 0.7)
    assert torch.equal(targets, hald.mixed_targets(labels, 6, 0.8, torch.arange(3, -1, -1), 0.7))
    assert torch.equal(p["hard_loss"](logits, targets), hald.hard_loss(logits, targets))
    assert torch.equal(p["hybrid_loss"](logits, probs, 4.0, logits, targets, 0.5), hald.hybrid_loss(logits, probs, 4.0, logits, targets, 0.5))
    with pytest.raises(ValueError):
        p["smooth_one_hot"](labels, 6, 1.0)


def use_schedule(p, g):
    assert p["build_schedule"]("shs", 300) == [("soft", 75), ("hard", 150), ("soft", 75)]
    assert p["build_schedule"]("alt-soft-n", 10, 5, 3) == hald.build_schedule("alt-soft-n", 10, 5, 3)
    assert p["lr_at"](150, 1e-3, 300, 2) == hald.lr_at(150, 1e-3, 300, 2)
    assert sorted(p["draw_soft_batches"]([], 7, 7, g)) == list(range(7))


def tiny_setup():
    torch.manual_seed(0)
    return hald.build_model("convnet_bn8", 5, 16), torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8), torch.arange(5).repeat(2)


def use_cache(p, g):
    teacher, images, _ = tiny_setup()
    args = dict(size=16, crops_per_image=2, batch_size=4, temperature=4.0, log=lambda *_: None)
    pasted = p["SoftLabelCache"].build(teacher, images, gen=torch.Generator().manual_seed(3), **args)
    ours = hald.SoftLabelCache.build(teacher, images, gen=torch.Generator().manual_seed(3), **args)
    assert torch.equal(pasted.probs, ours.probs) and len(pasted) == 6
    assert all(torch.equal(a, b) for a, b in zip(pasted.batch(5, images)[:2], ours.batch(5, images)[:2]))


def use_epoch(p, g):
    teacher, images, labels = tiny_setup()
    trained = []
    for space in (p, vars(hald)):
        cache = space["SoftLabelCache"].build(teacher, images, size=16, crops_per_image=1, batch_size=4, temperature=4.0,
                                              gen=torch.Generator().manual_seed(0), log=lambda *_: None)
        torch.manual_seed(1)
        net = hald.build_model("convnet8", 5, 16)
        opt, pool = torch.optim.AdamW(net.parameters(), 1e-3), []
        gens = {"pool": torch.Generator().manual_seed(1), "hard": torch.Generator().manual_seed(2)}
        for phase in ("soft", "hard", "hybrid"):
            space["run_epoch"](phase, net, opt, images, labels, 5, gens, cache, pool, batch_size=4, temperature=4.0, smoothing=0.1)
        trained.append(torch.cat([v.flatten() for v in net.state_dict().values()]))
    assert torch.equal(*trained)


def use_cache_file(p, g, tmp_path):
    teacher, images, _ = tiny_setup()
    cache = hald.SoftLabelCache.build(teacher, images, size=16, crops_per_image=1, batch_size=4, temperature=4.0, gen=g, log=lambda *_: None)
    header = p["cache_header"](classes=list("abcde"), num_images=10, passes=1, image_size=16, batch_size=4, cutmix=True, temperature=4.0,
                               seed=0)
    assert header == hald.cache_header(classes=list("abcde"), num_images=10, passes=1, image_size=16, batch_size=4, cutmix=True,
                                       temperature=4.0, seed=0) and len(header["fingerprint"]) == 64
    p["save_cache"](cache, p["compact_labels_"](cache, 3, 8), header, tmp_path / "c.pt")
    loaded = hald.load_cache(tmp_path / "c.pt", header)  # the pasted writer and hald.py's reader agree
    assert torch.equal(loaded.probs, cache.probs) and torch.equal(p["load_cache"](tmp_path / "c.pt", header).probs, cache.probs)


USES = {"crops": use_crops, "CutMix": use_cutmix, "losses": use_losses, "schedule": use_schedule, "soft-label cache": use_cache,
        "epoch loop": use_epoch, "cache file": use_cache_file}


def test_the_readme_says_how_long_the_whole_hald_loop_is():
    """The README's line count of the epoch loop and the schedule together (their names and imports lifted as one)."""
    rows, stated = readme_copy_table(), re.search(r"The whole HALD loop \(the \*epoch loop\* and the \*schedule\*\) is (\d+) lines",
                                                  (HERE / "README.md").read_text())
    names, imports = rows["epoch loop"][0] + rows["schedule"][0], rows["epoch loop"][2] + rows["schedule"][2]
    assert stated and lift(sorted(set(names)), list(dict.fromkeys(imports)))[1] == int(stated[1])


@pytest.mark.parametrize("piece", list(USES))
def test_every_row_of_the_readme_copy_table_runs_alone(piece, tmp_path):
    rows = readme_copy_table()
    assert set(rows) == set(USES), "every row of the README's copy table is tested here, and only those"
    names, stated, imports = rows[piece]
    pasted, lines, used = lift(names, imports)
    assert lines == stated, f"the README says {stated} lines for {piece}, the names take {lines}: update the table"
    assert imports == used, f"{piece} imports {used}, the README lists {imports}: update the table"
    g = torch.Generator().manual_seed(0)
    USES[piece](pasted, g, tmp_path) if piece == "cache file" else USES[piece](pasted, g)


def test_part_one_alone_is_the_whole_method_and_runs_the_copy_table_examples(tmp_path):
    """Part I of hald.py, lifted alone under hald.py's imports (the standard library and torch), needs no name of Part II
    (no file reading, no Config, no CLI), stays within 600 lines, and runs every copy-table example but the cache file's."""
    import builtins

    source = (HERE / "hald.py").read_text()
    start, end = source.index("\n", source.index("Part I: the method")), source.index("# ====", source.index("Part I: the method"))
    part = source[start:end]
    assert part.count("\n") <= 600, f"Part I is {part.count(chr(10))} lines, over its 600"
    imports = "\n".join(line for line in source[:start].splitlines() if line.startswith(("import ", "from ")))
    namespace = {"__name__": "part_one"}
    exec(compile(imports + "\n" + part, "part_one.py", "exec"), namespace)

    assert not globals_used(compile(part, "part_one.py", "exec")) - set(namespace) - set(dir(builtins))
    tree = ast.parse(part)  # no file, no Config, no command line: tensors in, tensors out (log=print: a progress callback)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"Config", "Path", "open", "sys", "argparse", "os", "torch.load", "torch.save"}
    for piece, use in USES.items():
        if piece != "cache file":
            use(namespace, torch.Generator().manual_seed(0))


def test_hald_py_stays_within_its_line_budget():
    """hald.py within its ceiling of 1,900 lines (Part I's 600 are checked above): what a change adds, it pays for."""
    assert len((HERE / "hald.py").read_text().splitlines()) <= 1900


def test_the_example_trains_a_torchvision_model_with_the_pieces():
    run = subprocess.run([sys.executable, str(HERE / "examples" / "hald_in_your_loop.py"), "--epochs", "4"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    phases = re.findall(r"^epoch \d+/4 (\w+) loss ([\d.]+)$", run.stdout, re.M)
    assert [p for p, _ in phases] == ["soft", "hard", "hard", "soft"] and all(math.isfinite(float(v)) for _, v in phases)
    assert re.search(r"^top-1 [\d.]+ %, top-5 [\d.]+ % on the 10-class demo", run.stdout, re.M)


def test_pip_install_gives_the_module_and_a_hald_command(tmp_path, capsys, monkeypatch):
    """pyproject.toml installs hald.py as a module with a `hald` command (hald.main); installed, without the checkout's
    demo beside it, a run without --data says what to give."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((HERE / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["py-modules"] == ["hald"] and project["project"]["scripts"] == {"hald": "hald:main"}
    names = lambda specs: {re.split(r"[<>=]", d)[0] for d in specs}  # noqa: E731
    assert names(project["project"]["dependencies"]) <= names((HERE / "requirements.txt").read_text().split())
    monkeypatch.setattr(hald, "DEMO", tmp_path / "not-installed")
    assert hald.main(["--out", str(tmp_path / "out")]) == 2
    assert "--data is missing" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing", ["checkpoint.pt", "soft_labels.pt", "summary.json", "metrics.jsonl"])
def test_a_full_disk_ends_in_one_line_and_the_run_resumes(tiny, tmp_path, capsys, monkeypatch, failing):
    """Every write of the CLI goes through atomic_path: a write that fails (here: the rename of the second write of
    `failing`, as a full disk fails it) stops the run with exit 2 and one line naming the file, and keeps what was
    written before; --resume then finishes the run."""
    import errno

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == failing and calls.count(failing) == (1 if failing in ("soft_labels.pt", "summary.json") else 2):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(hald.os, "replace", replace)
    assert hald.main(tiny_args(tiny, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write {tmp_path / 'out' / failing} (No space left on device)" in err, err
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary file left behind
    monkeypatch.setattr(hald.os, "replace", real)
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--resume")) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["final_top1"] >= 0
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 4


# ---------------------------------------------------------------- the authors' pipeline: ensembles, precision
def test_an_ensemble_of_one_teacher_twice_gives_its_labels_and_two_give_the_weighted_sum():
    torch.manual_seed(0)
    a, b = hald.build_model("convnet_bn8", 5, 16).eval(), hald.build_model("convnet_bn8", 5, 16).eval()
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    build = lambda t: hald.SoftLabelCache.build(t, images, size=16, crops_per_image=2, batch_size=4, temperature=4.0,  # noqa: E731
                                                 gen=torch.Generator().manual_seed(0), log=lambda *_: None).probs
    torch.testing.assert_close(build(hald.TeacherEnsemble([a, a])), build(a), atol=1e-3, rtol=0)  # fp16 storage
    x = hald.normalize(images)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64).div(10).softmax(0)  # the authors' weighting of given weights
    with torch.no_grad():
        torch.testing.assert_close(hald.TeacherEnsemble([a, b], [1.0, 3.0])(x), float(w[0]) * a(x) + float(w[1]) * b(x))
        torch.testing.assert_close(hald.TeacherEnsemble([a, b])(x), (a(x) + b(x)) / 2)


def test_an_ensemble_trains_end_to_end_with_every_teacher_checked(tiny, tmp_path, capsys):
    out = tmp_path / "ens"
    assert hald.main(tiny_args(tiny, out, "--teacher", f"{tiny['teacher']},{tiny['teacher']}", "--teacher-weights", "1,2")) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"teacher check of {tiny['teacher']}:") == 2 and "teacher check of the ensemble:" in printed
    header = torch.load(out / "soft_labels.pt", weights_only=True)["header"]
    assert header["teacher"].count("sha256:") == 2 and "weighted [1.0, 2.0]" in header["teacher"]


@pytest.mark.parametrize("extra, message", [
    (["--teacher-weights", "1,2"], "--teacher-weights 1,2 must be one finite number per --teacher (1 comma-separated)"),
    (["--teacher-weights", "1,x"], "must be one finite number per --teacher"),
    (["--teacher-weights", "nan"], "must be one finite number per --teacher"),
])
def test_bad_teacher_weights_are_refused_in_one_line(tiny, tmp_path, capsys, extra, message):
    assert hald.main(tiny_args(tiny, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_ensemble_teachers_of_other_class_counts_are_refused(tiny, tmp_path, capsys):
    other = tmp_path / "other.pt"
    hald.save_checkpoint(hald.build_model("convnet_bn8", 3, 16), "convnet_bn8", list("abc"), 16, other)
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--teacher", f"{tiny['teacher']},{other}")) == 2
    err = capsys.readouterr().err
    assert "has 4 classes" in err or "3 classes" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out" / "soft_labels.pt").exists()


def test_precision_is_bf16_or_fp32_on_cuda_and_fp32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: kwargs["enabled"])  # torch turns CUDA autocast off without CUDA
    assert hald.autocast(torch.device("cuda"), "bf16") and not hald.autocast(torch.device("cuda"), "fp32")
    assert not hald.autocast(torch.device("cpu"), "bf16")  # the CPU always computes in fp32
    assert hald.parse_config(["--precision", "fp32"]).precision == "fp32"


def test_normalize_is_recorded_and_a_checkpoint_brings_its_own(tiny, tmp_path, capsys):
    """A student saved with --normalize cifar10 is evaluated with CIFAR-10's statistics by --evaluate without the flag, and
    as a teacher it labels with them whatever the run's --normalize; older checkpoints (no statistics) mean ImageNet's."""
    student = tmp_path / "student.pt"
    assert hald.main(tiny_args(tiny, tmp_path / "s", "--schedule", "hard", "--normalize", "cifar10", "--save-model", str(student))) == 0
    saved = torch.load(student, weights_only=True)
    assert (tuple(saved["mean"]), tuple(saved["std"])) == hald.NORMALIZATIONS["cifar10"]
    assert hald.main(["--evaluate", str(student), "--val", str(tiny["val"]), "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert (tuple(result["mean"]), tuple(result["std"])) == hald.NORMALIZATIONS["cifar10"]
    assert result["top1"] == json.loads((tmp_path / "s" / "summary.json").read_text())["final_top1"]
    model, _, _, stats = hald.load_teacher(str(student), [f"class{c}" for c in range(4)], 16, hald.NORMALIZATIONS["none"])
    assert stats == hald.NORMALIZATIONS["cifar10"]  # the checkpoint's own wins over the run's
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in saved.items() if k not in ("mean", "std")}, old)
    assert hald.load_teacher(str(old), [f"class{c}" for c in range(4)], 16, hald.NORMALIZATIONS["none"])[3] == hald.NORMALIZATIONS["imagenet"]
    # a run with --normalize none labels with the teacher's statistics: its cache equals one of a run with cifar10
    caches = []
    for norm in ("none", "cifar10"):
        out = tmp_path / f"t-{norm}"
        assert hald.main(tiny_args(tiny, out, "--teacher", str(student), "--normalize", norm, "--no-check-teacher", "--epochs", "1",
                                "--schedule", "soft")) == 0
        caches.append(torch.load(out / "soft_labels.pt", weights_only=True)["labels"]["values"])
    assert torch.equal(*caches)
    with pytest.raises(hald.HaldError, match="--normalize 'imagenet2'"):
        hald.mean_std_of("imagenet2")
    # one rule for training, tensor sets and --evaluate: --recipe's statistics unless --normalize says otherwise
    assert [hald.normalization(hald.Config(recipe=r, normalize=n)) for r, n in
            (("cifar100", "imagenet"), ("cifar100", "cifar10"), ("none", "imagenet"))] == ["cifar100", "cifar10", "imagenet"]


# ----------------------------------------------------------------------- nothing silently wrong
def test_an_out_on_a_file_system_without_locks_trains_with_a_note(tiny, tmp_path, capsys, monkeypatch):
    """Lustre mounted without flock answers ENOSYS: the run trains and says its --out is unguarded (not "in use")."""
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert hald.main(tiny_args(tiny, tmp_path / "run", "--epochs", "1", "--schedule", "hard", "--drift-crops", "0")) == 0
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'run'} cannot be locked (Function not implemented)" in out and (tmp_path / "run" / "summary.json").exists()


def test_sigterm_stops_like_ctrl_c_and_one_run_holds_an_out(tiny, tmp_path, capsys):
    """SIGTERM (a scheduler's preemption): one line with the resume command, exit 143, no temporary file; while the run
    lives a second run on its --out is refused naming it; a temporary file of a killed run is gone once the next starts."""
    args = tiny_args(tiny, tmp_path / "run", "--epochs", "300", "--eval-every", "100", "--drift-crops", "0")
    proc = subprocess.Popen([sys.executable, str(HERE / "hald.py"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    assert hald.main([*args, "--resume"]) == 2
    assert f"is in use by the run of process {proc.pid} on " in capsys.readouterr().err
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and err.count("\n") == 1 and err.startswith("hald: stopped by SIGTERM; to continue from the last "
                                                                              "finished epoch: ") and err.rstrip().endswith("--resume"), err
    assert not list((tmp_path / "run").glob(".*.tmp"))
    (tmp_path / "run" / ".checkpoint.pt.999999.tmp").write_bytes(b"half")  # what a kill -9 during a write leaves
    assert hald.main([*args, "--resume", "--schedule", "hard", "--epochs", "1"]) == 2  # refused (other settings) before the claim
    assert (tmp_path / "run" / ".checkpoint.pt.999999.tmp").exists()
    assert hald.main([*args, "--overwrite", "--schedule", "hard", "--epochs", "1"]) == 0  # the next run claims the folder
    assert not (tmp_path / "run" / ".checkpoint.pt.999999.tmp").exists()
    killed = subprocess.Popen([sys.executable, str(HERE / "hald.py"), *args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while killed.poll() is None and not (tmp_path / "killed" / "checkpoint.pt").exists():
        time.sleep(0.01)
    killed.kill()  # SIGKILL: no handler runs, the lock goes with the process
    killed.wait()
    capsys.readouterr()
    assert hald.main([*args, "--out", str(tmp_path / "killed"), "--resume", "--seed", "5"]) == 2
    err = capsys.readouterr().err  # not "in use": refused for its checkpoint's seed
    assert "in use" not in err and "belongs to a run with other settings (--seed 0 then, 5 now)" in err


def test_write_problems_are_one_line_before_any_work(tiny, tmp_path, capsys):
    """--out naming a file, and an unwritable --save-model place, refused at start: no teacher check, no relabel."""
    (tmp_path / "file").write_text("x")
    for extra in (["--out", str(tmp_path / "file")], ["--save-model", str(tmp_path / "file" / "student.pt")]):
        assert hald.main(tiny_args(tiny, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr()
        assert err.err.count("\n") == 1 and ("is a file" in err.err or "cannot write" in err.err) and "teacher check" not in err.out
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder behind
    with pytest.raises(hald.HaldError, match="cannot write"):  # the atomic write's cleanup does not hide its message
        hald.save_atomic("text", tmp_path / "file" / "summary.json")


def test_a_refused_resume_names_the_settings_that_differ(tiny, tmp_path, capsys):
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", "hard")) == 0
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", "hard", "--lr", "0.5", "--seed", "3", "--resume")) == 2
    assert "belongs to a run with other settings (--lr 0.001 then, 0.5 now; --seed 0 then, 3 now)" in capsys.readouterr().err


def test_non_finite_teachers_and_caches_are_named_where_they_arise(tiny, tmp_path, capsys):
    """A teacher with one NaN weight (with or without the teacher check), one whose outputs overflow, a cache file of NaN
    labels: each one line naming it, nothing stored; a runaway --lr is said once and the run ends."""
    blob = torch.load(tiny["teacher"], weights_only=True)
    blob["state_dict"] = {k: v.clone() for k, v in blob["state_dict"].items()}
    blob["state_dict"]["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(blob, tmp_path / "nan.pt")
    for extra in ([], ["--no-check-teacher"]):
        assert hald.main(tiny_args(tiny, tmp_path / "out", "--teacher", str(tmp_path / "nan.pt"), *extra)) == 2
        err = capsys.readouterr().err
        assert "holds NaN or infinite weights (0.weight)" in err and "class order" not in err
    head = [k for k in blob["state_dict"] if k.endswith(".weight")][-1]
    blob["state_dict"]["0.weight"][0, 0, 0, 0] = 0.0
    blob["state_dict"][head].fill_(3e38)  # finite weights, infinite logits: the teacher check names them
    torch.save(blob, tmp_path / "overflow.pt")
    assert hald.main(tiny_args(tiny, tmp_path / "out", "--teacher", str(tmp_path / "overflow.pt"))) == 2
    err = capsys.readouterr().err
    assert "the teacher's outputs hold NaN or infinite values" in err and "class order" not in err
    assert not (tmp_path / "out").exists()
    teacher, images, _ = tiny_setup()
    with torch.no_grad():
        teacher[-1].weight.fill_(3e38)  # finite weights, infinite logits
    with pytest.raises(hald.HaldError, match="the teacher's outputs hold NaN or infinite values"):
        hald.SoftLabelCache.build(teacher, images, size=16, crops_per_image=1, batch_size=4, temperature=4.0, gen=torch.Generator())
    assert hald.main(tiny_args(tiny, tmp_path / "a")) == 0
    cache = torch.load(tmp_path / "a" / "soft_labels.pt", weights_only=True)
    cache["labels"]["values"][0, 0] = float("nan")
    cache["header"]["sha256"] = hald.tensors_digest({k: cache[k] for k in hald.CACHE_TENSORS})
    torch.save(cache, tmp_path / "a" / "soft_labels.pt")
    assert hald.main(tiny_args(tiny, tmp_path / "a", "--overwrite")) == 2
    assert "soft_labels.pt hold NaN or infinite values: pass --rebuild-cache" in capsys.readouterr().err
    assert hald.main(tiny_args(tiny, tmp_path / "lr", "--lr", "100", "--schedule", "hard", "--label-smoothing", "0")) == 0
    out = capsys.readouterr().out
    assert out.count("warning: the loss in epoch 1 (") == 1 and "training is running away" in out
    assert json.loads((tmp_path / "lr" / "summary.json").read_text())["warnings"][0].startswith("the loss in epoch 1")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["warnings"] == []  # a run that learns: none


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_and_other_modes_named(tmp_path, mode):
    value = 128 * 257  # mid-grey in 16 bits
    grey = np.full((4, 5), value, dtype=np.uint16)
    path = tmp_path / ("grey.png" if mode == "I;16" else "grey.tif")  # a 16-bit PNG; a 32-bit integer TIFF of 16-bit values
    (Image.fromarray(grey) if mode == "I;16" else Image.fromarray(grey.astype(np.int32))).save(path)
    assert Image.open(path).mode == mode
    assert hald.decode_image(path, 0).unique().tolist() == [128]
    Image.fromarray(np.full((4, 5), 0.5, dtype=np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(hald.HaldError, match=r"float.tif \(mode F, which hald.py does not read as colours"):
        hald.decode_image(tmp_path / "float.tif", 0)


def test_the_cache_checks_its_images_and_keeps_its_statistics():
    teacher, images, _ = tiny_setup()
    build = dict(size=16, crops_per_image=1, batch_size=4, temperature=4.0)
    for bad, message in ((images.permute(0, 2, 3, 1), r"\(10, 16, 16, 3\) torch.uint8: channels first"),
                         (images.long(), "torch.int64"), (images.float(), "values from 0 to 255: divide 0-255 values by 255")):
        with pytest.raises(hald.HaldError, match=message):
            hald.SoftLabelCache.build(teacher, bad, gen=torch.Generator(), **build)
    cifar = hald.NORMALIZATIONS["cifar10"]
    cache = hald.SoftLabelCache.build(teacher, images, gen=torch.Generator().manual_seed(0), mean=cifar[0], std=cifar[1], **build)
    assert (cache.temperature, cache.mean, cache.std) == (4.0, *cifar)
    assert torch.equal(cache.batch(1, images)[0], cache.batch(1, images, *cifar)[0])  # its own statistics by default
    assert not torch.equal(cache.batch(1, images)[0], cache.batch(1, images, *hald.NORMALIZATIONS["imagenet"])[0])  # a student's own
    with pytest.raises(hald.HaldError, match="made from 10 images, not 9"):
        cache.batch(0, images[:9])


@pytest.mark.parametrize("switch", ["keep", "reset", "t2", "warmup"])
def test_phase_switch_does_what_it_says(tiny, tmp_path, monkeypatch, switch):
    """--phase-switch: AdamW's state at the start of each epoch (reset and warmup: empty at each switch only), the soft
    loss's T^2 factor (t2: in the soft phases only) and the LR warm-up (warmup: --warmup-steps); keep is the authors'."""
    seen, run_epoch = [], hald.run_epoch

    def recording(phase, net, opt, *args, **kwargs):
        seen.append((phase, len(opt.state), kwargs["t2"], kwargs["warmup"]))
        return run_epoch(phase, net, opt, *args, **kwargs)

    monkeypatch.setattr(hald, "run_epoch", recording)
    assert hald.main(tiny_args(tiny, tmp_path, "--schedule", "soft:2,hard:2,soft:2", "--epochs", "6", "--phase-switch", switch)) == 0
    assert [phase for phase, *_ in seen] == ["soft"] * 2 + ["hard"] * 2 + ["soft"] * 2
    assert [s[1] > 0 for s in seen] == [False, True] + ([False, True] * 2 if switch in ("reset", "warmup") else [True] * 4)
    assert [s[2:] for s in seen] == [(switch == "t2", hald.Config.warmup_steps * (switch == "warmup"))] * 6


def test_warmup_ramps_the_lr_over_adamws_first_steps_of_an_empty_state():
    """run_epoch(warmup=W): step k (1-based) of an empty AdamW state at k / W of the epoch's LR, then the LR itself; after
    begin_epoch clears the state at a switch the ramp starts again; warmup 0 leaves the LR alone."""
    torch.manual_seed(0)
    images, labels, gens = torch.rand(12, 3, 8, 8), torch.arange(12) % 3, {"pool": torch.Generator(), "hard": torch.Generator()}
    net = hald.convnet(3, 8, width=4, depth=1)
    opt, used = torch.optim.AdamW(net.parameters(), lr=1.0), []
    opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
    phases = ["hard"] * 2 + ["soft"] + ["hard"] * 2  # 3 steps an epoch (12 images, batch 4)
    cache = hald.SoftLabelCache.build(net, images, size=8, crops_per_image=1, batch_size=4, temperature=4.0, gen=torch.Generator())
    for epoch in range(5):
        phase = hald.begin_epoch(opt, epoch, phases, lr=1.0, eta=1e9, phase_switch="warmup")  # eta 1e9: the LR stays 1.0
        hald.run_epoch(phase, net, opt, images, labels, 3, gens, cache, [], batch_size=4, temperature=4.0, warmup=0 if epoch == 3 else 4)
    ramp = [1 / 4, 2 / 4, 3 / 4, 1, 1, 1]
    assert used == pytest.approx(ramp + ramp[:3] + [1.0] * 6)  # the soft epoch starts again; epoch 4 (warmup 0) does not


@pytest.mark.parametrize("name", ["SIGHUP", "SIGUSR1", "SIGXCPU"])
def test_other_stop_signals_stop_like_sigterm(tiny, tmp_path, capsys, monkeypatch, name):
    """Schedulers' other signals (Slurm's --signal=USR1, SGE's SIGXCPU) and a closed terminal: the same one line, exit
    128 + the signal's number, a resumable checkpoint; the handlers are put back after."""
    number, run_epoch, before = getattr(signal, name), hald.run_epoch, signal.getsignal(getattr(signal, name))

    def signalled(*args, **kwargs):
        loss = run_epoch(*args, **kwargs)
        if len(json.loads("[" + ",".join((tmp_path / "metrics.jsonl").read_text().splitlines()) + "]")) == 1:
            os.kill(os.getpid(), number)  # during epoch 2
        return loss

    monkeypatch.setattr(hald, "run_epoch", signalled)
    assert hald.main(tiny_args(tiny, tmp_path, "--epochs", "6")) == 128 + number
    assert capsys.readouterr().err.startswith(f"hald: stopped by {name}; to continue from the last finished epoch: ")
    assert 1 <= torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] <= 2 and signal.getsignal(number) == before


# ------------------------------------------------------------------------------ the checks, one per kind of input
# Property tests of the validators of Part II (and Part I's check_images, check_finite): generated bad inputs of each kind
# raise a HaldError naming the problem; valid ones pass.
ints, NONFINITE = st.integers, st.sampled_from([math.nan, math.inf, -math.inf])
FLOAT_DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])


def fl(lo=None, hi=None, xlo=False, xhi=False):
    return st.floats(lo, hi, exclude_min=xlo, exclude_max=xhi, allow_nan=False, allow_infinity=False)


def poke(t, data, values):
    """t with one element, at a drawn position, set to a drawn value."""
    t.view(-1)[data.draw(ints(0, t.numel() - 1))] = data.draw(values)
    return t


# each flag's range, written again from its help (not read from FLAG_RANGES): values outside it, and inside, edges first
E, AUTO, BIG = st.sampled_from, st.just(-1), 10 ** 6
BAD = {"ipc": ints(max_value=0), "image_size": E([-1, 1, 7]) | ints(max_value=7).filter(bool), "slc": ints(max_value=0),
       "temperature": E([0.0, -0.5, -2.0]) | fl(hi=0).filter(lambda v: v != -1), "crop_scale": E([0.0, 1 + 1e-9]) | fl(hi=0) | fl(1, xlo=True),
       "label_topk": ints(max_value=-1), "epochs": ints(max_value=0), "soft_epochs": ints(max_value=-2),
       "label_smoothing": E([1.0, -1e-9, -2.0]) | fl(hi=0, xhi=True).filter(lambda v: v != -1) | fl(1), "hybrid_lambda": E([-1e-9]) | fl(hi=0, xhi=True),
       "batch_size": E([1, 0]) | ints(max_value=1), "lr": E([0.0, -2.0]) | fl(hi=0).filter(lambda v: v != -1), "weight_decay": E([-1e-9]) | fl(hi=0, xhi=True),
       "eta": E([0.0, -2.0]) | fl(hi=0).filter(lambda v: v != -1), "seed": ints(max_value=-1), "eval_every": ints(max_value=-1),
       "drift_crops": ints(max_value=-1), "warmup_steps": ints(max_value=0)}
GOOD = {"ipc": ints(1, BIG), "image_size": E([0, 8]) | ints(8, BIG), "slc": ints(1, BIG), "temperature": fl(0, BIG, xlo=True) | AUTO,
        "crop_scale": E([1.0, 5e-324]) | fl(0, 1, xlo=True), "label_topk": ints(0, BIG), "epochs": ints(1, BIG),
        "soft_epochs": E([0, 300]) | ints(0, 300) | AUTO, "label_smoothing": E([0.0, 1 - 1e-9]) | fl(0, 1, xhi=True) | AUTO,
        "hybrid_lambda": E([0.0]) | fl(0, BIG), "batch_size": E([2]) | ints(2, BIG), "lr": fl(0, BIG, xlo=True) | AUTO,
        "weight_decay": E([0.0]) | fl(0, BIG), "eta": fl(0, BIG, xlo=True) | AUTO, "seed": ints(0, BIG), "eval_every": ints(0, BIG),
        "drift_crops": ints(0, BIG), "warmup_steps": ints(1, BIG)}
TYPES = {f.name: f.type for f in dataclasses.fields(hald.Config)}


def test_every_ranged_flag_is_covered_and_the_defaults_pass():
    """BAD and GOOD cover exactly FLAG_RANGES, each a numeric Config field; Config() passes check_flags."""
    assert set(BAD) == set(GOOD) == set(hald.FLAG_RANGES) and all(TYPES[k] in (int, float) for k in BAD)
    hald.check_flags(hald.Config())


@pytest.mark.parametrize("name", sorted(BAD))
@given(data=st.data())
def test_each_flag_in_and_out_of_range(name, data):
    """A flag in its range passes alone; out of it (or NaN / inf for a float flag) it is refused, naming the flag."""
    hald.check_flags(hald.Config(**{name: data.draw(GOOD[name])}))
    value = data.draw(BAD[name] | (NONFINITE if TYPES[name] is float else st.nothing()))
    with pytest.raises(hald.HaldError, match=f"^--{name.replace('_', '-')} must be "):
        hald.check_flags(hald.Config(**{name: value}))


@given(given_flags=st.fixed_dictionaries({}, optional=GOOD))
def test_in_range_flags_pass(given_flags):
    """In-range values of any flags together pass (--soft-epochs kept at most --epochs)."""
    if given_flags.get("soft_epochs", -1) > given_flags.get("epochs", 300):
        given_flags["soft_epochs"] = given_flags.get("epochs", 300)
    hald.check_flags(hald.Config(**given_flags))


@given(epochs=ints(1, 1000), more=ints(1, 1000), name=st.sampled_from([f.name for f in dataclasses.fields(hald.Config) if f.metadata["choices"]]))
def test_soft_epochs_above_epochs_and_unknown_choices_are_named(epochs, more, name):
    """--soft-epochs above --epochs is refused naming both; a value outside a flag's choices is refused naming the flag."""
    with pytest.raises(hald.HaldError, match=f"^--soft-epochs {epochs + more} must be at most --epochs {epochs}"):
        hald.check_flags(hald.Config(epochs=epochs, soft_epochs=epochs + more))
    with pytest.raises(hald.HaldError, match=f"^--{name.replace('_', '-')} must be one of "):
        hald.check_flags(hald.Config(**{name: "no-such-choice"}))


def test_device_cuda_without_cuda_is_refused(monkeypatch):
    """--device cuda without CUDA is refused; with CUDA it passes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(hald.HaldError, match="^--device cuda was asked for but CUDA is not available"):
        hald.check_flags(hald.Config(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hald.check_flags(hald.Config(device="cuda"))


@given(values=st.lists(fl(-BIG, BIG), min_size=6, max_size=6), data=st.data())
def test_normalize_specs(values, data):
    """Six finite numbers with positive stds give (mean, std); a wrong count, a non-finite or non-numeric value or a std <= 0 is named."""
    values[3:] = [abs(v) or 1.0 for v in values[3:]]
    assert hald.mean_std_of(",".join(map(repr, values))) == (tuple(values[:3]), tuple(values[3:]))
    bad = data.draw(st.sampled_from(["count", "nonfinite", "text", "std"]))
    if bad == "count":
        values = data.draw(st.lists(fl(-10, 10), max_size=12).filter(lambda v: len(v) != 6))
    elif bad == "std":
        values[data.draw(ints(3, 5))] = data.draw(st.sampled_from([0.0, -0.0]) | fl(hi=0))
    else:
        values[data.draw(ints(0, 5))] = data.draw(NONFINITE if bad == "nonfinite" else st.sampled_from(["x", "", "1e", "0x1"]))
    spec = ",".join(map(str, values))
    with pytest.raises(hald.HaldError, match="^--normalize .* is neither imagenet, cifar10, cifar100, none nor six finite"):
        hald.check_flags(hald.Config(normalize=spec))
    assert all(hald.mean_std_of(name) == hald.NORMALIZATIONS[name] for name in hald.NORMALIZATIONS)


@given(k=ints(1, 4), data=st.data())
def test_teacher_weights_one_finite_number_per_teacher(k, data):
    """--teacher-weights: k finite numbers for k --teacher entries pass; another count, a non-finite or non-numeric weight is named."""
    teacher, weights = ",".join(f"t{i}.pt" for i in range(k)), data.draw(st.lists(fl(-BIG, BIG), min_size=k, max_size=k))
    hald.check_flags(hald.Config(teacher=teacher, teacher_weights=",".join(map(repr, weights))))
    bad = data.draw(st.sampled_from(["count", "nonfinite", "text"]))
    if bad == "count":
        weights = data.draw(st.lists(fl(-10, 10), min_size=1, max_size=6).filter(lambda w: len(w) != k))
    else:
        weights[data.draw(ints(0, k - 1))] = data.draw(NONFINITE if bad == "nonfinite" else st.sampled_from(["x", " ", "1e", "w1"]))
    with pytest.raises(hald.HaldError, match=rf"^--teacher-weights .* must be one finite number per --teacher \({k} comma-separated\)"):
        hald.check_flags(hald.Config(teacher=teacher, teacher_weights=",".join(map(str, weights))))


@given(seeds=st.lists(ints(0, BIG), min_size=1, max_size=6, unique=True), data=st.data())
def test_seeds(seeds, data):
    """--seeds of different whole numbers passes; a repeat (0,00 too), a non-integer or another separator is refused."""
    hald.check_flags(hald.Config(seeds=",".join(map(str, seeds))))
    words, bad = [str(s) for s in seeds], data.draw(st.sampled_from(["repeat", "token", "separator"]))
    if bad == "repeat":
        words = data.draw(st.permutations(words + [data.draw(st.sampled_from(words)).zfill(data.draw(ints(1, 3)))]))
    elif bad == "token":
        words[data.draw(ints(0, len(words) - 1))] = data.draw(st.sampled_from(["-1", "1.5", "a", "", " 2", "+3", "1e3", "0x1"]))
    spec = data.draw(st.sampled_from([" ", ";", ", ", "-"])).join(words + ["9"]) if bad == "separator" else ",".join(words)
    assume(spec)  # an empty --seeds is no --seeds
    with pytest.raises(hald.HaldError, match="^--seeds takes different whole numbers split by commas"):
        hald.check_flags(hald.Config(seeds=spec))


# ----------------------------------------------------------------------------- image sets
@given(counts=st.lists(ints(0, 20), min_size=1, max_size=8), ipc=ints(0, 10))
def test_class_counts(counts, ipc):
    """The first class with fewer than --ipc images (fewer than 1 for --val, ipc 0) is named; otherwise it passes."""
    classes, short = [f"c{i}" for i in range(len(counts))], [i for i, c in enumerate(counts) if c < max(ipc, 1)]
    if not short:
        return hald.check_class_counts(counts, classes, "the set", ipc, log=lambda line: None)
    why = f"fewer than --ipc {ipc}" if ipc else "and every class of --val is scored"
    with pytest.raises(hald.HaldError, match=f"^class 'c{short[0]}' in the set has {counts[short[0]]} images, {why}"):
        hald.check_class_counts(counts, classes, "the set", ipc, log=lambda line: None)


@given(shape=st.tuples(ints(1, 3), st.just(3), ints(1, 4), ints(1, 4)), seed=ints(0, 2 ** 16), dtype=FLOAT_DTYPES, data=st.data())
def test_check_images_and_check_finite(shape, seed, dtype, data):
    """Float images in [-5, 6] and any uint8 pass; a NaN / inf anywhere, or a value beyond [-5, 6], is refused."""
    g = torch.Generator().manual_seed(seed)
    x, whole = (torch.rand(shape, generator=g) * 11 - 5).to(dtype), torch.randint(-9, 9, shape, generator=g)
    hald.check_images(x), hald.check_images(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
    assert hald.check_finite(x, "w") is x and hald.check_finite(whole, "w") is whole
    with pytest.raises(hald.HaldError, match=r"^the images must be in \[0, 1\] units, got values from"):
        hald.check_images(poke(x.clone(), data, fl(7, 1e4) | fl(-1e4, -6)))
    x = poke(x, data, NONFINITE)
    with pytest.raises(hald.HaldError, match="^the set's images hold NaN or infinite values: redo it$"):
        hald.check_finite(x, "the set's images", "redo it")
    with pytest.raises(hald.HaldError, match="^the images hold NaN or infinite values"):
        hald.check_images(x)


@given(shape=st.lists(ints(1, 3), min_size=1, max_size=5), dtype=st.sampled_from([torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64]))
def test_check_images_refuses_other_layouts_and_dtypes(shape, dtype):
    """A shape other than (N, 3, H, W), a dtype other than uint8 or float, or a non-tensor is refused."""
    for x in ([torch.zeros(shape)] if len(shape) != 4 or shape[1] != 3 else []) + [torch.zeros(2, 3, 4, 4, dtype=dtype), [[0.5]]]:
        with pytest.raises(hald.HaldError, match=r"must be \(N, 3, H, W\) uint8, or float in \[0, 1\] units, got"):
            hald.check_images(x)


def test_check_images_empty_float_batch_passes_like_uint8():
    """An empty float batch passes, as an empty uint8 batch does (not a RuntimeError from .min())."""
    hald.check_images(torch.empty(0, 3, 8, 8, dtype=torch.uint8))
    hald.check_images(torch.empty(0, 3, 8, 8))


# ----------------------------------------------------------------------------- labels
@st.composite
def covering(draw, classes=ints(1, 6)):
    """Class indices covering 0..C-1 (each at least once), shuffled, and C."""
    c = draw(classes)
    return draw(st.permutations(list(range(c)) + draw(st.lists(ints(0, c - 1), max_size=6)))), c


@given(lc=covering(), dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]), soft=st.booleans())
def test_valid_labels_give_indices_and_class_count(lc, dtype, soft):
    """Integer indices covering 0..C-1 return (labels.long(), C); one-hot or soft rows return their argmax and C columns."""
    labels, c = lc
    index, num = hald.check_labels(torch.tensor(labels, dtype=dtype), len(labels), "w")
    assert index.dtype == torch.int64 and index.tolist() == labels and num == c
    rows = F.one_hot(torch.tensor(labels), c)
    rows = rows * 2 + torch.rand(rows.shape) if soft else rows.to(dtype if dtype != torch.int8 else torch.bool)
    index, num = hald.check_labels(rows, len(labels), "w")
    assert index.tolist() == labels and num == c


@given(lc=covering(), kind=st.sampled_from(["float32", "float64", "float16", "bool", "negative"]), data=st.data())
def test_non_index_label_vectors_are_refused(lc, kind, data):
    """1-D float, bool or negative labels are refused; so is a length other than the image count."""
    t = torch.tensor(lc[0])
    if kind == "negative":
        t = poke(t.to(data.draw(st.sampled_from([torch.int8, torch.int64]))), data, ints(-100, -1))
    else:
        t = t.to(getattr(torch, kind))
    with pytest.raises(hald.HaldError, match=r"^--data x: the labels are torch\.\w+ from .* give class indices as integers from 0"):
        hald.check_labels(t, len(t), "--data x")
    with pytest.raises(hald.HaldError, match=f"^--data x: {len(t) + 1} images but labels"):
        hald.check_labels(torch.tensor(lc[0]), len(t) + 1, "--data x")


@given(lc=covering(ints(2, 6)), how=st.sampled_from(["nan", "inf", "-inf", "tie", "zero"]), dtype=st.sampled_from([torch.float16, torch.float32]), data=st.data())
def test_label_rows_naming_no_single_class_are_refused(lc, how, dtype, data):
    """A row with a NaN / inf anywhere, or a tied largest value (an all-zero row), is refused, naming that row."""
    labels, c = lc
    rows, r = F.one_hot(torch.tensor(labels), c).to(dtype), data.draw(ints(0, len(labels) - 1))
    if how == "zero":
        rows[r] = 0
    else:
        other = data.draw(ints(0, c - 1).filter(lambda j: j != labels[r]))
        rows[r, other] = 1 if how == "tie" else float(how)
    with pytest.raises(hald.HaldError, match=f"^w: label row {r} \\(.*\\) names no single class"):
        hald.check_labels(rows, len(labels), "w")


@given(c=ints(2, 6), data=st.data(), onehot=st.booleans())
def test_a_class_no_image_has_is_named(c, data, onehot):
    """Labels up to C-1 that skip a class (1-based labels, an out-of-range label) are refused, naming the first missing class."""
    present = sorted(data.draw(st.sets(ints(0, c - 2), max_size=c - 2)) | {c - 1})
    labels = torch.tensor(present + data.draw(st.lists(st.sampled_from(present), max_size=6)))
    with pytest.raises(hald.HaldError, match=f"^w: the labels run from 0 to {c - 1} but no image has class {min(set(range(c)) - set(present))}:"):
        hald.check_labels(F.one_hot(labels, c).float() if onehot else labels, len(labels), "w")


# ----------------------------------------------------------------------------- model files, stored settings, output targets
@given(n=ints(1, 6), dtype=FLOAT_DTYPES, steps=ints(-2 ** 63, 2 ** 63 - 1), data=st.data())
def test_check_weights_names_non_finite_float_tensors(n, dtype, steps, data):
    """A state dict passes unchanged unless a floating tensor holds NaN / inf: then its first 3 such keys are named; integers never count."""
    state = {"note": "not a tensor"}
    for i in range(n):
        state |= {f"l{i}.weight": torch.randn(2, 3).to(dtype), f"l{i}.num_batches_tracked": torch.tensor(steps)}
    assert hald.check_weights(state, "m") is state
    bad = data.draw(st.lists(st.sampled_from([f"l{i}.weight" for i in range(n)]), min_size=1, unique=True))
    for key in bad:
        poke(state[key], data, NONFINITE)
    named = [k for k in state if k in bad]
    with pytest.raises(hald.HaldError, match="^teacher t.pt holds NaN or infinite weights") as error:
        hald.check_weights(state, "teacher t.pt")
    assert all(k in str(error.value) for k in named[:3]) and not any(k in str(error.value) for k in named[3:])
    assert (", ...)" in str(error.value)) == (len(named) > 3) and "num_batches_tracked" not in str(error.value)


VALUES = st.booleans() | ints(-2, 2) | st.text(max_size=2) | st.lists(ints(0, 2), max_size=2) | fl(-2, 2)


@given(then=st.dictionaries(st.sampled_from("abcdef"), VALUES), now=st.dictionaries(st.sampled_from("abcdef"), VALUES))
def test_settings_differ_lists_exactly_the_changed_keys(then, now):
    """settings_differ gives, sorted, the keys in only one dict or with unequal values; a dict against itself gives none."""
    assert hald.settings_differ(then, now) == sorted(k for k in then.keys() | now.keys() if k not in then or k not in now or then[k] != now[k])
    assert hald.settings_differ(then, {**then}) == [] and hald.settings_differ(now, then) == hald.settings_differ(then, now)


@pytest.mark.parametrize("target, folder, error", [("d", False, "is a folder: give a file name"), ("f", True, "is a file: give a folder"),
                         ("f/x", False, "f is not a folder"), ("f/x/y", True, "f is not a folder"), ("d", True, None), ("f", False, None),
                         ("d/new/deeper", True, None), ("d/new/file.pt", False, None), ("new.pt", False, None)])
def test_check_target(tmp_path, target, folder, error):
    """A folder where a file is wanted, a file where a folder is, or a path under a file is refused; nothing is ever created."""
    (tmp_path / "d").mkdir(), (tmp_path / "f").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    if error:
        with pytest.raises(hald.HaldError, match=error):
            hald.check_target(tmp_path / target, "--out", folder=folder)
    else:
        assert hald.check_target(str(tmp_path / target), "--out", folder=folder) == tmp_path / target
    assert sorted(tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------ every refusal of the command line
# REFUSALS: one row per `raise HaldError` of Part II: the bad invocation that reaches it, or the test above that covers it
# where one CLI call on a CPU cannot. Each refusal exits 2 with one line and writes nothing; every refusal has its row and
# every row its refusal. MORE: further invocations of refusals that have a row.
ANY = "…"  # in a row's site: where the message formats a value in (hald.py's messages use "..." for an ellipsis, never "…")


def cheap_args(tiny, out, *extra) -> list:
    """tiny_args made cheap: one soft epoch, no evaluation before the end, no drift crops."""
    return tiny_args(tiny, out, "--schedule", "soft", "--epochs", "1", "--eval-every", "0", "--drift-crops", "0", *extra)


@dataclasses.dataclass
class Bench:
    """What a row builds its bad invocation from: the fixtures, its own folder (tmp_path, also the working directory, so
    the default --out runs/hald lies in it) and monkeypatch. A row puts every file it makes, and every output, in tmp."""
    tiny: dict
    demo: dict
    trained: dict
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    held: list = dataclasses.field(default_factory=list)  # open files to close after the call

    def args(self, *extra, drop: tuple = ()) -> list:
        """cheap_args into tmp/out; later flags win, `drop` removes flags (with their values)."""
        argv = cheap_args(self.tiny, self.tmp / "out", *extra)
        for flag in drop:
            while flag in argv:
                del argv[argv.index(flag):argv.index(flag) + 2]
        return argv

    def demo_args(self, *extra) -> list:
        """The no-argument demo (no --data), into the default --out runs/hald that holds an earlier demo."""
        return ["--val", str(self.demo["val"]), "--epochs", "1", "--eval-every", "0", "--drift-crops", "0", *extra]

    def save(self, name: str, blob) -> str:
        """tmp/name holding blob (torch.save) -> its path."""
        torch.save(blob, self.tmp / name)
        return str(self.tmp / name)

    def write(self, name: str, data: bytes) -> str:
        (self.tmp / name).write_bytes(data)
        return str(self.tmp / name)

    def folder(self, name: str) -> str:
        (self.tmp / name).mkdir(parents=True)
        return str(self.tmp / name)

    def tensor_set(self, change=lambda x, y: (x, y)) -> list:
        """--data a tensor file: tiny's images (normalised with CIFAR-10's statistics) and labels, as change(x, y) makes them."""
        return self.args("--data", self.save("set.pt", change(*tensor_set(self.tiny))), "--normalize", "cifar10")

    def teacher_state(self) -> dict:
        return {k: v.clone() for k, v in torch.load(self.tiny["teacher"], weights_only=True)["state_dict"].items()}

    def of_three_processes(self, *extra) -> list:
        """As one of three torchrun processes: its checks of the global batch, before any collective."""
        self.monkeypatch.setattr(hald, "init_distributed", lambda device: (device, 0, 3))
        return self.args(*extra)

    def into_out(self, source, name: str = "") -> "Bench":
        """A copy of the file source in tmp/out (as `name`)."""
        (self.tmp / "out").mkdir(exist_ok=True)
        shutil.copy(source, self.tmp / "out" / (name or Path(source).name))
        return self


@dataclasses.dataclass
class Row:
    """One refusal: `site` is literal text of exactly one `raise HaldError` of Part II (ANY where a value is formatted in);
    `build` makes the bad invocation (-> argv), or `covered_by` names the test of test_hald.py that reaches it (None: none
    does). `xfail`: how hald.py goes wrong on this invocation (a write before the refusal, or none)."""
    id: str
    site: str
    build: Callable[[Bench], list] | None = None
    covered_by: str | None = None
    xfail: str = ""


# ------------------------------------------------------------------------------------------------------------ builders
def held_out(b: Bench) -> list:
    """--out locked by another run (as claim locks it), which is still running."""
    (b.tmp / "out").mkdir()
    lock = open(b.tmp / "out" / ".lock", "a+")
    lock.write("the run of process 1 on elsewhere, started 2000-01-01 00:00:00\n")
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    b.held.append(lock)
    return b.args()


def without_cuda(b: Bench) -> list:
    b.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where a GPU is
    return b.args("--device", "cuda")


def installed_without_demo(b: Bench) -> list:
    """As `pip install .` leaves hald: no demo folder beside hald.py."""
    b.monkeypatch.setattr(hald, "DEMO", b.tmp / "not-installed")
    return []


def broken_image(b: Bench) -> list:
    shutil.copytree(b.tiny["data"], b.tmp / "data")
    (b.tmp / "data" / "class0" / "000.png").write_bytes(b"not a png")
    return b.args("--data", str(b.tmp / "data"))


def val_with_an_empty_class(b: Bench) -> list:
    shutil.copytree(b.tiny["val"], b.tmp / "val")
    for f in (b.tmp / "val" / "class3").iterdir():
        f.unlink()
    return b.args("--val", str(b.tmp / "val"))


def dataset_root(b: Bench) -> list:
    for split in ("train", "val"):
        (b.tmp / "root" / split / "class0").mkdir(parents=True)
    return b.args("--data", str(b.tmp / "root"))


def whitened(x, y) -> tuple:
    """The statistics of ZCA-whitened images: low contrast, no correlation between neighbouring pixels."""
    return 0.45 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), y


def nan_one_hot_row(x, y) -> tuple:
    rows = F.one_hot(y, 4).float()
    rows[5] = float("nan")
    return x, rows


def nan_teacher(b: Bench) -> list:
    blob = torch.load(b.tiny["teacher"], weights_only=True)
    blob["state_dict"] = b.teacher_state()
    blob["state_dict"]["0.weight"][0, 0, 0, 0] = float("nan")
    return b.args("--teacher", b.save("nan.pt", blob))


def teacher_of_other_statistics(b: Bench) -> list:
    other = b.tmp / "cifar.pt"
    hald.save_checkpoint(hald.build_model("convnet8", 4, 16), "convnet8", [f"class{c}" for c in range(4)], 16, other,
                         hald.NORMALIZATIONS["cifar10"])
    return b.args("--teacher", f"{b.tiny['teacher']},{other}")


def reversed_classes(b: Bench, *extra) -> list:
    names = [f"class{c}" for c in range(4)]
    return b.args("--data", str(renamed_copy(b.tiny["data"], b.tmp / "data", names[::-1])), *extra)


def unwritable_at_the_claim(b: Bench) -> list:
    """A folder that refuses files when the claim probes it (a permission that os.access cannot see, as for root)."""
    def refuse(dir=None, **_):
        raise PermissionError(13, "Permission denied", dir)
    b.monkeypatch.setattr(hald.tempfile, "TemporaryFile", refuse)
    return b.args("--cache", str(b.tmp / "new" / "cache.pt"))


def cache_copy(b: Bench) -> Path:
    return Path(shutil.copy(b.trained["cache"], b.tmp / "cache.pt"))


def corrupted_cache(b: Bench) -> list:
    """The cache of these very settings with one crop box changed after its checksum was taken."""
    blob = torch.load(cache_copy(b), weights_only=True)
    blob["boxes"][0, 0] += 1
    return b.args("--cache", b.save("cache.pt", blob))


# ---------------------------------------------------------------------------------------------------------------- rows
REFUSALS = [
    # flag values and their combinations (check_flags, mean_std_of, resolve_settings, the four (condition, message)
    # pairs of resolve, check_run; the batch against the images)
    Row("flag-out-of-range", f" must be {ANY}, got ", lambda b: b.args("--crop-scale", "0")),
    Row("flag-not-a-choice", " must be one of ", lambda b: b.args("--teacher-mode", "test")),
    Row("soft-epochs-over-epochs", "must be at most --epochs", lambda b: b.args("--soft-epochs", "3")),
    Row("teacher-weights-count", "must be one finite number per --teacher", lambda b: b.args("--teacher-weights", "1,2")),
    Row("cuda-not-available", "CUDA is not available", without_cuda),
    Row("seeds-repeated", "--seeds takes different whole numbers", lambda b: b.args("--seeds", "0,0")),
    Row("normalize-three-numbers", "nor six finite numbers", lambda b: b.args("--normalize", "1,2,3")),
    Row("recipe-of-other-classes", "drop --recipe or name the dataset of --data", lambda b: b.args("--recipe", "cifar100")),
    Row("cuda-graph-on-cpu", "--cuda-graph needs a CUDA device and a single process",
        lambda b: b.demo_args("--cuda-graph", "--device", "cpu")),
    Row("cache-with-seeds", "--cache holds one seed's soft labels",
        lambda b: b.demo_args("--seeds", "0,1", "--cache", str(b.tmp / "cache.pt"))),
    Row("save-model-of-several-runs", "--save-model names one file", lambda b: b.demo_args("--save-model", str(b.tmp / "s.pt"))),
    Row("labels-with-a-folder", "--labels is for a --data tensor file", lambda b: b.args("--labels", str(b.tmp / "y.pt"))),
    Row("slc-not-a-multiple", "is not a multiple of --ipc", lambda b: b.args("--slc", "3")),
    Row("batch-over-images", "distilled images: lower it", lambda b: b.args("--batch-size", "10")),
    Row("batch-per-process", "is the global batch", lambda b: b.of_three_processes("--batch-size", "4")),
    Row("last-batch-per-process", "needs an image per process", lambda b: b.of_three_processes("--batch-size", "6")),
    Row("teacher-arch-count", "must name one architecture, or one per --teacher",
        lambda b: b.args("--teacher", f"{b.tiny['teacher']},{b.tiny['teacher']},{b.tiny['teacher']}", "--teacher-arch", "convnet8,convnet8")),

    # image sets: ImageFolders (list_image_folder, decode_image, check_class_counts, pair_classes) and tensor files
    Row("data-not-a-folder", "is not a folder: give an ImageFolder", lambda b: b.args("--data", str(b.tmp / "nowhere"))),
    Row("data-without-classes", "has no class folders", lambda b: b.args("--data", b.folder("empty"))),
    Row("data-is-a-dataset-root", "holds folders, not images", dataset_root),
    Row("corrupt-image", "cannot read image", broken_image),
    Row("val-class-without-images", "and every class of --val is scored", val_with_an_empty_class),
    Row("val-of-other-classes", "both must hold the same classes",
        lambda b: b.args("--val", str(write_folder(b.tmp / "five", 5, 1, 16, 2)))),
    Row("tensor-file-missing", "or a tensor file of the distilled set", lambda b: b.args("--data", str(b.tmp / "missing.pt"))),
    Row("tensor-file-layout", "no layout hald.py knows",
        lambda b: b.args("--data", b.save("set.pt", {"state_dict": {}, "epoch": 3}))),
    Row("tensor-file-without-labels", "holds images only and",
        lambda b: b.args("--data", b.save("images.pt", tensor_set(b.tiny)[0]), "--normalize", "cifar10")),
    Row("tensor-file-images-3d", "the images must be float (N, C, H, W)", lambda b: b.tensor_set(lambda x, y: (x[..., 0], y))),
    Row("tensor-file-zca", "looks ZCA-whitened", lambda b: b.tensor_set(whitened)),

    # labels of a tensor set (check_labels)
    Row("labels-count", "images but labels", lambda b: b.tensor_set(lambda x, y: (x, y[:11]))),
    Row("labels-float", "give class indices as integers from 0", lambda b: b.tensor_set(lambda x, y: (x, y.float()))),
    Row("labels-nan-one-hot-row", "names no single class", lambda b: b.tensor_set(nan_one_hot_row)),
    Row("labels-one-based", "but no image has class", lambda b: b.tensor_set(lambda x, y: (x, y + 1))),

    # model files: teachers and --evaluate (check_run, torchvision_weights, load_teacher(s), read_weights, model_from_weights)
    Row("teacher-missing", "--teacher is missing", lambda b: b.args(drop=("--teacher",))),
    Row("teacher-arch-for-torchvision", "--teacher-arch is for a --teacher file",
        lambda b: b.args("--teacher", "resnet18", "--teacher-arch", "resnet18")),
    Row("teacher-file-missing", "does not exist: check the path", lambda b: b.args("--teacher", str(b.tmp / "missing.pt"))),
    Row("teacher-name-unknown", "is neither a file nor a torchvision model name", lambda b: b.args("--teacher", "nonexistent_net")),
    Row("teacher-weights-tag-unknown", "torchvision has no weights", lambda b: b.args("--teacher", "resnet18:V7")),
    Row("teacher-not-loadable", "which hald.py never unpickles", lambda b: b.args("--teacher", b.write("garbage.pt", b"not a zip"))),
    Row("teacher-checkpoint-of-other-arch", "is a hald.py checkpoint of", lambda b: b.args("--teacher-arch", "convnet16")),
    Row("teacher-weights-without-arch", "is not a checkpoint written by hald.py --save-model",
        lambda b: b.args("--teacher", b.save("plain.pt", b.teacher_state()))),
    Row("teacher-without-state-dict", "holds no state_dict",
        lambda b: b.args("--teacher", b.save("opt.pt", {"epoch": 3, "optimizer": {"lr": 0.1}}), "--teacher-arch", "convnet_bn8")),
    Row("teacher-of-other-class-count", "classes but the data has",
        lambda b: b.args("--teacher", b.save("ten.pt", hald.build_model("convnet_bn8", 10, 16).state_dict()),
                         "--teacher-arch", "convnet_bn8")),
    Row("teacher-does-not-fit-arch", "does not fit",
        lambda b: b.args("--teacher", b.save("plain.pt", b.teacher_state()), "--teacher-arch", "convnet_bn16")),
    Row("teacher-nan-weights", "holds NaN or infinite weights", nan_teacher),
    Row("teacher-of-other-size", "px images, the data gives", lambda b: b.args("--image-size", "32")),
    Row("teachers-of-other-statistics", "normalise their inputs differently", teacher_of_other_statistics),
    Row("class-order-against-teacher", "does not match the teacher's", reversed_classes),
    Row("evaluate-without-val", "--evaluate needs --val", lambda b: ["--evaluate", str(b.tiny["teacher"])]),

    # stored settings: soft-label caches (load_cache) and checkpoints of --resume (read_checkpoint)
    Row("cache-not-a-cache", "is not a hald soft-label cache", lambda b: b.args("--cache", b.save("cache.pt", {"x": torch.zeros(1)}))),
    Row("cache-of-other-settings", "was made for other settings", lambda b: b.args("--cache", str(cache_copy(b)), "--seed", "1")),
    Row("cache-corrupted", "is corrupted (checksum or size mismatch)", corrupted_cache),
    Row("checkpoint-not-hald", "is not a checkpoint written by hald.py: move it away",
        lambda b: b.into_out(b.save("other.pt", {"epoch": 1}), "checkpoint.pt").args("--resume")),
    Row("checkpoint-of-other-settings", "belongs to a run with other settings",
        lambda b: b.into_out(b.trained["checkpoint"]).args("--resume", "--lr", "0.5")),

    # output targets (check_out, check_target, claim, atomic_path)
    Row("out-holds-a-finished-run", "holds a finished run (summary.json)", lambda b: b.into_out(b.trained["summary"]).args()),
    Row("out-holds-an-unfinished-run", "holds an unfinished run (checkpoint.pt)",
        lambda b: b.into_out(b.trained["checkpoint"]).args()),
    Row("save-model-is-a-folder", "give a file name", lambda b: b.args("--save-model", b.folder("folder"))),
    Row("cache-under-a-file", "; choose another", lambda b: b.args("--cache", b.write("file", b"x") + "/cache.pt")),
    Row("out-name-too-long", "cannot use ", lambda b: b.args("--out", str(b.tmp / ("x" * 300)))),
    Row("save-model-in-out", "or a file hald.py writes there", lambda b: b.args("--save-model", str(b.tmp / "out" / "summary.json"))),
    Row("out-in-use", "is in use by", held_out),  # also test_sigterm_stops_like_ctrl_c_and_one_run_holds_an_out, by a real run
    Row("claim-cannot-write-in", "make it writable or choose another --out", unwritable_at_the_claim),
    Row("files-differ-between-processes", "on a file system that every node shares",
        covered_by="test_files_that_some_processes_do_not_see_are_refused"),  # torchrun only
    Row("write-fails", "free space or make it writable",  # a full disk: any write of the run, after the claim
        covered_by="test_a_full_disk_ends_in_one_line_and_the_run_resumes"),

    # other: the demo without its files, and what can only fail while training
    Row("data-missing-without-demo", "--data is missing", installed_without_demo),
    Row("val-missing", "--val is missing", lambda b: b.args(drop=("--val",))),
    Row("loss-not-finite", "the loss became", covered_by="test_bad_input_gives_a_one_line_error"),
]

# Further invocations of sites that have a row above, where hald.py goes wrong: it writes or deletes before it refuses, or
# does not refuse in one line
MORE = [
    Row("demo-cache-under-a-file", "; choose another", lambda b: b.demo_args("--cache", b.write("file", b"x") + "/cache.pt")),
    Row("demo-save-model-a-folder", "give a file name", lambda b: b.demo_args("--schedule", "shs", "--save-model", b.folder("folder"))),
    Row("class-order-with-val-in-a-file", "does not match the teacher's", lambda b: reversed_classes(b, "--val-storage", "file")),
    Row("cache-inside-the-lock", "or a file hald.py writes there", lambda b: b.args("--cache", str(b.tmp / "out" / ".lock" / "c.pt"))),
    Row("save-model-is-out", "or a file hald.py writes there", lambda b: b.args("--save-model", str(b.tmp / "out"))),
    Row("save-model-is-the-cache", "or a file hald.py writes there", lambda b: b.args("--save-model", str(b.tmp / "out" / "soft_labels.pt"))),
]


def param(row: Row):
    return pytest.param(row, id=row.id, marks=[pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else [])


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One finished run of cheap_args (the rows' settings): its checkpoint, soft-label cache and summary."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert hald.main(cheap_args(tiny, out)) == 0
    return {"checkpoint": out / "checkpoint.pt", "cache": out / "soft_labels.pt", "summary": out / "summary.json"}


def snapshot(root: Path) -> dict:
    """Every folder (None) and file (its bytes) under root."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row", [param(row) for row in REFUSALS + MORE if row.build])
def test_every_refusal_exits_2_in_one_line_and_writes_nothing(row, tiny, demo_small, trained, tmp_path, monkeypatch, capsys):
    """Each bad invocation exits 2 with one line "hald: error: ..." naming its refusal and no traceback, and leaves every file
    and folder under tmp_path as it was: --out, --cache and --save-model, and an earlier finished demo in the default --out
    runs/hald (which only a `python hald.py` that goes on to train may replace)."""
    monkeypatch.chdir(tmp_path)
    for spec in ("shs", "soft"):
        (tmp_path / "runs" / "hald" / spec).mkdir(parents=True)
        (tmp_path / "runs" / "hald" / spec / "summary.json").write_text(json.dumps({"config": {"data": str(hald.DEMO / "distilled")}}))
    (tmp_path / "runs" / "hald" / "soft_labels.pt").write_bytes(b"the earlier demo's cache")
    bench = Bench(tiny, demo_small, trained, tmp_path, monkeypatch)
    argv = row.build(bench)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = hald.main(argv)
    finally:
        for f in bench.held:
            f.close()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("hald: error: "), err
    pattern = ".+".join(map(re.escape, row.site.split(ANY)))
    assert re.search(pattern, err), f"{row.site!r} not in {err!r}"
    after, gone = snapshot(tmp_path), object()
    assert [p for p in sorted(before.keys() | after.keys()) if before.get(p, gone) != after.get(p, gone)] == []  # made, changed, gone


# ------------------------------------------------------------------------------------------------- sites of Part II
def literal(node: ast.expr) -> list[str]:
    """The literal text of a message expression: one string per choice of its conditional branches, ANY where a value is
    formatted in; f-strings, plain strings and their concatenation with +."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(parts) for parts in itertools.product(*(literal(v) for v in node.values))]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a, b in itertools.product(literal(node.left), literal(node.right))]
    if isinstance(node, ast.IfExp):
        return literal(node.body) + literal(node.orelse)
    return [ANY]  # a formatted value, a name, a call


def part_two_sites() -> list[tuple[int, list[str]]]:
    """(line, literal texts) of every `raise HaldError(...)` of Part II; a `raise HaldError(name)` inside a loop over
    (condition, message) pairs counts once per message, at the message's line."""
    source = (HERE / "hald.py").read_text()
    first = source[:source.index("Part II: the program")].count("\n") + 1
    tree = ast.parse(source)
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and isinstance(n.target, ast.Tuple)]
    sites = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Raise) and node.lineno > first and isinstance(node.exc, ast.Call)
                and isinstance(node.exc.func, ast.Name) and node.exc.func.id == "HaldError"):
            continue
        assert len(node.exc.args) == 1, f"hald.py:{node.lineno}: HaldError takes its message"
        message = node.exc.args[0]
        if isinstance(message, ast.Name):
            loop = max((n for n in loops if n.lineno <= node.lineno <= n.end_lineno
                        and message.id in [getattr(t, "id", None) for t in n.target.elts]), key=lambda n: n.lineno, default=None)
            assert loop is not None and isinstance(loop.iter, (ast.Tuple, ast.List)), \
                f"hald.py:{node.lineno}: raise HaldError({message.id}) outside a loop over (condition, message) pairs"
            k = [getattr(t, "id", None) for t in loop.target.elts].index(message.id)
            sites += [(pair.elts[k].lineno, literal(pair.elts[k])) for pair in loop.iter.elts]
        else:
            sites.append((node.lineno, literal(message)))
    return sorted(sites)


def test_every_refusal_of_part_two_has_a_row():
    """Each `raise HaldError` of Part II (each message of resolve's pairs apart) holds exactly one row's site, and each row's
    site lies in exactly one of them: a new refusal without a row fails here, and so does a row whose refusal changed or
    went. Rows without an invocation name an existing test of test_hald.py (or None, said so here)."""
    sites = part_two_sites()
    assert len(sites) > 50, "Part II's refusals were not found"
    problems = []
    for line, texts in sites:
        rows = [row.id for row in REFUSALS if any(row.site in text for text in texts)]
        if len(rows) != 1:
            problems.append(f"hald.py:{line} {texts[0][:70]!r} is the site of {len(rows)} rows {rows}")
    for row in REFUSALS + MORE:
        lines = [line for line, texts in sites if any(row.site in text for text in texts)]
        if len(lines) != 1:
            problems.append(f"row {row.id}: {row.site!r} is in {len(lines)} sites {lines}")
        if row.build and row.covered_by or row.build is None and row.xfail:
            problems.append(f"row {row.id}: an invocation, or a test that covers it, not both")
    ids = [row.id for row in REFUSALS + MORE]
    problems += [f"row id {i} twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    tests = (HERE / "test_hald.py").read_text()
    problems += [f"row {row.id}: no test {row.covered_by} in test_hald.py" for row in REFUSALS
                 if row.covered_by and not re.search(rf"^def {row.covered_by}\(", tests, re.M)]
    assert not problems, "\n".join(problems)
    assert [row.id for row in REFUSALS if row.build is None and row.covered_by is None] == []
