"""The mini replication's data splits and its table (the study itself runs in examples/mini_replication/run.sh)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"mini_replication_{name}", ROOT / "examples/mini_replication" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_splits_are_disjoint_and_answers_are_right():
    pytest.importorskip("reasoning_gym")
    splits = _load("prepare_data").study_prompts(seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"test": 100, "train": 96, "align": 160}
    prompts = {k: {r["prompt"] for r in v} for k, v in splits.items()}
    assert not prompts["test"] & prompts["train"] and not prompts["align"] & (prompts["test"] | prompts["train"])
    for split, records in splits.items():
        for r in records:
            a, op, b = r["metadata"]["expression"].split()
            assert op in "+-" and r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
            assert max(int(a), int(b)) <= (10 if split != "align" else 100)
    assert any(max(int(x) for x in r["metadata"]["expression"].split()[::2]) > 10 for r in splits["align"])


def _write(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_reports_accuracies_drops_and_errors(tmp_path):
    summarize = _load("summarize")
    _write(tmp_path / "start", [{"step": 0, "eval/acc_speech": 0.1, "eval/acc_text": 0.4, "eval/prompts": 100.0,
                                 "eval/acc_teacher_text": 0.4}])
    for i, (name, _) in enumerate(summarize.METHODS):
        kl = float("nan") if name == "offline_kd" else 0.5
        train = [{"step": s, "kl_cm": kl - 0.1 * s, "kl_im": kl * 0} for s in (1, 2)]
        _write(tmp_path / name, train[:1] + [{**train[1], "eval/acc_speech": 0.2 + 0.05 * i, "eval/acc_text": 0.3,
                                              "eval/prompts": 100.0}])
    (tmp_path / "timings.jsonl").write_text('{"stage": "align", "wall_s": 60}\n{"stage": "start", "wall_s": 120}\n')
    result = summarize.summarize(tmp_path)
    start, kd, lam05 = result["rows"][:3]
    assert result["teacher_acc_text"] == pytest.approx(40.0) and result["total_wall_s"] == 180
    assert (start["drop_speech"], start["drop_text"]) == (pytest.approx(30.0), pytest.approx(0.0))
    assert lam05["acc_speech"] == pytest.approx(25.0) and lam05["drop_speech"] == pytest.approx(15.0)
    assert start["se_speech"] == pytest.approx(100 * math.sqrt(0.1 * 0.9 / 100))
    assert kd["steps"] == 2 and math.isnan(kd["kl_cm_first"]) and lam05["kl_cm_last"] == pytest.approx(0.3)
    markdown = summarize.to_markdown(result)
    assert "| + X-OPD, lam 0.5 | 25.0 (4.3) | 30.0 (4.6) | 15.0 | 10.0 |" in markdown
    assert "| offline_kd | 2 | - | - |" in markdown and "total 3.0" in markdown


def test_table_names_a_missing_run(tmp_path):
    summarize = _load("summarize")
    with pytest.raises(FileNotFoundError, match="start/metrics.jsonl: missing"):
        summarize.summarize(tmp_path)
