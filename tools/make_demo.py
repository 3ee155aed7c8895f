"""Build the bundled demo folder from CIFAR-10 (how demo/ was made; not needed to run it).

    python tools/make_demo.py --cifar ../shared/data/cifar10 --teacher runs/teacher/teacher.pt

demo/distilled: 10 training images per class drawn at random (torch.randperm, seed 0, over the
sorted file names of each class); demo/val: the first 200 test images of each class (sorted
names). Files are copied byte for byte. demo/teacher.pt: a teacher trained by hald.py.
"""
import argparse
import shutil
from pathlib import Path

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", default="../shared/data/cifar10", help="CIFAR-10 ImageFolder root with train/ and test/")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint written by hald.py --save-model")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "demo"))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--val-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cifar, out = Path(args.cifar), Path(args.out)
    gen = torch.Generator().manual_seed(args.seed)
    for split, pick in (("train", "distilled"), ("test", "val")):
        for class_dir in sorted(p for p in (cifar / split).iterdir() if p.is_dir()):
            files = sorted(class_dir.iterdir())
            chosen = ([files[i] for i in sorted(torch.randperm(len(files), generator=gen)[: args.ipc].tolist())]
                      if pick == "distilled" else files[: args.val_per_class])
            target = out / pick / class_dir.name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for f in chosen:
                shutil.copyfile(f, target / f.name)
    shutil.copyfile(args.teacher, out / "teacher.pt")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
