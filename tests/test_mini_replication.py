"""The mini replication (examples/mini_replication): its data splits, its table, and every stage of the study on a
tiny configuration (tiny random LLMs, a few spoken prompts), including the rerun that skips finished stages."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    key = f"mini_replication_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "examples/mini_replication" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def test_study_splits_are_disjoint_and_answers_are_right():
    pytest.importorskip("reasoning_gym")
    prepare = _load("prepare_data")
    splits = prepare.study_prompts(seed=0)
    sizes = prepare.Sizes()
    assert {k: len(v) for k, v in splits.items()} == {k: getattr(sizes, k) for k in splits}
    prompts = {k: {r["prompt"] for r in v} for k, v in splits.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not prompts[a] & prompts[b], (a, b)
    for split, records in splits.items():
        for r in records:
            a, op, b = r["metadata"]["expression"].split()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert r["answer"] == str(expected) and r["response"] == f"{a} {op} {b} = {expected}"
            assert (op == "*") == (split == "forget")
            assert max(int(a), int(b)) <= (10 if split in ("test", "val", "train", "forget") else 100)
    assert any(max(int(x) for x in r["metadata"]["expression"].split()[::2]) > 10 for r in splits["llm_sft"])


def _write(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "DONE").touch()


def _evals(s: float, t: float, **extra) -> dict:
    return {f"eval/{split}/{k}": v for split in ("val", "test", "forget")
            for k, v in {"acc_speech": s, "acc_text": t, "prompts": 10.0, **extra}.items()}


def test_table_picks_rates_on_val_and_reports_mean_and_standard_error(tmp_path):
    summarize = _load("summarize")
    plan = {"methods": ["offline_kd", "xopd_lam0.5"], "lr_grid": [1e-5, 1e-4], "seeds": [1, 2, 3],
            "teacher_sft_steps": 75, "student_sft_steps": 12}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    _write(tmp_path / "start", [{"step": 0, **_evals(0.2, 0.6, acc_teacher_text=0.9)}])
    for who, acc in (("teacher", 0.9), ("student", 0.6)):
        _write(tmp_path / f"{who}_sft", [{"step": 1, **{k: v for k, v in _evals(0, acc).items() if "speech" not in k}}])
    # offline KD: equal S on val at both rates, better T at 1e-4; X-OPD: better S at 1e-5
    grid = {("offline_kd", 1e-5): (0.3, 0.5), ("offline_kd", 1e-4): (0.3, 0.6),
            ("xopd_lam0.5", 1e-5): (0.5, 0.1), ("xopd_lam0.5", 1e-4): (0.4, 0.9)}
    for (method, lr), (s, t) in grid.items():
        _write(tmp_path / summarize.run_name(method, lr, 1),
               [{"step": 1, "kl_cm": 0.5, "kl_im": 0.1}, {"step": 2, "kl_cm": 0.3, "kl_im": 0.2, **_evals(s, t)}])
    for seed, s in ((2, 0.4), (3, 0.6)):
        _write(tmp_path / summarize.run_name("xopd_lam0.5", 1e-5, seed),
               [{"step": 1, "kl_cm": 0.7, "kl_im": 0.1}, {"step": 2, "kl_cm": 0.1, "kl_im": 0.2, **_evals(s, 0.1)}])
    assert summarize.choose_lr(tmp_path, "offline_kd", plan["lr_grid"], 1) == 1e-4
    assert summarize.choose_lr(tmp_path, "xopd_lam0.5", plan["lr_grid"], 1) == 1e-5
    result = summarize.summarize(tmp_path)
    kd, xopd = result["methods"]
    assert xopd["lr"] == 1e-5 and xopd["seeds"] == [1, 2, 3]
    assert xopd["test_speech"][0] == pytest.approx(50.0)
    assert xopd["test_speech"][1] == pytest.approx(math.sqrt(((0 ** 2 + 10 ** 2 + 10 ** 2) / 2) / 3))
    assert kd["seeds"] == [1] and math.isnan(kd["test_speech"][1])
    assert result["missing"] == ["runs/offline_kd/lr0.0001_seed2", "runs/offline_kd/lr0.0001_seed3"]
    markdown = summarize.to_markdown(result)
    assert "| + X-OPD, lam 0.5 (n=3) | 1e-05 | 50.0 ± 5.8 | 10.0 ± 0.0 | 40.0 | 80.0 |" in markdown
    assert "| text teacher (T only) | - | - | 90.0 | - | - |" in markdown
    assert "| xopd_lam0.5 | 2 | 0.633 -> 0.167 | 0.100 -> 0.200 |" in markdown
    assert "| offline_kd | 30.0 / 50.0 | 30.0 / 60.0 | 0.0001 |" in markdown
    assert "| teacher (75 steps) | 90.0 | 90.0 | 90.0 |" in markdown


def test_docs_get_the_generated_tables_between_the_markers_and_the_plots_beside_them(tmp_path, monkeypatch):
    summarize = _load("summarize")
    out = tmp_path / "runs" / "study"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "accuracy.png").write_bytes(b"png")
    result = {"plots": ["plots/accuracy.png"]}
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# title\nkept\n{summarize.BEGIN}\nold table\n{summarize.END}\nalso kept\n")
    monkeypatch.setattr(summarize, "to_markdown", lambda r: "the generated table\n")
    summarize.write_docs(out, result, doc)
    assert doc.read_text() == (f"# title\nkept\n{summarize.BEGIN}\nthe generated table\n\n"
                               f"![accuracy](img/study/accuracy.png)\n{summarize.END}\nalso kept\n")
    assert (doc.parent / "img" / "study" / "accuracy.png").read_bytes() == b"png"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="results.md: needs one line"):
        summarize.write_docs(out, result, doc)


def test_table_names_a_missing_run(tmp_path):
    summarize = _load("summarize")
    (tmp_path / "plan.json").write_text(json.dumps({"methods": [], "lr_grid": [1e-4], "seeds": [1]}))
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "DONE").touch()
    with pytest.raises(FileNotFoundError, match="start/metrics.jsonl: missing"):
        summarize.summarize(tmp_path)


def test_every_method_is_a_valid_run_config(tmp_path):
    """Each method's overrides make a config the trainer accepts (the tiny study below runs three of them)."""
    study = _load("study")
    from omegaconf import OmegaConf

    from megatron_xopd.trainer import to_run_config

    s = study.Study(study.Plan(), tmp_path)
    for method, xopd in study.METHODS.items():
        cfg = OmegaConf.merge(s.base_config(), s.from_start(), {"xopd": xopd, "optim": {"lr": study.LR_GRID[0]}})
        run = to_run_config(OmegaConf.to_container(cfg))
        assert run.xopd.n_samples == 1 and run.trainer.rollout.max_new_tokens == 12, method
        assert set(run.data.eval_sets) == {"val", "test", "forget"} and run.data.validation is None
    with pytest.raises(SystemExit, match="another study.py is running there"):  # one driver per directory
        study.Study(study.Plan(), tmp_path)


def _tiny_plan(root: Path) -> Path:
    from tests._trainer_setup import write_tiny_hf

    plan = {
        "sizes": {"test": 2, "val": 2, "train": 2, "align": 2, "forget": 2, "llm_sft": 4},
        "base_llm": str(write_tiny_hf(root / "tiny_hf", seed=1)),
        "teacher_sft_steps": 2, "student_sft_steps": 1, "sft_prompts_per_step": 2, "sft_warmup_steps": 1,
        "sft_lr": 1e-2, "ctc_steps": 1, "align_steps": 1, "align_prompts_per_step": 2,
        "methods": ["sft_ref", "xopd_lam0.5"], "lr_grid": [1e-3, 1e-2], "seeds": [1, 2],
        "steps": 1, "prompts_per_step": 2, "n_samples": 1, "max_new_tokens": 3, "eval_prompts_per_step": 4,
        "max_eval_prompts": 2,
        "overrides": {"data": {"num_buckets": 2}, "trainer": {"micro_batch_size": 4}, "model": {"student": {
            "perception": {"nemo": {"modality_adapter": {"d_model": 32, "n_layers": 1, "n_heads": 2,
                                                         "ff_expansion_factor": 2}}}}}},
    }
    path = root / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def _study(out: Path, plan: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples/mini_replication/study.py"), "--out", str(out),
                           "--plan", str(plan), *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_tiny_study_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    from tests.test_encoder_features import HAS_ESPEAK, HAS_WHISPER

    if not (HAS_ESPEAK and HAS_WHISPER):
        pytest.skip("the data stage speaks with espeak-ng and encodes with Whisper-base")
    from safetensors.torch import load_file

    out = tmp_path / "out"
    plan = _tiny_plan(tmp_path)
    stdout = _study(out, plan, "--stop-after", "ctc")  # a study may end early and go on later
    assert "== stopped after ctc" in stdout and not (out / "align").exists()
    assert "Not run yet: start, sft_ref (grid), xopd_lam0.5 (grid)." in (out / "results.md").read_text()
    _study(out, plan)
    result = json.loads((out / "results.json").read_text())
    chosen = {m["method"]: m["lr"] for m in result["methods"]}
    runs = [f"runs/{m}/lr{lr:g}_seed{seed}" for m in ("sft_ref", "xopd_lam0.5")
            for lr, seed in ((1e-3, 1), (1e-2, 1), (chosen[m], 2))]
    stages = ["data", "teacher_sft", "student_sft", "ctc", "align", "start", *runs]
    timings = [json.loads(line)["stage"] for line in (out / "timings.jsonl").read_text().splitlines()]
    assert timings == stages and all((out / s / "DONE").exists() for s in stages)

    # the text SFT: answer tokens only; the exported teacher changed, its (frozen) embedding did not
    base, teacher = load_file(str(tmp_path / "tiny_hf" / "model.safetensors")), load_file(
        str(out / "teacher_sft" / "hf" / "model.safetensors"))
    assert teacher["model.embed_tokens.weight"].equal(base["model.embed_tokens.weight"])
    assert not teacher["model.layers.0.mlp.up_proj.weight"].equal(base["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((out / "teacher_sft" / "hf" / "config.json").read_text())["vocab_size"] == 49152  # no locator
    sft_rows = [json.loads(line) for line in (out / "teacher_sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows] == [1, 2] and "eval/test/acc_text" in sft_rows[-1]
    assert "eval/test/acc_speech" not in sft_rows[-1]
    # the exported LLMs serve as the teacher and the student's LLM of every later run
    for stage in ("align", "start", runs[0]):
        hparams = (out / stage / "hparams.yaml").read_text()
        assert str(out / "teacher_sft" / "hf") in hparams and str(out / "student_sft" / "hf") in hparams
    start = [json.loads(line) for line in (out / "start" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {f"eval/{s}/{k}" for s in ("val", "test", "forget") for k in ("acc_speech", "acc_text",
                                                                          "acc_teacher_text")} <= set(start)
    for m in result["methods"]:
        assert m["lr"] in (1e-3, 1e-2) and m["seeds"] == [1, 2] and len(m["test_speech_values"]) == 2
        assert len(m["grid"]) == 2 and len(m["forget_text_values"]) == 2
    assert result["missing"] == [] and "text_sft" in result and "teacher" in result
    for png in ("accuracy.png", "kl_curves.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| + X-OPD, lam 0.5 (n=2) |" in (out / "results.md").read_text()
    assert (out / "runs" / "xopd_lam0.5" / f"lr{chosen['xopd_lam0.5']:g}_seed2" / "metrics.jsonl").exists()

    # a rerun skips every finished stage; a stage without DONE is run again, alone
    stdout = _study(out, plan)
    assert all(f"== {s}: done already" in stdout for s in stages)
    (out / runs[0] / "DONE").unlink()
    stdout = _study(out, plan)
    assert f"== {runs[0]}\n" in stdout and "== start: done already" in stdout
    timings = [json.loads(line)["stage"] for line in (out / "timings.jsonl").read_text().splitlines()]
    assert timings == stages + [runs[0]]
    # a different plan in the same directory is refused
    changed = json.loads(plan.read_text()) | {"steps": 2}
    plan.write_text(json.dumps(changed))
    proc = subprocess.run([sys.executable, str(ROOT / "examples/mini_replication/study.py"), "--out", str(out),
                           "--plan", str(plan)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "started with another plan" in proc.stderr
