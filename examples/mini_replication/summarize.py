"""The mini replication's table from the runs' ``metrics.jsonl``: accuracy from S and T and the drop against the
text teacher, as in the X-OPD paper's Table 1 (one benchmark here, so "avg drop" is the drop itself).

    python examples/mini_replication/summarize.py runs/mini_replication   # writes results.md and results.json there
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METHODS = [("offline_kd", "+ offline KD (SFT on teacher answers, lam 0.5)"), ("xopd_lam0.5", "+ X-OPD, lam 0.5"),
           ("xopd_lam0", "+ X-OPD, lam 0 (speech only)"), ("xopd_lam1", "+ X-OPD, lam 1 (text only)")]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run examples/mini_replication/run.sh first")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _last_eval(rows: list[dict], where: Path) -> dict:
    evals = [r for r in rows if "eval/acc_speech" in r]
    if not evals:
        raise ValueError(f"{where}: no evaluation row (eval/acc_speech)")
    return evals[-1]


def _se(p: float, n: float) -> float:
    """Binomial standard error of an accuracy, in points."""
    return 100 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def summarize(root: Path) -> dict:
    start = _last_eval(_rows(root / "start" / "metrics.jsonl"), root / "start")
    teacher, n = start["eval/acc_teacher_text"], start["eval/prompts"]
    entries = [("student before (after speech alignment)", "start", start)]
    for name, label in METHODS:
        rows = _rows(root / name / "metrics.jsonl")
        train_rows = [r for r in rows if "kl_cm" in r]
        entries.append((label, name, {**_last_eval(rows, root / name), "train": train_rows}))
    timings = {}
    if (root / "timings.jsonl").exists():
        for line in (root / "timings.jsonl").read_text().splitlines():
            t = json.loads(line)
            timings[t["stage"]] = t["wall_s"]
    table = []
    for label, name, row in entries:
        s, t = row["eval/acc_speech"], row["eval/acc_text"]
        record = {"model": label, "run": name, "acc_speech": 100 * s, "acc_text": 100 * t,
                  "drop_speech": 100 * (teacher - s), "drop_text": 100 * (teacher - t),
                  "se_speech": _se(s, n), "se_text": _se(t, n)}
        train = row.get("train") or []
        if train:
            record.update(steps=train[-1]["step"], kl_cm_first=train[0]["kl_cm"], kl_cm_last=train[-1]["kl_cm"],
                          kl_im_first=train[0]["kl_im"], kl_im_last=train[-1]["kl_im"])
        table.append(record)
    return {"teacher_acc_text": 100 * teacher, "prompts": n, "rows": table, "wall_s": timings,
            "total_wall_s": sum(timings.values())}


def _arrow(first: float, last: float) -> str:
    return "-" if math.isnan(first) else f"{first:.3f} -> {last:.3f}"


def to_markdown(result: dict) -> str:
    lines = [f"Held-out prompts: {result['prompts']:.0f}; accuracy in % (binomial standard error in brackets); "
             "drop = text-teacher accuracy minus the student's.", "",
             "| model | acc S | acc T | drop S | drop T |", "|---|---|---|---|---|",
             f"| teacher SmolLM2-135M-Instruct (text) | - | {result['teacher_acc_text']:.1f} | - | - |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['acc_speech']:.1f} ({r['se_speech']:.1f}) | {r['acc_text']:.1f} "
                     f"({r['se_text']:.1f}) | {r['drop_speech']:.1f} | {r['drop_text']:.1f} |")
    lines += ["", "Training (sampled-token KL estimate of the student's own samples; none for SFT):", "",
              "| run | steps | kl_cm first -> last | kl_im first -> last |", "|---|---|---|---|"]
    for r in result["rows"]:
        if "steps" in r:
            lines.append(f"| {r['run']} | {r['steps']} | {_arrow(r['kl_cm_first'], r['kl_cm_last'])} | "
                         f"{_arrow(r['kl_im_first'], r['kl_im_last'])} |")
    if result["wall_s"]:
        stages = ", ".join(f"{k} {v / 60:.1f}" for k, v in result["wall_s"].items())
        lines += ["", f"Wall time (min): {stages}; total {result['total_wall_s'] / 60:.1f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    result = summarize(args.root)
    (args.root / "results.json").write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    markdown = to_markdown(result)
    (args.root / "results.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
