"""Tests of what surrounds hald.py: tools/distill.py (generator-made distilled sets) and the README's
snippets. Run: make test. Data: the bundled demo/ files (CIFAR-10 images, BatchNorm teacher) and models
made here."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hald

HERE = Path(__file__).resolve().parent
DEMO = HERE / "demo"
DISTILL = [sys.executable, str(HERE / "tools" / "distill.py")]
QUICK = {"recover": ["--iterations", "12", "--ipc", "2"], "select": ["--candidates", "10", "--ipc", "2"]}


def distill(kind: str, out: Path, *extra: str, teacher=DEMO / "teacher.pt"):
    return subprocess.run([*DISTILL, kind, "--train", str(DEMO / "distilled"), "--teacher", str(teacher), "--out", str(out),
                           *QUICK[kind], *extra], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "distill.json"}


@pytest.mark.parametrize("kind, folder, name, extra", [("recover", "new003", "class003_id001.png", []),
                                                       ("select", "00003", "class00003_id00001.png", ["--factor", "2"])])
def test_distill_writes_the_generators_layout_identically_by_seed(tmp_path, kind, folder, name, extra):
    first, again, other = (distill(kind, tmp_path / d, *extra, *seed) for d, seed in (("a", []), ("b", []), ("c", ["--seed", "1"])))
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr
    a = tmp_path / "a"
    classes = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert len(classes) == 10 and folder in classes and (a / folder / name).is_file()
    assert all(len(list((a / c).iterdir())) == 2 for c in classes)
    images, labels, _ = hald.load_distilled(a, 2)
    assert images.shape == (20, 3, 32, 32)
    info = json.loads((a / "distill.json").read_text())
    assert info["kind"] == kind and info["teacher_agreement"] >= 50  # the teacher calls them their class
    assert files_of(a) == files_of(tmp_path / "b")  # the same seed: the same bytes
    assert files_of(a) != files_of(tmp_path / "c")
    assert (a / "contact.png").is_file() and not (tmp_path / ".a.tmp").exists()


def test_recover_refuses_a_teacher_without_batchnorm_and_an_existing_out(tmp_path):
    teacher = tmp_path / "in.pt"
    hald.save_checkpoint(hald.build_model("convnet", 10, 32), "convnet", sorted(p.name for p in (DEMO / "distilled").iterdir()), 32, teacher)
    result = distill("recover", tmp_path / "set", teacher=teacher)
    assert result.returncode == 2 and "no BatchNorm layer" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "set").exists()
    (tmp_path / "set").mkdir()
    result = distill("select", tmp_path / "set")
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_recovered_set_trains_with_hald_and_passes_the_teacher_check(tmp_path):
    assert distill("recover", tmp_path / "set").returncode == 0
    summary = hald.train_all(hald.Config(data=str(tmp_path / "set"), val=str(DEMO / "val"), teacher=str(DEMO / "teacher.pt"), ipc=2,
                                     slc=2, epochs=2, schedule="shs", soft_epochs=1, eval_every=0, drift_crops=2, out=str(tmp_path / "run")),
                             log=lambda *a: None)[0]
    assert summary["teacher_agreement"] >= 50 and summary["teacher_top1"] > 50
    assert summary["drift"]["teacher_crop_trace_mean"] >= 0 and 0 <= summary["final_top1"] <= 100


# ------------------------------------------------------------------------------ README and docs/
PAGES = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]  # the pages whose snippets a reader pastes


def readme_blocks(language: str, pages=PAGES) -> list[tuple[Path, str]]:
    return [(page, block) for page in pages for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)]


def test_readme_python_blocks_run_as_pasted(monkeypatch):
    """Every ```python block of README.md and docs/*.md runs as pasted, from the repository root."""
    blocks = readme_blocks("python")
    assert any(page.name == "README.md" for page, _ in blocks)
    monkeypatch.chdir(HERE)
    for page, block in blocks:
        exec(compile(block, str(page.relative_to(HERE)), "exec"), {})


def test_readme_commands_name_flags_and_targets_that_exist():
    """Every line of a ```bash block of README.md and docs/*.md that runs hald.py or tools/distill.py parses with its
    parser, and every `make` line names targets of the Makefile."""
    sys.path.insert(0, str(HERE / "tools"))
    import distill

    targets = set(re.findall(r"^([\w-]+):", (HERE / "Makefile").read_text(), re.M))
    checked = {}
    for page, block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for script, parse in (("hald.py", hald.parse_config), ("tools/distill.py", distill.parse_args)):
                if script in words:
                    parse(words[words.index(script) + 1:])  # argparse exits (SystemExit) on an unknown flag
                    checked[page.name] = checked.get(page.name, 0) + 1
            if words[:1] == ["make"]:
                assert set(words[1:]) <= targets, f"{page.name}: {line}"
                checked[page.name] = checked.get(page.name, 0) + 1
    assert checked.get("README.md", 0) >= 5 and sum(checked.values()) >= 10, checked


# ------------------------------------------------------------------------------ links and anchors
LINKED = [HERE / "README.md", HERE / "RESULTS.md", *sorted((HERE / "docs").glob("*.md"))]  # the pages whose links are checked


def without_fences(text: str) -> str:
    """The text outside fenced code blocks (their lines stay, empty, so line numbers keep)."""
    return re.sub(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\n]*$", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)


def github_anchors(text: str) -> set[str]:
    """The #anchors GitHub gives a page's headings: the heading's text (links to their text, no emphasis or code marks)
    lowercased, every character but letters, digits, spaces, - and _ removed, spaces to -; a repeated anchor gets -1, -2,
    ... in order. Explicit <a name=...> / id=... anchors count too."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", without_fences(text), re.M):
        plain = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
        plain = re.sub(r"<[^>]+>", "", plain).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", plain.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors | set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))


def test_github_anchors_follow_githubs_rules():
    text = "# Results\n## HALD across the phase switch: AdamW's state\n## `--recipe`\n## Results\n## Results\n```\n# not a heading\n```\n"
    assert github_anchors(text) == {"results", "hald-across-the-phase-switch-adamws-state", "--recipe", "results-1", "results-2"}
    assert github_anchors("## The teacher's mode at relabel: train or eval, on RDED-style images") == {
        "the-teachers-mode-at-relabel-train-or-eval-on-rded-style-images"}
    assert github_anchors("### [README, Flags](README.md#flags) and `make demo` (**200** classes)") == {"readme-flags-and-make-demo-200-classes"}


def relative_links(text: str) -> list[str]:
    """The targets of a page's [text](target) and ![alt](target) links outside code, but for web and mail addresses."""
    prose = re.sub(r"`[^`\n]*`", "", without_fences(text))
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # https:, mailto:, ...


def broken_links(pages=LINKED) -> list[str]:
    from urllib.parse import unquote

    broken = []
    for page in pages:
        for target in relative_links(page.read_text()):
            path, _, anchor = target.partition("#")
            file = (page.parent / unquote(path)).resolve() if path else page
            shown = lambda f: f.relative_to(HERE) if f.is_relative_to(HERE) else f  # noqa: E731
            where = f"{shown(page)}: {target}"
            if not file.exists():
                broken.append(f"{where} (no file {shown(file)})")
            elif anchor and (file.suffix != ".md" or unquote(anchor) not in github_anchors(file.read_text())):
                broken.append(f"{where} (no heading #{anchor} in {file.name})")
    return broken


def test_every_relative_link_and_anchor_resolves():
    """Every relative link and #anchor of README.md, RESULTS.md and docs/*.md names a file that exists and a heading that
    exists in it, by GitHub's anchor rules."""
    assert sum(len(relative_links(page.read_text())) for page in LINKED) >= 50  # the links are found at all
    assert not broken_links(), "\n".join(broken_links())


def test_the_link_check_finds_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top), [gone](#nowhere), [file](missing.md), [there](page.md#top), `[code](#x)`\n")
    found = broken_links([page])
    assert len(found) == 2 and "#nowhere" in found[0] and "missing.md" in found[1]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(HERE / target.partition("#")[0]).resolve() for target in relative_links((HERE / "README.md").read_text())}
    assert not [page.name for page in (HERE / "docs").glob("*.md") if page.resolve() not in linked]


def test_the_readmes_caveat_on_keep_is_the_measured_one_word_for_word():
    """The README's caveat on --phase-switch keep is docs/when-hald-helps.md's sentence, as RESULTS.md measured it."""
    words = lambda text: " ".join(text.split())  # noqa: E731
    caveat = re.search(r"Keep was ahead of the reset in one place measured.*?of soft-only\.", words((HERE / "README.md").read_text()))
    assert caveat and caveat.group(0) in words((HERE / "docs" / "when-hald-helps.md").read_text())
    assert "by 1.6, 1.1 and 1.4 points" in words((HERE / "RESULTS.md").read_text())


# ------------------------------------------------------------------------------ the README's figures
# A figure: a number with a decimal point or a sign (33.8, +4.0, -0.8), with its spread when it has one (29.8 +- 1.7: matched
# whole, so a mean cannot borrow another row's spread). Not figures: code (fenced blocks, `inline`), link addresses, and the
# version and paper numbers that follow "arXiv" or "Python".
FIGURE = re.compile(r"(?<![\w.+-])(?:\d+\.\d+|[+-]\d+(?:\.\d+)?)(?:[ \t]*\+-[ \t]*\d+\.\d+)?(?![\w.]*\d)")
COMMAND = re.compile(r"```bash|`(?:python|make|torchrun) [^`]+`|^(?:python|make|torchrun) ", re.M)


def quoted_figures(text: str) -> list[str]:
    prose = re.sub(r"^```(?:python|bash|bibtex)\n.*?^```", "", text, flags=re.S | re.M)  # code; output blocks are quoted figures
    prose = re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`\n]*`", "", prose))
    return [m.group(0) for m in FIGURE.finditer(prose) if not re.search(r"(?:arXiv|Python)\s*$", prose[:m.start()])]


def paragraphs(text: str) -> list[str]:
    """A page cut at its blank lines, a fenced block kept whole."""
    blocks, lines, fence = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if line.strip() or fence:
            lines.append(line)
        elif lines:
            blocks.append("\n".join(lines)), lines.clear()
    return blocks + ["\n".join(lines)] * bool(lines)


def figure_sources() -> list[str]:
    """The texts a README figure may come from: RESULTS.md, every committed text file under results/, and the blocks of a
    docs/ page that state a figure with its command (the block, or the one before it, runs python, make or torchrun)."""
    try:
        committed = subprocess.run(["git", "ls-files", "-z", "results"], cwd=HERE, capture_output=True, text=True, check=True).stdout
        files = [HERE / name for name in committed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a checkout: what is there
        files = [p for p in (HERE / "results").rglob("*") if p.is_file()]
    texts = [(HERE / "RESULTS.md").read_text()]
    for file in files:
        try:
            texts.append(file.read_text())
        except (UnicodeDecodeError, FileNotFoundError):  # pictures, weights
            pass
    for page in sorted((HERE / "docs").glob("*.md")):
        blocks = paragraphs(page.read_text())
        texts += [block for before, block in zip([""] + blocks, blocks) if COMMAND.search(before) or COMMAND.search(block)]
    return texts


def unsupported_figures(text: str, sources: list[str]) -> list[str]:
    def stated(figure: str, source: str) -> bool:
        body = r"\s*\+-\s*".join(re.escape(part.strip()) for part in figure.split("+-"))
        return re.search(rf"(?<![\w.]){body}(?!\d|\.\d)", source) is not None  # a sign stays: +4.0 is not found as 4.0

    return sorted({f for f in quoted_figures(text) if not any(stated(f, source) for source in sources)})


def test_every_figure_the_readme_quotes_is_in_results_or_a_docs_page_with_its_command():
    readme = (HERE / "README.md").read_text()
    sources = figure_sources()
    assert len(quoted_figures(readme)) >= 40  # the table's figures are read at all
    assert unsupported_figures(readme, sources) == [], "figures in README.md found in none of RESULTS.md, results/, docs/"


def test_the_figure_check_refuses_a_made_up_figure():
    """A made-up signed difference and a made-up mean +- std are caught, and so is a real mean given a spread that is not
    its own (0.3 exists elsewhere, 33.8 +- 0.3 nowhere); a number in code is not a quoted figure."""
    readme, sources = (HERE / "README.md").read_text(), figure_sources()
    found = set(unsupported_figures(readme, sources))
    added = lambda text: set(unsupported_figures(text, sources)) - found  # noqa: E731
    assert "33.8 +- 1.7" in readme and added(readme.replace("33.8 +- 1.7", "33.8 +- 0.3", 1)) == {"33.8 +- 0.3"}
    assert added(readme + "\nHALD gained +17.35 points (61.73 +- 0.04 %).\n") == {"+17.35", "61.73 +- 0.04"}
    assert added(readme + "\n`--lr 0.123456` and\n```python\nx = 98.7654\n```\n") == set()


def test_the_phase_switch_table_pairs_each_treatment_with_soft_only_by_seed():
    """tools/evidence_switch.py's table from the committed summaries: each row's mean and per-seed differences are those
    of the runs it names, seed by seed."""
    sys.path.insert(0, str(HERE / "tools"))
    import evidence_switch

    text = evidence_switch.table()
    soft, reset = evidence_switch.load("real", "soft", 10), evidence_switch.load("real", "reset", 10)
    diffs = [reset[k]["final_top1"] - soft[k]["final_top1"] for k in sorted(soft.keys() & reset.keys())]
    row = next(line for line in text.splitlines() if line.startswith("| real | 10 | HALD, reset |"))
    assert diffs and f"**{sum(diffs) / len(diffs):+.1f}** ({', '.join(f'{d:+.1f}' for d in diffs)})" in row
    assert all(reset[k]["config"]["phase_switch"] == "reset" and reset[k]["config"]["seed"] == k for k in reset)


def test_the_candidates_table_pairs_each_candidate_with_soft_only_by_seed_on_both_settings():
    """tools/evidence_switch.py's table of issue 45's candidates: a row per candidate in CANDIDATES' order, and each cell the
    mean and per-seed differences to soft-only of the committed summaries (the reset's at 200 classes recomputed here)."""
    sys.path.insert(0, str(HERE / "tools"))
    import evidence_switch

    rows = [line.split(" | ") for line in evidence_switch.candidates_table().splitlines()[2:]]
    assert [row[0].lstrip("| ") for row in rows] == [label for label, _, _ in evidence_switch.CANDIDATES]
    runs = HERE / "results" / "tiny-imagenet" / "runs"
    top1 = lambda name: [json.loads((runs / f"{name}-s1-seed{k}.json").read_text())["final_top1"] for k in range(3)]  # noqa: E731
    d = [a - b for a, b in zip(top1("hald-soft-120-hard-60-soft-120-adamw-reset-at-each-switch"), top1("soft-only-t-4"))]
    assert rows[0][1] == f"{sum(d) / 3:+.1f} ({', '.join(f'{v:+.1f}' for v in d)})"
    mean, each = rows[0][2].rstrip(" |").split(" ", 1)  # CIFAR-10's: the main table's row, bold there
    assert next(line for line in evidence_switch.table().splitlines() if line.startswith("| real | 10 | HALD, reset |")).endswith(
        f"**{mean}** {each} |")


def test_the_hard_phase_table_names_the_best_on_the_seeds_every_length_has():
    """tools/evidence.py's gain_table (the hard-phase tables of evidence_switch and evidence_classes): each cell is the
    mean and every seed's difference, a length measured nowhere has no column, and the best is chosen on the seeds all
    measured lengths share, not on unequal means."""
    sys.path.insert(0, str(HERE / "tools"))
    import evidence

    rows = {("real", 10): {"h60": {0: 1.0, 1: 3.0, 2: 2.0}, "h5": {0: 1.5}, "h30": {}}}
    last = evidence.gain_table("set", rows, {"h60": "hard 60", "h30": "hard 30", "h5": "hard 5"}).splitlines()[-1]
    assert last == "| real | 10 | +2.0 (+1.0, +3.0, +2.0) | +1.5 (+1.5) | hard 5; seed 0 |"
    rows["real", 10]["h5"].update({1: 1.0, 2: 1.0})  # on seeds 0-2: 2.0 against 1.17
    assert evidence.gain_table("set", rows, {"h60": "hard 60", "h5": "hard 5"}).endswith("| hard 60; seeds 0, 1, 2 |")
    rows["real", 10]["h5"].update({0: 1.0, 1: 3.0, 2: 1.96})  # 1.99 against 2.0: level at the table's precision, both named, best first
    assert evidence.gain_table("set", rows, {"h60": "hard 60", "h5": "hard 5"}).endswith("| hard 60 = hard 5; seeds 0, 1, 2 |")


def test_the_crossover_is_where_the_mean_gain_changes_sign_interpolated_in_log_s(monkeypatch):
    """tools/evidence_classes.py's crossover s*: +2 at s = 2 and -2 at 10 cross at sqrt(20); a count that never turns
    negative has none."""
    sys.path.insert(0, str(HERE / "tools"))
    import evidence_classes

    monkeypatch.setattr(evidence_classes, "gains", lambda: {(10, 1): [4.0], (10, 2): [1.0, 3.0], (10, 10): [-2.0], (200, 1): [1.0]})
    assert evidence_classes.crossovers() == ("10 classes: s* = 4.5 (between 2, +2.0, and 10, -2.0); "
                                             "200 classes: none up to s = 1 (+1.0 at 1)")


def test_class_subsets_nest_and_the_restricted_teacher_keeps_those_classes_logits(tmp_path):
    """tools/evidence_classes.py: the 10 classes are among the 50, both sorted; the teacher restricted to a subset gives
    exactly the 200-class teacher's logits of those classes (so its labels are softmax over them alone)."""
    sys.path.insert(0, str(HERE / "tools"))
    import evidence_classes

    source = HERE / "results" / "tiny-imagenet" / "teacher.pt"
    full = hald.read_weights(source)
    ten, fifty = (evidence_classes.subset(full["classes"], k) for k in (10, 50))
    assert len(set(ten)) == 10 and len(set(fifty)) == 50 and set(ten) < set(fifty) and ten == sorted(ten)
    part = hald.read_weights(evidence_classes.restrict_teacher(source, ten, tmp_path / "teacher.pt"))
    assert part["classes"] == ten and part["arch"] == full["arch"]
    models = [hald.model_from_weights(w, len(w["classes"]), 32, "teacher").eval() for w in (full, part)]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(models[0](x)[:, [full["classes"].index(c) for c in ten]], models[1](x), atol=1e-5)


def test_gradient_alignment_is_one_where_the_soft_labels_are_the_hard_targets():
    """tools/alignment.py's cosine: at T 1, without CutMix or smoothing, a stored label equal to the crop's one-hot class
    makes the soft loss (KL) and the hard loss (cross-entropy) differ by a constant, so their gradients are one direction;
    a teacher's real labels give less."""
    sys.path.insert(0, str(HERE / "tools"))
    import alignment

    images, labels, classes = hald.load_distilled(DEMO / "distilled", 2)
    teacher = hald.load_teachers(str(DEMO / "teacher.pt"), "", classes, 32, hald.NORMALIZATIONS["imagenet"], log=lambda *_: None)[0]
    cache = hald.SoftLabelCache.build(teacher, images, size=32, crops_per_image=1, batch_size=4, temperature=1.0, cutmix=False,
                                      gen=torch.Generator().manual_seed(0), log=lambda *_: None)
    torch.manual_seed(0)
    net, stats = hald.build_model("convnet_bn8", 10, 32), hald.NORMALIZATIONS["imagenet"]
    real = alignment.cosine(net, cache, images, labels, 10, [0, 1], 0.0, 1.0, stats)
    cache.probs = torch.nn.functional.one_hot(labels[cache.index.long()], 10).half()
    assert alignment.cosine(net, cache, images, labels, 10, [0, 1], 0.0, 1.0, stats) == pytest.approx(1.0, abs=1e-4)
    assert -1 <= real < 0.999


def test_adam_memory_observes_without_changing_the_run(tmp_path, capsys):
    """tools/adam_memory.py: its observers leave the student bit for bit as a plain run of the same flags trains it, its
    trace has one row an epoch in the schedule's phases, and with AdamW's state kept the hard phase's cross-entropy
    gradients show in the second moment after the switch (larger than at the end of the first soft phase)."""
    sys.path.insert(0, str(HERE / "tools"))
    import adam_memory

    flags = ["--data", str(DEMO / "distilled"), "--val", str(DEMO / "val"), "--teacher", str(DEMO / "teacher.pt"), "--ipc", "2",
             "--slc", "2", "--epochs", "10", "--soft-epochs", "6", "--model", "convnet_bn8", "--phase-switch", "keep", "--eval-every", "0",
             "--drift-crops", "0", "--no-check-teacher"]
    adam_memory.main(flags + ["--out", str(tmp_path / "traced"), "--save-model", str(tmp_path / "traced.pt")])
    assert hald.main(flags + ["--out", str(tmp_path / "plain"), "--save-model", str(tmp_path / "plain.pt")]) == 0
    a, b = (torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"] for name in ("traced", "plain"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = json.loads((tmp_path / "traced" / "adam_memory.json").read_text())
    assert [r["phase"] for r in rows] == ["soft"] * 3 + ["hard"] * 4 + ["soft"] * 3 and all(r["steps"] == 2 for r in rows)
    summary = adam_memory.summarize(rows)
    assert summary["grad_sq_ratio"] > 1 and summary["second_moment_after_hard"] > 1
    assert "x after the hard phase" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Soft -> Hard -> Soft"):
        adam_memory.summarize(rows[:5])
