"""When does HALD help? Every committed HALD / soft-only pair (same student, budget and seed), with
the quantities known before the student trains, and how well a single threshold on each of them
separates the settings where HALD won from those where it lost.

    python tools/when_hald_helps.py          # the tables and the separations, from results/ (no data, nothing trained)

Two analyses: HALD with AdamW's state kept across the phase switch (the authors', every setting measured), and
HALD with it reset at each switch (--phase-switch reset, tools/evidence_switch.py), where measured.

A setting is one student, image set and budget s (stored crops per image, IPC 10 everywhere, so the
labels per class are 10 s); its gain is HALD's last-epoch top-1 minus soft-only's, the mean over the
seeds measured for both. Known before training, per setting: s; the teacher's crop mismatch (share of
random crops whose teacher top-1 is not the image's class) and the trace of the crop covariance of its
probabilities (both over the relabel crop distribution, as every summary's drift report gives them),
that trace over s (the paper's irreducible error term Tr(Sigma)/s); the teacher's top-1 on the
validation set and its agreement with the images' classes; the paper's gradient alignment, the cosine between the
soft-loss and hard-loss gradients over the first 10 soft epochs (tools/alignment.py, results/alignment.json, seed 0).
Measured only by training: the gap from soft-only to the unlimited-label ceiling, where a ceiling exists.

A rule counts only where it holds on settings it was not fitted on: each analysis also splits its settings into two
halves (a fixed shuffle, random.Random(0)), fits each quantity's threshold on one half and scores it on the other, both
ways round.
"""
import json
import random
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR, TINY, SUBSETS = ROOT / "results" / "cifar10", ROOT / "results" / "tiny-imagenet", ROOT / "results" / "classes"
SWITCH = CIFAR / "switch"
ALIGNMENT = json.loads((ROOT / "results" / "alignment.json").read_text()) if (ROOT / "results" / "alignment.json").exists() else {}

# (setting, folder, soft-only stem, HALD stem (hald.py's default split for that student), ceiling stem or None, budgets)
PAIRS = [
    ("CIFAR-10 real, ConvNet-3 BN", CIFAR / "runs", "convnet-3-bn-soft-only-t-4", "convnet-3-bn-hald-soft-120-hard-60-soft-120",
     "ceiling-soft-only-t-4-convnet-3-bn", (1, 2, 10)),
    ("CIFAR-10 real, ResNet-18", CIFAR / "runs", "resnet-18-soft-only-t-4", "resnet-18-hald-authors-split-soft-75-hard-150-soft-75",
     "ceiling-soft-only-t-4-resnet-18", (1, 2, 10)),
    ("CIFAR-10 real, ConvNet-3 IN", CIFAR / "runs", "soft-only-t-4", "hald-label-smoothing-0-1-t-4",
     "ceiling-soft-only-t-4-convnet-3-in", (1, 2, 10)),
    ("Tiny 32 px real, ConvNet-3 BN 64", TINY / "runs", "soft-only-t-4", "hald-soft-120-hard-60-soft-120",
     "ceiling-soft-only-a-fresh-label-per-crop-t-4", (1, 2)),
    ("Tiny 32 px real, ConvNet-3 BN 128", TINY / "runs", "soft-only-t-4-width-128", "hald-soft-120-hard-60-soft-120-width-128", None, (1,)),
    ("Tiny 32 px real, ConvNet-3 IN 64", TINY / "runs", "instance-norm-soft-only-t-4", "instance-norm-hald-authors-split", None, (1,)),
]
for kind in ("recover", "select"):
    PAIRS += [(f"CIFAR-10 {kind}, ConvNet-3 BN", CIFAR / "generated", f"cifar10-{kind}-soft", f"cifar10-{kind}-shs",
               f"cifar10-{kind}-soft", (1, 2, 10)),
              (f"Tiny 32 px {kind}, ConvNet-3 BN 64", TINY / "generated", f"tiny32-{kind}-soft", f"tiny32-{kind}-shs", None, (1, 2)),
              (f"Tiny 32 px {kind}, ConvNet-3 BN 128", TINY / "generated", f"tiny32-{kind}-width-128-soft",
               f"tiny32-{kind}-width-128-shs", None, (1,))]
# Tiny-ImageNet's nested subsets of 10 and 50 classes (tools/evidence_classes.py), and its 200 classes at s = 10
PAIRS += [(f"Tiny 32 px real, {k} classes, ConvNet-3 BN 64", SUBSETS, f"c{k}-soft", f"c{k}-shs-keep", f"c{k}-soft", (1, 2, 10))
          for k in (10, 50)]
PAIRS += [("Tiny 32 px real, ConvNet-3 BN 64", SUBSETS, "c200-soft", "c200-shs-keep", None, (10,))]
# HALD with AdamW reset at each phase switch: the HALD stem is a path, beside the same soft-only
RESET = [("CIFAR-10 real, ConvNet-3 BN", CIFAR / "runs", "convnet-3-bn-soft-only-t-4", SWITCH / "real-reset",
          "ceiling-soft-only-t-4-convnet-3-bn", (1, 2, 10)),
         ("CIFAR-10 real, ResNet-18", CIFAR / "runs", "resnet-18-soft-only-t-4", SWITCH / "real-r18-reset",
          "ceiling-soft-only-t-4-resnet-18", (1, 2, 10)),
         ("CIFAR-10 real, ConvNet-3 IN", CIFAR / "runs", "soft-only-t-4", SWITCH / "real-in-reset", "ceiling-soft-only-t-4-convnet-3-in",
          (1, 2, 10)),
         ("Tiny 32 px real, ConvNet-3 BN 64", TINY / "runs", "soft-only-t-4", TINY / "runs" / "hald-soft-120-hard-60-soft-120-adamw-reset-at-each-switch",
          "ceiling-soft-only-a-fresh-label-per-crop-t-4", (1, 2)),
         ("Tiny 32 px real, ConvNet-3 BN 64", SUBSETS, "c200-soft", SUBSETS / "c200-shs", None, (10,)),
         # tools/evidence_tiny.py's reset rows of the other two 200-class students
         ("Tiny 32 px real, ConvNet-3 BN 128", TINY / "runs", "soft-only-t-4-width-128",
          TINY / "runs" / "hald-soft-120-hard-60-soft-120-adamw-reset-at-each-switch-width-128", None, (1,)),
         ("Tiny 32 px real, ConvNet-3 IN 64", TINY / "runs", "instance-norm-soft-only-t-4",
          TINY / "runs" / "instance-norm-hald-authors-split-adamw-reset-at-each-switch", None, (1,))]
RESET += [(f"CIFAR-10 {kind}, ConvNet-3 BN", CIFAR / "generated", f"cifar10-{kind}-soft", SWITCH / f"{kind}-reset",
           f"cifar10-{kind}-soft", (1, 2, 10)) for kind in ("recover", "select")]
RESET += [(f"Tiny 32 px real, {k} classes, ConvNet-3 BN 64", SUBSETS, f"c{k}-soft", SUBSETS / f"c{k}-shs", f"c{k}-soft", (1, 2, 4, 10))
          for k in (10, 50)]
RESET += [("CIFAR-10 real, ConvNet-3 BN", SWITCH, "real-soft", SWITCH / "real-reset", None, (4,))]  # s = 4: evidence_switch's own soft-only
PREDICTORS = ("s", "teacher crop mismatch", "crop trace", "crop trace / s", "teacher top-1", "teacher agreement", "gradient cosine",
              "gap to ceiling")


def load(folder: Path, stem: str) -> dict[int, dict]:
    """The committed summaries of one row, by seed."""
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob(f"{stem}-seed*.json"))]
    return {run["config"]["seed"]: run for run in runs}


def settings(pairs: list) -> list[dict]:
    """One row per setting with both schedules measured at one seed at least."""
    rows = []
    for name, folder, soft_stem, hald_stem, ceiling_stem, budgets in pairs:
        ceiling = load(folder, f"{ceiling_stem}-s300") if ceiling_stem else {}
        for s in budgets:
            where = (hald_stem.parent, hald_stem.name) if isinstance(hald_stem, Path) else (folder, hald_stem)
            soft, hald = load(folder, f"{soft_stem}-s{s}"), load(where[0], f"{where[1]}-s{s}")
            seeds = sorted(set(soft) & set(hald))
            if not seeds:
                continue
            first = soft[seeds[0]]
            drift = first["drift"]
            soft_mean = statistics.mean(soft[k]["final_top1"] for k in seeds)
            rows.append({"setting": name, "s": s, "seeds": len(seeds), "soft-only": soft_mean,
                         "gain": statistics.mean(hald[k]["final_top1"] - soft[k]["final_top1"] for k in seeds),
                         "teacher crop mismatch": drift["teacher_crop_mismatch"], "crop trace": drift["teacher_crop_trace_mean"],
                         "crop trace / s": drift["teacher_crop_trace_mean"] / s, "teacher top-1": first["teacher_top1"],
                         "teacher agreement": first["teacher_agreement"],
                         "gradient cosine": ALIGNMENT.get(f"{name} | s={s}", {}).get("cosine_mean"),
                         "gap to ceiling": statistics.mean(c["final_top1"] for c in ceiling.values()) - soft_mean if ceiling else None})
    return rows


def best_threshold(rows: list[dict], key: str) -> tuple:
    """The single threshold on `key` (HALD predicted to win on one side) that classifies the most settings
    right: (right, out of, the rule in words, the rule: value -> HALD wins). Settings without the quantity are left out."""
    known = [(r[key], r["gain"] > 0) for r in rows if r[key] is not None]
    values = sorted({v for v, _ in known})
    cuts = [(a + b) / 2 for a, b in zip(values, values[1:])] or values
    wins = sum(won for _, won in known)  # a threshold must beat always giving one answer
    best = max((wins, len(known), "no threshold beats always HALD", lambda v: True),
               (len(known) - wins, len(known), "no threshold beats always soft-only", lambda v: False), key=lambda b: b[0])
    for cut in cuts:
        for above in (True, False):
            right = sum((v > cut) == above if won else (v > cut) != above for v, won in known)
            if right > best[0]:
                best = (right, len(known), f"HALD when {key} {'>' if above else '<'} {cut:.3g}",
                        lambda v, cut=cut, above=above: (v > cut) == above)
    return best


def held_out(rows: list[dict], key: str) -> str:
    """Fit the threshold on one half of the settings (a fixed shuffle), score it on the other, both ways round."""
    rows = [r for r in rows if r[key] is not None]
    order = sorted(rows, key=lambda r: (r["setting"], r["s"]))
    random.Random(0).shuffle(order)
    halves, said = (order[::2], order[1::2]), []
    for fit, test in (halves, halves[::-1]):
        if not fit or not test:
            return "too few settings to split"
        rule, majority = best_threshold(fit, key), 2 * sum(r["gain"] > 0 for r in fit) >= len(fit)
        right, plain = (sum(f(r[key]) == (r["gain"] > 0) for r in test) for f in (rule[3], lambda v: majority))
        said.append(f"{right} of {len(test)} held out, always {'HALD' if majority else 'soft-only'} {plain} "
                    f"({rule[2]} on the other {len(fit)})")
    return "; ".join(said)


def rank_correlation(rows: list[dict], key: str) -> float | None:
    """Spearman's rho between `key` and HALD's gain (ranks with ties averaged), over the settings that have `key`."""
    known = [(r[key], r["gain"]) for r in rows if r[key] is not None]
    if len(known) < 3:
        return None

    def ranks(values):
        ordered = sorted(values)
        return [statistics.mean(i for i, w in enumerate(ordered) if w == v) for v in values]
    a, b = ranks([k for k, _ in known]), ranks([g for _, g in known])
    return statistics.correlation(a, b) if len(set(a)) > 1 and len(set(b)) > 1 else None


def report(rows: list[dict]) -> None:
    print("| setting | s | seeds | soft-only % | HALD - soft-only | teacher crop mismatch | crop trace | trace / s | "
          "teacher top-1 % | teacher agreement % | gradient cosine | gap to ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["gain"]):
        gap, cos = (f"{r[k]:.{d}f}" if r[k] is not None else "" for k, d in (("gap to ceiling", 1), ("gradient cosine", 3)))
        print(f"| {r['setting']} | {r['s']} | {r['seeds']} | {r['soft-only']:.1f} | {r['gain']:+.1f} | {r['teacher crop mismatch']:.3f} | "
              f"{r['crop trace']:.3f} | {r['crop trace / s']:.3f} | {r['teacher top-1']:.1f} | {r['teacher agreement']:.1f} | {cos} | {gap} |")
    print(f"\nHALD won (gain > 0) in {sum(r['gain'] > 0 for r in rows)} of {len(rows)} settings. "
          "The best single threshold on each quantity, on all settings, then fitted on one half and scored on the other:")
    for key in PREDICTORS:
        right, total, rule, _ = best_threshold(rows, key)
        rho = rank_correlation(rows, key)
        print(f"- {key}: {right} of {total} settings right ({rule}); {held_out(rows, key)}; rank correlation with the gain "
              + (f"{rho:+.2f}" if rho is not None else "n/a"))


def main():
    print("HALD with AdamW's state kept across the phase switch (the authors', --phase-switch keep):\n")
    report(settings(PAIRS))
    print("\nHALD with AdamW reset at each phase switch (--phase-switch reset, hald.py's default), where measured:\n")
    report(settings(RESET))


if __name__ == "__main__":
    main()
