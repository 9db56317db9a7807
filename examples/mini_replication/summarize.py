"""The study's tables and plots from its runs' ``metrics.jsonl`` (study.py calls it after every stage ran; it also
reads a study that is not finished: what has not run is left out and listed).

    python examples/mini_replication/summarize.py runs/mini_table1   # writes results.md, results.json, plots/
    python examples/mini_replication/summarize.py runs/mini_table1 --docs docs/results.md

``--docs`` also puts the same tables into that file, between the lines ``<!-- study:begin -->`` and
``<!-- study:end -->`` (what was there is replaced), and copies the plots next to it (``img/<study>/``), so that
no number of the documented table is typed by hand.

Table 1 in miniature: accuracy from S and T on ``test`` (mean and standard error over the seeds, at each method's
learning rate chosen on ``val``) and the drop against the text teacher (its accuracy from T minus the student's).
Table 3 in miniature: the same on ``forget``, a task no stage trains on, before and after each method.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

LABELS = {
    "sft_ref": "SFT on reference answers",
    "offline_kd": "offline KD (SFT on teacher answers)",
    "gkd": "GKD (forward KL, student samples)",
    "xopd_lam0.5": "X-OPD, lam 0.5",
    "xopd_lam0": "X-OPD, lam 0 (speech only)",
    "xopd_lam1": "X-OPD, lam 1 (text only)",
    "xopd_rkl": "X-OPD, reverse KL, lam 0.5",
}
ON_POLICY = ("gkd", "xopd_lam0.5", "xopd_lam0", "xopd_lam1", "xopd_rkl")


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run examples/mini_replication/run.sh first")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def final_eval(run: Path) -> dict:
    """The last evaluation row of a run (its ``eval/...`` metrics)."""
    evals = [r for r in read_rows(run) if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise ValueError(f"{run}: no evaluation row (eval/...)")
    return evals[-1]


def run_name(method: str, lr: float, seed: int) -> str:
    return f"runs/{method}/lr{lr:g}_seed{seed}"


def done(out: Path, name: str) -> bool:
    return (out / name / "DONE").exists()


def choose_lr(out: Path, method: str, grid: list[float], seed: int) -> float | None:
    """The grid's rate with the best accuracy from S on val (ties: from T, then the smaller rate); None until
    every rate has run."""
    scores = []
    for lr in grid:
        name = run_name(method, lr, seed)
        if not done(out, name):
            return None
        row = final_eval(out / name)
        scores.append((row["eval/val/acc_speech"], row["eval/val/acc_text"], -lr))
    return -max(scores)[2]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def binomial_se(p: float, n: float) -> float:
    return 100 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def summarize(out: Path) -> dict[str, Any]:
    plan = json.loads((out / "plan.json").read_text())
    grid, seeds = plan["lr_grid"], plan["seeds"]
    result: dict[str, Any] = {"plan": plan, "missing": []}
    stages = {}
    for name in ("teacher_sft", "student_sft", "start"):
        if done(out, name):
            stages[name] = final_eval(out / name)
        else:
            result["missing"].append(name)
    if "teacher_sft" in stages and "student_sft" in stages:
        result["text_sft"] = {who: {s: 100 * stages[f"{who}_sft"][f"eval/{s}/acc_text"] for s in ("val", "test", "forget")}
                              for who in ("teacher", "student")}
    start = stages.get("start")
    if start is not None:
        result["teacher"] = {s: 100 * start[f"eval/{s}/acc_teacher_text"] for s in ("test", "forget")}
        result["start"] = {s: {"acc_speech": 100 * start[f"eval/{s}/acc_speech"],
                               "acc_text": 100 * start[f"eval/{s}/acc_text"],
                               "se_speech": binomial_se(start[f"eval/{s}/acc_speech"], start[f"eval/{s}/prompts"]),
                               "se_text": binomial_se(start[f"eval/{s}/acc_text"], start[f"eval/{s}/prompts"]),
                               "prompts": start[f"eval/{s}/prompts"]} for s in ("test", "forget")}
    methods = []
    for method in plan["methods"]:
        entry: dict[str, Any] = {"method": method, "label": LABELS[method], "grid": []}
        for lr in grid:
            name = run_name(method, lr, seeds[0])
            if done(out, name):
                row = final_eval(out / name)
                entry["grid"].append({"lr": lr, "val_speech": 100 * row["eval/val/acc_speech"],
                                      "val_text": 100 * row["eval/val/acc_text"]})
        lr = choose_lr(out, method, grid, seeds[0])
        if lr is None:
            result["missing"].append(f"{method} (grid)")
            methods.append(entry)
            continue
        entry["lr"] = lr
        finals, curves = [], []
        for seed in seeds:
            name = run_name(method, lr, seed)
            if not done(out, name):
                result["missing"].append(name)
                continue
            rows = read_rows(out / name)
            finals.append(final_eval(out / name))
            train = [r for r in rows if "kl_cm" in r]
            curves.append({"seed": seed, "step": [r["step"] for r in train],
                           "kl_cm": [r["kl_cm"] for r in train], "kl_im": [r["kl_im"] for r in train],
                           "loss": [r.get("loss", float("nan")) for r in train]})
        entry["seeds"] = [c["seed"] for c in curves]
        entry["curves"] = curves
        for s in ("test", "forget"):
            for kind in ("speech", "text"):
                values = [100 * f[f"eval/{s}/acc_{kind}"] for f in finals]
                if values:
                    entry[f"{s}_{kind}"] = mean_se(values)
                    entry[f"{s}_{kind}_values"] = values
        methods.append(entry)
    result["methods"] = methods
    timings = {}
    if (out / "timings.jsonl").exists():
        for line in (out / "timings.jsonl").read_text().splitlines():
            t = json.loads(line)
            timings[t["stage"]] = t["wall_s"]
    result["wall_s"] = timings
    result["total_wall_s"] = sum(timings.values())
    return result


def _pm(pair: tuple[float, float] | None) -> str:
    if pair is None:
        return "-"
    mean, se = pair
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} ± {se:.1f}"


def _drop(teacher: float | None, pair: tuple[float, float] | None) -> str:
    return "-" if teacher is None or pair is None else f"{teacher - pair[0]:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = []
    if "text_sft" in result:
        sft = result["text_sft"]
        lines += ["Text SFT (accuracy from T, %):", "", "| LLM | val | test | forget |", "|---|---|---|---|"]
        for who, steps in (("teacher", plan["teacher_sft_steps"]), ("student", plan["student_sft_steps"])):
            lines.append(f"| {who} ({steps} steps) | {sft[who]['val']:.1f} | {sft[who]['test']:.1f} | "
                         f"{sft[who]['forget']:.1f} |")
        lines.append("")
    teacher = result.get("teacher")
    start = result.get("start")
    for s, title in (("test", "Table 1 (test"), ("forget", "Table 3, forgetting (forget")):
        n = start[s]["prompts"] if start else 0
        lines += [f"{title}, {n:.0f} prompts): accuracy in %, mean ± standard error over seeds "
                  f"{plan['seeds']} at each method's rate chosen on val (binomial s.e. for the single models); "
                  "drop = the teacher's accuracy from T minus the student's.", "",
                  "| model | lr | acc S | acc T | drop S | drop T |", "|---|---|---|---|---|---|"]
        t = teacher[s] if teacher else None
        if teacher:
            lines.append(f"| text teacher (T only) | - | - | {t:.1f} | - | - |")
        if start:
            st = start[s]
            lines.append(f"| student before (after speech alignment) | - | {st['acc_speech']:.1f} ({st['se_speech']:.1f}) "
                         f"| {st['acc_text']:.1f} ({st['se_text']:.1f}) | {t - st['acc_speech']:.1f} | "
                         f"{t - st['acc_text']:.1f} |")
        for m in result["methods"]:
            if "lr" not in m or f"{s}_speech" not in m:
                continue
            lines.append(f"| + {m['label']} (n={len(m['seeds'])}) | {m['lr']:g} | {_pm(m[f'{s}_speech'])} | "
                         f"{_pm(m[f'{s}_text'])} | {_drop(t, m[f'{s}_speech'])} | {_drop(t, m[f'{s}_text'])} |")
        lines.append("")
    lines += [f"Learning-rate grid (seed {plan['seeds'][0]}, accuracy on val in %; the rate with the best S, then T, "
              "then the smaller rate, is chosen):", "", "| method | " + " | ".join(f"lr {lr:g} S / T" for lr in
                                                                                  plan["lr_grid"]) + " | chosen |",
              "|---|" + "---|" * (len(plan["lr_grid"]) + 1)]
    for m in result["methods"]:
        cells = {g["lr"]: f"{g['val_speech']:.1f} / {g['val_text']:.1f}" for g in m["grid"]}
        lines.append(f"| {m['method']} | " + " | ".join(cells.get(lr, "-") for lr in plan["lr_grid"])
                     + f" | {m['lr']:g} |" if "lr" in m else f"| {m['method']} | " +
                     " | ".join(cells.get(lr, "-") for lr in plan["lr_grid"]) + " | - |")
    lines += ["", "Training (sampled-token KL estimates on the student's own samples, mean over seeds; none for SFT):",
              "", "| method | steps | kl_cm first -> last | kl_im first -> last |", "|---|---|---|---|"]
    for m in result["methods"]:
        if m["method"] in ON_POLICY and m.get("curves"):
            lines.append(f"| {m['method']} | {len(m['curves'][0]['step'])} | {_arrow(m['curves'], 'kl_cm')} | "
                         f"{_arrow(m['curves'], 'kl_im')} |")
    if result["wall_s"]:
        stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in result["wall_s"].items())
        lines += ["", f"Wall time (min): {stages}; total {result['total_wall_s'] / 60:.1f}."]
    if result["missing"]:
        lines += ["", "Not run yet: " + ", ".join(result["missing"]) + "."]
    return "\n".join(lines) + "\n"


def _mean_curve(curves: list[dict], key: str) -> list[float]:
    length = min(len(c[key]) for c in curves)
    return [sum(c[key][i] for c in curves) / len(curves) for i in range(length)]


def _arrow(curves: list[dict], key: str) -> str:
    values = _mean_curve(curves, key)
    if not values or any(math.isnan(v) for v in (values[0], values[-1])):
        return "-"
    return f"{values[0]:.3f} -> {values[-1]:.3f}"


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``accuracy.png`` (test and forget accuracy by method) and ``kl_curves.png`` (per-step kl_cm / kl_im)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    methods = [m for m in result["methods"] if "test_speech" in m]
    if methods and "start" in result:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, s in zip(axes, ("test", "forget")):
            names = ["before"] + [m["method"] for m in methods]
            for k, (kind, color) in enumerate((("speech", "tab:blue"), ("text", "tab:orange"))):
                means = [result["start"][s][f"acc_{kind}"]] + [m[f"{s}_{kind}"][0] for m in methods]
                errs = [0.0] + [0.0 if math.isnan(m[f"{s}_{kind}"][1]) else m[f"{s}_{kind}"][1] for m in methods]
                xs = [i + (k - 0.5) * 0.38 for i in range(len(names))]
                ax.bar(xs, means, 0.38, yerr=errs, capsize=3, color=color, label=f"from {kind[0].upper()}")
            ax.axhline(result["teacher"][s], color="k", ls="--", lw=1, label="teacher from T")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(f"{s}: accuracy (mean ± s.e. over seeds)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
        axes[0].legend(loc="lower left")
        fig.tight_layout()
        path = out_dir / "accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    curves = [m for m in result["methods"] if m["method"] in ON_POLICY and m.get("curves")]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key in zip(axes, ("kl_cm", "kl_im")):
            for m in curves:
                values = _mean_curve(m["curves"], key)
                if values and not all(math.isnan(v) for v in values):
                    ax.plot(range(1, len(values) + 1), values, marker="o", label=m["method"])
            ax.set_title(f"{key} per step (mean over seeds)")
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        path = out_dir / "kl_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(out: Path) -> dict[str, Any]:
    result = summarize(out)
    result["plots"] = [str(p.relative_to(out)) for p in plot(result, out / "plots")]
    (out / "results.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    markdown = to_markdown(result)
    if result["plots"]:
        markdown += "\nPlots: " + ", ".join(f"![{p}]({p})" for p in result["plots"]) + "\n"
    (out / "results.md").write_text(markdown)
    print(markdown)
    return result


BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def write_docs(out: Path, result: dict[str, Any], doc: Path) -> None:
    """The tables of ``result`` into ``doc`` between BEGIN and END, its plots copied to ``img/<out's name>/``."""
    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{doc}: needs one line {BEGIN} and, after it, one line {END}")
    img = doc.parent / "img" / out.name
    img.mkdir(parents=True, exist_ok=True)
    links = []
    for rel in result["plots"]:
        shutil.copyfile(out / rel, img / Path(rel).name)
        links.append(f"![{Path(rel).stem}]({img.relative_to(doc.parent).as_posix()}/{Path(rel).name})")
    block = to_markdown(result) + ("\n" + "\n".join(links) + "\n" if links else "")
    head, rest = text.split(BEGIN)
    doc.write_text(head + BEGIN + "\n" + block + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to put the tables into (see above)")
    args = parser.parse_args(argv)
    result = write(args.root)
    if args.docs:
        write_docs(args.root, result, args.docs)


if __name__ == "__main__":
    main()
