"""AdamW's memory across HALD's phase switch: how much larger the hard phase's gradients are than the soft phase's, and
how long AdamW's second moment carries their size into the last soft phase.

    python tools/adam_memory.py --out runs/memory/c10-keep --phase-switch keep --slc 100 ...   # hald.py's flags
    python tools/adam_memory.py --show results/adam-memory/cifar10-real-s10-seed0-keep.json    # a trace (or OUT) again

One hald.py run with its own flags (one schedule, one seed) and two observers that change nothing it computes: before every
AdamW step the mean squared gradient over the student's parameters, after every epoch the mean of AdamW's second moment
(exp_avg_sq, raw: not bias-corrected). OUT/adam_memory.json (OUT: the run's --out) holds one row an epoch (phase, loss, steps, mean squared
gradient, second moment); the summary printed at the end compares the phases: the squared gradients of the last 20
epochs of the first soft phase and of the hard phase, the second moment at each phase's end against its value at the
end of the first soft phase, and how many epochs of the last soft phase pass before it is under 4 times that value
(AdamW's steps at least half the size they had in the first soft phase, the learning rate aside).
"""
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hald  # noqa: E402


def trace_run(cfg: hald.Config) -> list[dict]:
    """hald.py's train_all on cfg, observed: one row an epoch (see the module's doc)."""
    rows, squares = [], []
    run_epoch, make_optimizer = hald.run_epoch, hald.make_optimizer

    def before_step(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        squares.append(float(sum(g.pow(2).sum() for g in grads) / sum(g.numel() for g in grads)))

    def observed_optimizer(*args, **kwargs):
        opt = make_optimizer(*args, **kwargs)
        opt.register_step_pre_hook(before_step)
        return opt

    def observed_epoch(phase, net, opt, *args, **kwargs):
        loss = run_epoch(phase, net, opt, *args, **kwargs)
        moments = [s["exp_avg_sq"] for s in opt.state.values() if "exp_avg_sq" in s]
        rows.append({"phase": phase, "loss": float(loss), "steps": len(squares), "grad_sq": statistics.fmean(squares),
                     "exp_avg_sq": float(sum(m.sum() for m in moments) / sum(m.numel() for m in moments))})
        squares.clear()
        return loss

    hald.run_epoch, hald.make_optimizer = observed_epoch, observed_optimizer
    try:
        hald.train_all(cfg)
    finally:
        hald.run_epoch, hald.make_optimizer = run_epoch, make_optimizer
    return rows


def summarize(rows: list[dict]) -> dict:
    """The phases' squared gradients and second moments (a Soft -> Hard -> Soft trace)."""
    ends = [k for k in range(len(rows)) if k + 1 == len(rows) or rows[k + 1]["phase"] != rows[k]["phase"]]
    if [rows[k]["phase"] for k in ends] != ["soft", "hard", "soft"]:
        raise ValueError(f"a Soft -> Hard -> Soft trace is needed, got the phases {[rows[k]['phase'] for k in ends]}")
    soft, hard = (statistics.fmean(r["grad_sq"] for r in rows[max(a, b - 19):b + 1]) for a, b in ((0, ends[0]), (ends[0] + 1, ends[1])))
    base = rows[ends[0]]["exp_avg_sq"]
    last = range(ends[1] + 1, len(rows))
    under = next((k - ends[1] for k in last if rows[k]["exp_avg_sq"] < 4 * base), None)
    return {"steps_per_epoch": rows[0]["steps"], "grad_sq_soft": soft, "grad_sq_hard": hard, "grad_sq_ratio": hard / soft,
            "second_moment_after_hard": rows[ends[1]]["exp_avg_sq"] / base, "second_moment_at_end": rows[-1]["exp_avg_sq"] / base,
            "last_soft_epochs": len(last), "epochs_until_under_4x": under}


def show(rows: list[dict]) -> None:
    s = summarize(rows)
    under = (f"after {s['epochs_until_under_4x']} of its {s['last_soft_epochs']} epochs" if s["epochs_until_under_4x"] is not None
             else f"not within its {s['last_soft_epochs']} epochs")
    print(f"{s['steps_per_epoch']} steps an epoch; mean squared gradient, last 20 epochs: soft {s['grad_sq_soft']:.3g}, hard "
          f"{s['grad_sq_hard']:.3g} ({s['grad_sq_ratio']:.0f} x); AdamW's second moment against the end of the first soft phase: "
          f"{s['second_moment_after_hard']:.0f} x after the hard phase, {s['second_moment_at_end']:.1f} x at the last epoch; "
          f"under 4 x in the last soft phase {under}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--show"] and len(argv) == 2:
        path = Path(argv[1])
        return show(json.loads((path / "adam_memory.json" if path.is_dir() else path).read_text()))
    cfg = hald.parse_config(argv)  # the demo without --data compares two schedules: their rows would interleave
    if cfg.seeds or len(cfg.schedule.split()) != 1:
        sys.exit(f"adam_memory.py traces one run: give one --schedule (got {cfg.schedule!r}) and no --seeds")
    rows = trace_run(cfg)
    hald.save_atomic(json.dumps(rows, indent=0), Path(cfg.out) / "adam_memory.json")
    show(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
