"""Tests of tools/paper_tiny.py (the paper's Tiny-ImageNet setting for one GPU): its toy size end to end on the
CPU, on a Tiny-ImageNet-like ImageFolder made here, and the unpacking of split tars. Run: make test."""
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))
import paper_tiny  # noqa: E402

SCRIPT = [sys.executable, str(HERE / "tools" / "paper_tiny.py")]
CLASSES = ("n01443537", "n01629819", "n01641577")  # wnid-like names, as Tiny-ImageNet's folders


def make_tiny(root: Path, train: int = 12, val: int = 4, size: int = 16) -> Path:
    """train/<wnid>/<wnid>_<k>.JPEG and val/<wnid>/val_<k>.JPEG of random pixels, Tiny-ImageNet's layout."""
    rng = random.Random(0)
    for split, count in (("train", train), ("val", val)):
        for wnid in CLASSES:
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"val_{CLASSES.index(wnid) * count + k}.JPEG"
                Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(root / split / wnid / name, "JPEG")
    return root


def run(*args: str):
    t0 = time.time()
    result = subprocess.run([*SCRIPT, *args], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return result, time.time() - t0


def test_toy_runs_every_stage_writes_one_table_and_skips_what_is_done(tmp_path):
    data, out = make_tiny(tmp_path / "tiny"), tmp_path / "run"
    first, seconds = run("--tiny", str(data), "--toy", "--device", "cpu", "--out", str(out))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    assert (out / "teacher" / "teacher.pt").is_file() and (out / "teacher" / "summary.json").is_file()
    assert sorted(p.name for p in (out / "recover").iterdir() if p.is_dir()) == ["new000", "new001", "new002"]
    assert (out / "recover" / "new002" / "class002_id001.png").is_file() and (out / "recover" / "distill.json").is_file()
    names = ["s1-soft", "s1-hald", "s2-soft", "s2-hald"]
    for name in names:
        assert (out / "students" / name / "summary.json").is_file(), name
    # HALD read the soft-only run's cache at its SLC: one relabel per SLC
    assert not (out / "students" / "s1-hald" / "soft_labels.pt").exists()

    rows = [line for line in (out / "table.md").read_text().splitlines() if re.match(r"\| [12] \|", line)]
    assert len(rows) == 4 and all(re.search(r"\| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d \| \d+\.\d \|$", row) for row in rows), rows
    assert ["soft-only", "HALD", "soft-only", "HALD"] == [row.split(" | ")[2] for row in rows]
    figures = json.loads((out / "paper_tiny.json").read_text())
    assert 0 <= figures["teacher"]["top1"] <= 100 and figures["teacher"]["minutes"] > 0
    assert 0 <= figures["recover"]["teacher_agreement"] <= 100 and figures["recover"]["iterations"] == 4
    assert [x["name"] for x in figures["students"]] == names
    assert all(0 <= x["final_top1"] <= 100 and x["best_top1"] >= x["final_top1"] and x["minutes"] > 0 for x in figures["students"])
    assert [x["slc"] for x in figures["students"]] == [2, 2, 4, 4]  # toy IPC 2: 1 and 2 crops per image
    assert [x["paper_top1"] for x in figures["students"]] == [10.1, 18.6, 17.4, 22.8]
    assert figures["students"][1]["schedule"] == [["soft", 1], ["hard", 2], ["soft", 1]]  # the authors' split of 4 epochs
    assert figures["device"].startswith("cpu") and figures["torch"] and len(figures["code"]["hald_sha256"]) == 64

    stamp = (out / "students" / "s2-hald" / "summary.json").stat().st_mtime_ns
    again, again_seconds = run("--tiny", str(data), "--toy", "--device", "cpu", "--out", str(out), "--export", str(tmp_path / "export"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done earlier") == 6 and "started" not in again.stdout  # teacher, recover, four students
    assert (out / "students" / "s2-hald" / "summary.json").stat().st_mtime_ns == stamp
    assert again_seconds < min(15, seconds / 2), (again_seconds, seconds)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["paper_tiny.json", "paper_tiny.log", "results.tar.gz", "table.md"]
    with tarfile.open(tmp_path / "export" / "results.tar.gz") as tar:
        kept = tar.getnames()
    assert "run/students/s1-hald/summary.json" in kept and "run/recover/contact.png" in kept
    assert not any(n.endswith(".pt") or "/new000/" in n or n.startswith("run/data") for n in kept)


def test_missing_data_is_one_line(tmp_path):
    for args in ([], ["--tiny", str(tmp_path)], ["--tiny-tars", str(tmp_path)]):
        result, _ = run(*args, "--out", str(tmp_path / "run"))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("paper_tiny: error:")


def test_split_tars_unpack_once(tmp_path):
    data = make_tiny(tmp_path / "tiny", train=2, val=1)
    tars = tmp_path / "tars"
    tars.mkdir()
    for split in ("train", "val"):
        with tarfile.open(tars / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(data / split, arcname=split)
    whole = (tars / "train.tar.gz").read_bytes()  # split as `split -b -d` does: .part00, .part01, ...
    (tars / "train.tar.gz").unlink()
    for i in range(3):
        (tars / f"train.tar.gz.part{i:02d}").write_bytes(whole[i * len(whole) // 3:(i + 1) * len(whole) // 3])
    said = io.StringIO()
    root = paper_tiny.unpack_tars(tars, tmp_path / "unpacked", lambda line: print(line, file=said))
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(CLASSES)
    assert (root / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG").read_bytes() == (data / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG").read_bytes()
    paper_tiny.unpack_tars(tars, tmp_path / "unpacked", lambda line: print(line, file=said))
    assert "reusing" in said.getvalue().splitlines()[-1]
