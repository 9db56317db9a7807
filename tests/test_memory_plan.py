"""The memory plan (models/memory.py, tools/plan_memory.py): parameter, gradient and optimizer counts equal those of
the built megatron-core models, the tool prints a table for the quickstart and the paper recipes, bad layouts fail
with one clear error."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_xopd.models import GPTModelConfig
from megatron_xopd.models.memory import Layout, LayoutError, model_params, rank_params, validate_layout
from megatron_xopd.runtime import ParallelConfig
from megatron_xopd.testing import run_distributed

from ._meta_shards import split_dense_expert
from ._trainer_setup import run_config, tiny_llm

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plan_memory.py"

# Dense variants (untied, tied + Q/K/V bias, QK-norm) and a MoE with a shared expert; 4 layers, odd vocabulary.
CONFIGS = {
    "llama": dict(family="llama", tie_word_embeddings=False),
    "qwen2_tied_bias": dict(family="qwen2", tie_word_embeddings=True),
    "qwen3_qk_norm": dict(family="qwen3", tie_word_embeddings=True),
    "moe": dict(family="qwen3", num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                moe_shared_expert_intermediate_size=48),
}


def _config(name: str) -> GPTModelConfig:
    return GPTModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          vocab_size=301, max_position_embeddings=64, **CONFIGS[name])


def _optimizer_bytes(optimizer) -> int:
    """Adam state (and fp32 main copies of 16-bit params) the megatron optimizer holds after a step."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for k, v in state.items() if k != "step" and v.dim() > 0)
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            total += sum(p.numel() * p.element_size() for group in getattr(opt, name, []) for p in group)
    return total


def _built_vs_planned(parallel: ParallelConfig, run_cfg: dict, names: tuple[str, ...]) -> dict:
    """On this rank: each CONFIGS model's (dense, expert) parameters built and planned; then the recipe's student
    and teacher as the trainer builds them, and its gradient-buffer and optimizer bytes after one step."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_xopd.convert.sources import resolve_path
    from megatron_xopd.data.tokenizer import load_tokenizer
    from megatron_xopd.models import build_gpt_model
    from megatron_xopd.models.memory import weight_lines
    from megatron_xopd.runtime import initialize_model_parallel
    from megatron_xopd.trainer import to_run_config
    from megatron_xopd.trainer.build import build_models, build_optimizer, wrap_ddp
    from megatron_xopd.trainer.memory_plan import plan_run

    initialize_model_parallel(parallel)
    layout = Layout(parallel, dist.get_world_size())
    stage = parallel_state.get_pipeline_model_parallel_rank()
    out = {}
    for name in names:
        cfg = _config(name)
        out[name] = (split_dense_expert(build_gpt_model(cfg)), rank_params(cfg, layout, stage))

    run = to_run_config({**run_cfg, "trainer": {**run_cfg["trainer"], "parallel": dataclasses.asdict(parallel)}})
    plan, student_cfg, _, work = plan_run(run, dist.get_world_size(), 80.0)
    assert plan.layout == layout
    tokenizer = load_tokenizer(str(resolve_path(run.model.tokenizer)), audio_locator=run.model.audio_locator)
    models = build_models(run, tokenizer)
    assert models.student_cfg.padded_vocab(layout.tp) == student_cfg.padded_vocab(layout.tp)
    ddp = wrap_ddp(models.student)
    optimizer, _ = build_optimizer(ddp, run.optim, 1)
    for param in ddp.module.parameters():
        if param.requires_grad:
            param.main_grad.normal_()
    optimizer.step()
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers + ddp.expert_parallel_buffers)
    lines = weight_lines(student_cfg, layout, work, stage)
    # megatron's local torch norms stay fp32 in a 16-bit model (TE's norms and models/norm.py follow params_dtype);
    # the plan, made for GPUs, counts every LLM parameter in params_dtype: count those here to compare.
    fp32_extra = sum(p.numel() for p in models.student.language_model.parameters()
                     if p.dtype == torch.float32 and student_cfg.params_dtype != "float32")
    out["student"] = {
        "fp32_extra": fp32_extra,
        "built": sum(p.numel() * p.element_size() for p in models.student.parameters()) - 2 * fp32_extra,
        "planned": lines["student weights"].bytes,
        "teacher_built": sum(p.numel() for p in models.teacher.parameters()),
        "teacher_planned": rank_params(models.teacher_cfg, layout, stage).total,
        "grads_built": grads, "grads_planned": lines["gradients"].bytes,
        # fp32 parameters need no fp32 main copy: 4 B less each (shards of the distributed optimizer add up to it)
        "optim_built": _optimizer_bytes(optimizer),
        "optim_planned": lines["optimizer"].bytes - 4 * fp32_extra / (layout.dp if layout.distributed_optimizer else 1),
        "optim_shard_exact": not layout.distributed_optimizer,
    }
    return out


def _check(results: list[dict], names: tuple[str, ...]) -> None:
    for rank, out in enumerate(results):
        for name in names:
            (dense, expert), planned = out[name]
            assert (dense, expert) == (planned.dense, planned.expert), (rank, name)
        s = out["student"]
        assert s["built"] == s["planned"], rank
        assert s["teacher_built"] == s["teacher_planned"], rank
        if s["optim_shard_exact"]:
            assert (s["grads_built"], s["optim_built"]) == (s["grads_planned"], s["optim_planned"]), rank
        else:  # the distributed optimizer pads its buffers (alignment to 64 values, buckets to DP x 128)
            assert s["grads_planned"] <= s["grads_built"] <= s["grads_planned"] * 1.02 + 4 * 128 * len(results), rank


def _run_cfg(tmp_path: Path, **llm) -> dict:
    manifest = tmp_path / "cuts.jsonl.gz"  # not read: planning and building need no data
    return run_config(tmp_path, manifest, model={"student": {"llm": tiny_llm(**llm)}, "teacher": {"llm": tiny_llm(**llm)}})


@pytest.mark.parity
@pytest.mark.slow
def test_counts_equal_built_models_at_tp2_pp2(tmp_path):
    """TP=2 x PP=2 (4 gloo ranks): every stage's parameters (embedding, tied output copy, Q/K/V biases, QK-norm),
    and the recipe's student/teacher weights, fp32 gradient buffers and Adam state (fp32 weights, DP=1)."""
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    names = ("llama", "qwen2_tied_bias", "qwen3_qk_norm")  # MoE at TP > 1 needs SP, whose norms arrive with MoE support
    _check(run_distributed(_built_vs_planned, 4, parallel, _run_cfg(tmp_path), names), names)


@pytest.mark.parity
@pytest.mark.slow
def test_counts_equal_built_models_with_experts_split_and_distributed_optimizer(tmp_path):
    """EP=2 x DP=2 (2 ranks): a MoE's router, shared expert and routed experts (split over EP); the recipe's bf16
    student under the distributed optimizer (Adam state and fp32 main copies sharded over DP): the shards of all
    ranks add up to the planned total."""
    parallel = ParallelConfig(expert_model_parallel_size=2)
    results = run_distributed(_built_vs_planned, 2, parallel, _run_cfg(tmp_path, params_dtype="bfloat16"), tuple(CONFIGS))
    _check(results, tuple(CONFIGS))
    built = sum(r["student"]["optim_built"] for r in results)
    planned = sum(r["student"]["optim_planned"] for r in results)
    assert planned - 12 * len(results) <= built <= planned  # per rank: ceil(n / DP) x 12 B


@pytest.mark.parity
@pytest.mark.slow
def test_quickstart_weights_grads_and_optimizer_equal_the_built_models():
    """The quickstart recipe itself (SmolLM2-135M padded to 12 heads, TP=2 on 2 ranks, the Whisper-width
    projection trainable): the plan's weights, gradients and Adam state equal the trainer's built models."""
    sys.path.insert(0, str(TOOL.parent))
    from plan_memory import compose

    run = compose("quickstart", [])
    _check(run_distributed(_built_vs_planned, 2, run.trainer.parallel, dataclasses.asdict(run), ()), ())


@pytest.mark.slow
def test_paper_layout_counts_equal_megatron_shards_built_at_full_size_on_meta():
    """The paper recipe at TP4 PP2 EP8 on 64 GPUs, ETP 1 and 4, first (rank 0) and last (rank 63) pipeline stage:
    megatron-core's GPTModel shards of the Qwen3-Omni thinker LLM, Qwen3-30B-A3B and Qwen3-235B-A22B, built at full
    size on the meta device for that rank (tests/_meta_shards.py says what is faked), hold exactly the planned dense
    and expert parameters; megatron DDP's gradient buffers hold the planned gradient elements, and the distributed
    optimizer's ranges give this DP rank the planned ceil(dense / DP) + ceil(expert / expert DP) main parameters."""
    cases = ["0:1:optimizer", "63:1:qwen3_235b_a22b:optimizer", "0:4:qwen3_235b_a22b", "63:4:optimizer"]
    result = subprocess.run([sys.executable, "-m", "tests._meta_shards", *cases], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(o["rank"], o["stage"], o["etp"]) for o in outs] == [(0, 0, 1), (63, 1, 1), (0, 0, 4), (63, 1, 4)]
    for out in outs:
        for role in ("student", "teacher"):
            assert out[role]["built"] == out[role]["planned"], (out["rank"], out["etp"], role)
        if "optimizer" in out:
            opt = out["optimizer"]
            assert opt["grad_elements"] == sum(out["student"]["planned"]) and opt["owned"] == opt["planned_owned"]
    assert outs[1]["teacher"]["planned"] == [1_018_568_448, 14_193_524_736]  # 235B, ETP 1: 16 whole experts a layer
    assert outs[3]["student"]["planned"] == [197_500_928, 452_984_832]  # ETP 4: each expert split four ways


def _teacher_kept(forms: tuple[str, ...]) -> dict[str, tuple[int, dict]]:
    """Bytes the teacher pass keeps for a full-vocabulary loss (reverse_kl) in each ``divergence_form`` (or, for
    "sampled_token", with that loss), scoring tests/test_trainer_passes.py's 4 rollouts in micro-batches of 2, and
    how long their prompts are."""
    from megatron_xopd.algo import XOPDConfig
    from megatron_xopd.trainer.passes import score_with_teacher
    from tests._models import VOCAB
    from tests.test_trainer_passes import _models, _rollouts

    student, teacher = _models()
    out = {}
    for form in forms:
        r = _rollouts(student)
        loss = "sampled_token" if form == "sampled_token" else "reverse_kl"
        score_with_teacher(teacher, r, 2, VOCAB, XOPDConfig(lam=0.5, loss=loss,
                                                             divergence_form="linear" if loss != "reverse_kl" else form))
        kept = {"hidden": r.teacher_hidden, "logits": r.teacher_logits, "head": r.teacher_head}
        out[form] = ({k: sum(t.numel() * t.element_size() for t in (v if isinstance(v, list) else [v]))
                      for k, v in kept.items() if v is not None},
                     {"prompt": max(len(p) for p in r.teacher_prompts), "new": r.responses.shape[1]})
    return out


@pytest.mark.parity
def test_plan_keeps_what_the_teacher_pass_keeps_in_each_divergence_form():
    """reverse_kl in the linear form (the default) keeps the teacher's final hidden states [R, N, H_t] and no
    logits; in the logits form [R, N, V/t] logits: the plan's kept line equals what score_with_teacher keeps, and
    the linear plan has no line of logits."""
    from megatron_xopd.models.memory import Workload, plan_memory
    from tests.test_trainer_passes import _configs

    measured = run_distributed(_teacher_kept, 1, ("linear", "logits", "sampled_token"), tp=1)[0]
    student, teacher = _configs()
    # the sampled-token loss keeps only the log-probs, and its teacher pass builds no logits: the head runs on the
    # response rows of the hidden states
    kept, shape = measured["sampled_token"]
    assert kept == {}
    work = Workload(prompts=2, n_samples=1, modalities=2, prompt_tokens=shape["prompt"], new_tokens=shape["new"],
                    micro_batch=2, loss="sampled_token")
    plan = plan_memory(student, teacher, Layout(ParallelConfig(), 1), work, 1 << 40)
    lines = {line.name for phase in plan.phases for line in phase.lines}
    assert "teacher hidden states" in lines and not {"teacher logits", "teacher logits kept", "teacher hidden kept"} & lines
    for form, name, kind in (("linear", "teacher hidden kept", "hidden"), ("logits", "teacher logits kept", "logits")):
        kept, shape = measured[form]
        kept.pop("head", None)  # the linear form's reference to the teacher's head shard (no bytes of its own)
        assert set(kept) == {kind}
        work = Workload(prompts=2, n_samples=1, modalities=2, prompt_tokens=shape["prompt"], new_tokens=shape["new"],
                        micro_batch=2, loss="reverse_kl", divergence_form=form)
        plan = plan_memory(student, teacher, Layout(ParallelConfig(), 1), work, 1 << 40)
        for phase in ("teacher", "training"):
            lines = {line.name: line.bytes for line in next(p for p in plan.phases if p.phase == phase).lines}
            assert lines[name] == kept[kind], (form, phase)
            if phase == "teacher":
                assert ("teacher logits" in lines) == (form == "logits") != ("teacher hidden states" in lines), form
            else:
                assert ("loss logits" in lines) == (form == "logits") != ("loss buffers" in lines), form
    # at the paper's sizes (R = 256 rollouts of 2048 new tokens, V/t = 38k) the logits form keeps 40 GB, linear 2 GB
    big = dict(prompts=32, n_samples=4, modalities=2, prompt_tokens=2048, new_tokens=2048, micro_batch=4,
               loss="reverse_kl")
    q3 = GPTModelConfig.load(REPO / "examples" / "conf" / "models" / "qwen3_30b_a3b.yaml")
    layout = Layout(ParallelConfig(tensor_model_parallel_size=4, expert_model_parallel_size=8, sequence_parallel=True), 32)
    plans = {form: plan_memory(q3, q3, layout, Workload(**big, divergence_form=form), 1 << 40).to_dict()["phases"]
             for form in ("linear", "logits")}
    assert plans["linear"]["training"]["teacher hidden kept"] == 256 * 2048 * q3.hidden_size * 2
    assert plans["logits"]["training"]["teacher logits kept"] == 256 * 2048 * q3.padded_vocab(4) // 4 * 2
    assert plans["linear"]["training"]["peak"] < plans["logits"]["training"]["peak"] - 30 * 2**30


def test_whole_model_counts_match_transformers():
    """The preset's formula totals equal transformers' Qwen3-MoE model (4 layers, built on the meta device)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = GPTModelConfig.load(REPO / "examples" / "conf" / "models" / "qwen3_30b_a3b.yaml")
    cfg.num_layers = 4
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(num_hidden_layers=4, num_experts=128, head_dim=128))
    assert model_params(cfg)["total"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("preset,total,active", [("qwen3_30b_a3b", 30.5e9, 3.3e9), ("qwen3_235b_a22b", 235e9, 22e9)])
def test_presets_have_the_model_cards_sizes(preset, total, active):
    counts = model_params(GPTModelConfig.load(REPO / "examples" / "conf" / "models" / f"{preset}.yaml"))
    assert abs(counts["total"] - total) / total < 0.01 and abs(counts["active"] - active) / active < 0.02


@pytest.mark.parametrize("parallel,world,match", [
    (dict(tensor_model_parallel_size=3), 3, "num_attention_heads"),
    (dict(pipeline_model_parallel_size=3), 3, "num_layers"),
    (dict(expert_model_parallel_size=3), 3, "num_moe_experts"),
    (dict(tensor_model_parallel_size=2), 3, "world size 3"),
    (dict(tensor_model_parallel_size=2), 2, "sequence_parallel"),
])
def test_bad_layout_gives_one_clear_error(parallel, world, match):
    moe = GPTModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                         vocab_size=301, num_moe_experts=4, moe_ffn_hidden_size=32)
    with pytest.raises(LayoutError, match=match):
        validate_layout(Layout(ParallelConfig(**parallel), world), {"model.student.llm": moe})


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_tool_prints_the_paper_recipes_table_and_a_layout():
    """The README's command as written: the recipe names its presets (its checkpoints are not here), and the layout
    search prefers ETP = 1."""
    result = _tool("--config-name", "paper_qwen3_omni", "--gpus", "64", "--gpu-mem-gb", "80")
    assert result.returncode == 0, result.stderr
    for phase in ("[rollout]", "[teacher]", "[training]"):
        assert phase in result.stdout
    assert "layout TP=4 PP=2 EP=8 ETP=1 DP=8 SP on 64 GPU(s)" in result.stdout
    assert "KV cache" in result.stdout and "smallest layout that fits on 64 x 80 GiB" in result.stdout
    assert "GiB usable: fits" in result.stdout
    bad = _tool("--config-name", "paper_qwen3_omni", "--gpus", "64", "--no-suggest",
                "trainer.parallel.expert_model_parallel_size=3")
    assert bad.returncode == 2 and "expert_model_parallel_size" in bad.stderr


@pytest.mark.slow
def test_scaling_doc_plans_are_the_tools_output(tmp_path):
    """docs/scaling.md's plans are what ``--write-doc`` writes now: rerunning it changes nothing."""
    doc = tmp_path / "scaling.md"
    doc.write_text((REPO / "docs" / "scaling.md").read_text())
    result = _tool("--write-doc", str(doc))
    assert result.returncode == 0 and "6 plan(s) written" in result.stdout, result.stderr[-2000:]
    assert doc.read_text() == (REPO / "docs" / "scaling.md").read_text()


def test_a_preset_and_an_inline_field_that_disagree_is_an_error_naming_both():
    """The recipe's preset is read when its checkpoint is not here; an inline ``llm`` field that contradicts a field
    the preset names (a 30B expert width on the 235B preset) fails, naming the key, both values and the preset."""
    from megatron_xopd.models import ModelConfigError
    from megatron_xopd.trainer.config import LLMSection
    from megatron_xopd.trainer.memory_plan import section_config

    section = LLMSection(mcore_path="ckpt/not_here", preset="qwen3_235b_a22b",
                         llm={"moe_ffn_hidden_size": 768, "params_dtype": "bfloat16"})
    with pytest.raises(ModelConfigError, match=r"model\.teacher\.llm\.moe_ffn_hidden_size=768 vs preset "
                                               r"'qwen3_235b_a22b' .*moe_ffn_hidden_size=1536"):
        section_config(section, "model.teacher.llm", None)
    agreeing = section_config(dataclasses.replace(section, llm={"params_dtype": "bfloat16", "fp8": None}),
                              "model.teacher.llm", None)
    assert (agreeing.num_layers, agreeing.moe_ffn_hidden_size) == (94, 1536)
    with pytest.raises(ModelConfigError, match="model.teacher.preset=NAME"):
        section_config(dataclasses.replace(section, preset=None), "model.teacher.llm", None)


def test_sequence_parallelism_divides_only_the_phases_that_run_with_it():
    """The rollout engine turns SP off: its prefill working set is the same with and without SP, while the
    training activations shrink with it."""
    from megatron_xopd.models.memory import Workload, plan_memory

    q3 = GPTModelConfig.load(REPO / "examples" / "conf" / "models" / "qwen3_30b_a3b.yaml")
    work = Workload(prompts=4, n_samples=2, modalities=2, prompt_tokens=256, new_tokens=256, micro_batch=2)
    lines = {}
    for sp in (True, False):  # a dense-only view: SP's effect on a MoE at TP > 1 is refused without SP
        dense = dataclasses.replace(q3, num_moe_experts=None, num_layers=4)
        layout = Layout(ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=sp), 4)
        phases = plan_memory(dense, dense, layout, work, 1 << 40).to_dict()["phases"]
        lines[sp] = (phases["rollout"]["prefill working set"], phases["training"]["activations"])
    assert lines[True][0] == lines[False][0]
    assert lines[True][1] < lines[False][1]


def test_tool_prints_the_quickstart_plan_as_json():
    """The tool on the quickstart recipe (--json): its own layout, a dense student, fits on 80 GB. (That the bytes
    equal the built models' is test_quickstart_weights_grads_and_optimizer_equal_the_built_models.)"""
    result = _tool("--config-name", "quickstart", "--json", "--no-suggest")
    assert result.returncode == 0, result.stderr
    # NeMo's import (the perception) makes nv_one_logger's notes: in the debug log, not on the console
    assert "OneLogger" not in result.stdout + result.stderr and "No exporters" not in result.stdout + result.stderr
    plan = json.loads(result.stdout.strip().splitlines()[-1])["plan"]
    assert plan["layout"] == "TP=2 PP=1 DP=1" and plan["fits"]
    assert plan["student_params"]["expert"] == 0 and plan["student_params"]["dense"] > 0


CHECK = REPO / "benchmarks" / "memory_plan_check.py"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_skips_cleanly_without_cuda():
    result = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0 and json.loads(result.stdout.strip().splitlines()[-1]) == {"skipped": "no CUDA"}


@pytest.mark.slow
def test_gpu_check_runs_its_code_on_cpu():
    """The GPU check's own code path (model, DDP, training micro-batch, rollout) on CPU, nothing measured: a GPU
    session does not spend its time on a broken script. Planned bytes are positive for both measurements."""
    result = subprocess.run([sys.executable, str(CHECK), "--cpu-smoke"], capture_output=True, text=True, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["training"]["planned"] > 0 and out["rollout"]["planned"] > 0 and out["training"]["measured"] is None


def _uneven(**split) -> Layout:
    return Layout(ParallelConfig(pipeline_model_parallel_size=2, **split), 2)


def test_the_plan_places_layers_as_megatron_splits_them_and_plans_the_heaviest_stage():
    """An uneven PP split (``trainer.parallel.num_layers_in_*_pipeline_stage``, ``account_for_*_in_pipeline_split``):
    each stage's layers are megatron's, its parameters follow, and the plan is the heaviest stage's."""
    from megatron_xopd.models.memory import Workload, attention_params, dense_mlp_params, plan_memory, stage_layers

    cfg = dataclasses.replace(_config("llama"), num_layers=30)
    assert [stage_layers(cfg, _uneven(num_layers_in_last_pipeline_stage=12), s) for s in (0, 1)] == [
        list(range(18)), list(range(18, 30))]
    layer = attention_params(cfg, 1) + dense_mlp_params(cfg, 1)
    even, uneven = _uneven(), _uneven(num_layers_in_last_pipeline_stage=12)
    assert rank_params(cfg, uneven, 0).dense - rank_params(cfg, even, 0).dense == 3 * layer
    assert rank_params(cfg, uneven, 1).dense - rank_params(cfg, even, 1).dense == -3 * layer
    # 31 layers + the loss: 16 + 15; 94 + embedding + loss over 4 stages: 23, 24, 24, 23 (PP divides neither 31 nor 94)
    odd = dataclasses.replace(cfg, num_layers=31)
    assert [len(stage_layers(odd, _uneven(account_for_loss_in_pipeline_split=True), s)) for s in (0, 1)] == [16, 15]
    big = dataclasses.replace(cfg, num_layers=94)
    four = Layout(ParallelConfig(pipeline_model_parallel_size=4, account_for_embedding_in_pipeline_split=True,
                                 account_for_loss_in_pipeline_split=True), 4)
    assert [len(stage_layers(big, four, s)) for s in range(4)] == [23, 24, 24, 23]
    work = Workload(prompts=2, n_samples=1, modalities=1, prompt_tokens=8, new_tokens=8, micro_batch=2)
    wide = dataclasses.replace(cfg, hidden_size=256, ffn_hidden_size=1024)  # layers outweigh the output layer
    for split, heaviest in (({"num_layers_in_first_pipeline_stage": 28}, 0), ({"num_layers_in_last_pipeline_stage": 28}, 1)):
        plan = plan_memory(wide, wide, _uneven(**split), work, 1 << 40)
        assert plan.stage == heaviest and plan.student_params == rank_params(wide, _uneven(**split), heaviest)


def test_a_bad_pipeline_split_is_one_error_naming_the_key_and_the_model():
    student, teacher = dataclasses.replace(_config("llama"), num_layers=3), _config("llama")
    models = {"model.student.llm": student, "model.teacher.llm": teacher}
    with pytest.raises(LayoutError, match=r"model\.teacher\.llm\.num_layers \(4\) \+ 1 "
                                          r"\(trainer\.parallel\.account_for_loss_in_pipeline_split\)") as err:
        validate_layout(_uneven(account_for_loss_in_pipeline_split=True), models)
    assert "model.student.llm" not in str(err.value)  # 3 + 1 splits 2 + 1
    cases = (({"num_layers_in_last_pipeline_stage": 3}, r"model\.student\.llm\.num_layers \(3\) minus "
              r"trainer\.parallel\.num_layers_in_last_pipeline_stage \(3\) leaves 0 layer\(s\)"),
             ({"num_layers_in_first_pipeline_stage": 2, "num_layers_in_last_pipeline_stage": 2},
              r"model\.student\.llm\.num_layers \(3\) is not trainer\.parallel\.num_layers_in_first_pipeline_stage "
              r"\(2\) \+ trainer\.parallel\.num_layers_in_last_pipeline_stage \(2\)"),
             ({"num_layers_in_first_pipeline_stage": 0}, "num_layers_in_first_pipeline_stage must be >= 1"),
             ({"num_layers_in_first_pipeline_stage": 2, "account_for_loss_in_pipeline_split": True}, "exclusive"))
    for split, match in cases:
        with pytest.raises(LayoutError, match=match):
            validate_layout(_uneven(**split), models)
    with pytest.raises(LayoutError, match="num_layers_in_last_pipeline_stage needs pipeline_model_parallel_size > 1"):
        validate_layout(Layout(ParallelConfig(num_layers_in_last_pipeline_stage=1), 1), models)
    # at PP=3 the first stage is a middle one, taking what the last leaves: 3 = 1 + 1 + 1 fits, 4 = 3/2 + 1 does not
    three = Layout(ParallelConfig(pipeline_model_parallel_size=3, num_layers_in_last_pipeline_stage=1), 3)
    with pytest.raises(LayoutError, match=r"model\.teacher\.llm\.num_layers \(4\) minus trainer\.parallel\."
                                          r"num_layers_in_last_pipeline_stage \(1\) leaves 3 layer\(s\), not a positive "
                                          r"multiple of the 2 other stage\(s\)") as err:
        validate_layout(three, models)
    assert "model.student.llm" not in str(err.value)


def test_the_layout_search_splits_layers_pp_does_not_divide():
    """A 3-layer student and a 5-layer teacher: PP=2 splits them only with the loss or embedding counted as a layer;
    where PP=1 does not fit, the search finds PP=2 with the first split that fits both."""
    from megatron_xopd.models.memory import Workload, plan_memory, suggest_layout

    student = dataclasses.replace(_config("llama"), num_layers=3)
    teacher = dataclasses.replace(_config("llama"), num_layers=5)
    work = Workload(prompts=2, n_samples=1, modalities=1, prompt_tokens=8, new_tokens=8, micro_batch=2)
    one = plan_memory(student, teacher, Layout(ParallelConfig(), 2), work, 1 << 40).peak
    two = plan_memory(student, teacher, _uneven(account_for_embedding_in_pipeline_split=True), work, 1 << 40).peak
    assert two < one
    found = suggest_layout(student, teacher, work, 2, (one + two) // 2, max_tp=1)
    assert found is not None and found.layout.pp == 2
    assert found.layout.parallel.pipeline_split() == {"account_for_embedding_in_pipeline_split": True}
