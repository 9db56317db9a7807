"""Checkpoints that move between layouts (issue 25), and the paper's composed layout against one process.

A tiny MoE student and MoE teacher (tests/test_ep.py's) take one X-OPD optimizer step on fixed rollouts, saved at
EP2 x DP2, EP1 x DP2, EP2 x DP2 with the plain optimizer, and TP2 x PP2 x EP2 x DP2 with sequence parallelism and
the distributed optimizer (8 ranks); each checkpoint is resumed at EP1 x DP2, EP2 x DP2, TP2+SP x DP2, DP1 and
EP2 x DP4, and the step after resuming equals the second step of one uninterrupted process (loss, grad norm,
every weight within 1e-5; Adam's moments enter that step). Every layout computes the same global step: DP rank d
trains rows d, d + DP, ... with weights normalised by global counts (tests/test_scale.py).

Spawns are shared to keep the suite short: one 8-rank run (the composed layout's step, its parity with the single
process, and its checkpoint), one 2-rank run (three saves, then the resumes at two ranks), one 4-rank run and one
single process (the reference and the DP1 resumes).
"""

from __future__ import annotations

import pytest
import torch

from megatron_xopd.testing import run_distributed
from tests._models import VOCAB, tiny_perception_config
from tests._steps import optimizer_steps
from tests.test_ep import _moe_config, _randomize
from tests.test_scale import _assert_same_step

TIMEOUT_S = 600

COMPOSED = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2,
            "sequence_parallel": True, "use_distributed_optimizer": True}
SAVED = {  # name: (world size, layout)
    "ep2xdp2": (2, {"expert_model_parallel_size": 2}),
    "ep1xdp2": (2, {}),
    "ep2xdp2-plain": (2, {"expert_model_parallel_size": 2, "use_distributed_optimizer": False}),
    "tp2xpp2xep2xdp2+sp": (8, COMPOSED),
}
RESUMED = {
    "ep1xdp2": (2, {}),
    "ep2xdp2": (2, {"expert_model_parallel_size": 2}),
    "tp2+sp x dp2": (4, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
    "dp1": (1, {}),
    "ep2xdp4": (4, {"expert_model_parallel_size": 2}),
}


def _models(sequence_parallel: bool):
    from megatron_xopd.models import SpeechStudent, build_teacher
    from megatron_xopd.runtime import set_seed

    set_seed(0)
    student_cfg = _moe_config(vocab_size=VOCAB + 1, text_vocab_size=VOCAB)
    student = SpeechStudent(student_cfg, tiny_perception_config(), VOCAB, sequence_parallel=sequence_parallel)
    _randomize(student.language_model, VOCAB + 1, seed=1)
    teacher = build_teacher(_moe_config(), student_cfg, sequence_parallel=sequence_parallel)
    _randomize(teacher, VOCAB, seed=2)
    if student.perception is None:  # a later pipeline stage
        return student, teacher
    with torch.no_grad():
        student.perception.proj.weight.copy_(torch.randn(32, 16, generator=torch.Generator().manual_seed(3)) * 0.3)
        student.perception.proj.bias.zero_()
    return student, teacher


def _steps(layout: dict, steps: int = 1, save_to: str | None = None, load_from: str | None = None,
           metadata: dict | None = None):
    """``steps`` X-OPD optimizer steps at ``layout`` (after loading ``load_from``), saved to ``save_to`` (with
    ``metadata`` as the optimizer's checkpoint format if given); returns each step's (loss, grad norm, full
    weights) on rank 0, or the :class:`CheckpointError` text when the load fails."""
    import torch.distributed as dist

    from megatron_xopd.runtime import ParallelConfig, initialize_model_parallel
    from megatron_xopd.trainer import checkpoint

    layout = ParallelConfig(**layout)
    initialize_model_parallel(layout)
    student, teacher = _models(layout.sequence_parallel)
    saved_format = checkpoint.OPTIMIZER_METADATA
    checkpoint.OPTIMIZER_METADATA = metadata or saved_format
    try:
        out, _ = optimizer_steps(layout, student, teacher, steps=steps, load_from=load_from, save_to=save_to,
                                 micro_batch_size=1 if layout.pipeline_model_parallel_size > 1 else 2)
    except checkpoint.CheckpointError as err:
        return str(err)
    finally:
        checkpoint.OPTIMIZER_METADATA = saved_format
    return out if dist.get_rank() == 0 else None


def _runs(runs: list[dict]) -> list:
    """Several :func:`_steps` in one set of processes (megatron-core's import dominates a spawn)."""
    return [_steps(**run) for run in runs]


def _resumes(root, world: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every resume at ``world`` ranks: each saved checkpoint at each resumed layout of that size; the plain
    optimizer's checkpoint also into the plain optimizer."""
    runs, names = [], []
    for resumed, (size, layout) in RESUMED.items():
        if size != world:
            continue
        for saved in SAVED:
            runs.append({"layout": layout, "load_from": str(root / saved / "step_0000001")})
            names.append((saved, resumed))
            if saved.endswith("-plain") and size > 1:
                runs.append({"layout": {**layout, "use_distributed_optimizer": False},
                             "load_from": str(root / saved / "step_0000001")})
                names.append((saved, resumed + "-plain"))
    return runs, names


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    """The single-process reference, the composed layout's step, and every resume's step."""
    root = tmp_path_factory.mktemp("reshard")
    composed = run_distributed(_runs, 8, [{"layout": COMPOSED, "save_to": str(root / "tp2xpp2xep2xdp2+sp")}],
                               timeout_s=TIMEOUT_S)[0][0][0]
    two = [{"layout": layout, "save_to": str(root / name)} for name, (size, layout) in SAVED.items() if size == 2]
    two.append({"layout": SAVED["ep2xdp2"][1], "save_to": str(root / "bucket-format"),  # an older version's format
                "metadata": {"distrib_optim_sharding_type": "dp_reshardable"}})
    resumes2, names2 = _resumes(root, 2)
    failure = {"layout": {}, "load_from": str(root / "bucket-format" / "step_0000001")}
    out2 = run_distributed(_runs, 2, two + resumes2 + [failure], timeout_s=TIMEOUT_S)[0]
    resumes4, names4 = _resumes(root, 4)
    out4 = run_distributed(_runs, 4, resumes4, timeout_s=TIMEOUT_S)[0]
    resumes1, names1 = _resumes(root, 1)
    out1 = run_distributed(_runs, 1, [{"layout": {}, "steps": 2}] + resumes1, timeout_s=TIMEOUT_S)[0]
    resumed = dict(zip(names2 + names4 + names1, out2[len(two):-1] + out4 + out1[1:]))
    return {"reference": out1[0], "composed": composed, "resumed": resumed, "failure": out2[-1], "root": root}


@pytest.mark.parity
@pytest.mark.slow
def test_the_composed_layout_step_equals_the_single_process_step(reshard):
    """TP=2 x PP=2 x EP=2 x DP=2 with sequence parallelism and the distributed optimizer (8 gloo ranks), MoE
    student and teacher: one X-OPD step equals the step in one process."""
    first, _ = reshard["reference"]
    assert first[1] > 0 and any(".mlp.experts." in k for k in first[2])
    _assert_same_step(reshard["composed"], first, "TP2 PP2 EP2 DP2 +SP")


@pytest.mark.parity
@pytest.mark.slow
def test_a_checkpoint_resumes_at_every_layout_with_the_uninterrupted_next_step(reshard):
    _, second = reshard["reference"]
    expected = {(saved, resumed) for saved in SAVED for resumed in RESUMED}
    assert expected <= set(reshard["resumed"])
    assert {("ep2xdp2-plain", r + "-plain") for r in RESUMED if RESUMED[r][0] > 1} <= set(reshard["resumed"])
    failed = []
    for (saved, resumed), result in reshard["resumed"].items():
        try:
            assert not isinstance(result, str), result
            _assert_same_step(result[0], second, f"saved at {saved}, resumed at {resumed}")
        except AssertionError as err:
            failed.append(f"{saved} -> {resumed}: {str(err).splitlines()[0]}")
    assert failed == []


@pytest.mark.parity
@pytest.mark.slow
def test_completion_record_stores_the_layout(reshard):
    from megatron_xopd.trainer.checkpoint import format_layout, saved_layout

    layout = saved_layout(reshard["root"] / "tp2xpp2xep2xdp2+sp" / "step_0000001")
    assert format_layout(layout) == "TP2 PP2 EP2 ETP2 DP2 +SP, distributed optimizer"
    assert layout["dp_ranks"] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert format_layout(saved_layout(reshard["root"] / "ep2xdp2-plain" / "step_0000001")) == (
        "TP1 PP1 EP2 ETP1 DP2, plain optimizer")


@pytest.mark.parity
@pytest.mark.slow
def test_an_optimizer_that_cannot_be_carried_names_both_layouts_and_init_from(reshard):
    """A checkpoint whose optimizer state is in the bucket format (layout-dependent, an older version's) resumed at
    another EP: one CheckpointError, no raw KeyError."""
    message = reshard["failure"]
    assert isinstance(message, str), "the bucket-format checkpoint loaded at another layout"
    assert "written at TP1 PP1 EP2 ETP1 DP2, distributed optimizer" in message
    assert "this run is TP1 PP1 EP1 ETP1 DP2, distributed optimizer" in message
    assert "the optimizer state cannot be carried to this layout: key optimizer." in message
    assert "checkpoint.init_from=" in message and "bucket-format/step_0000001" in message


# ------------------------------------------------------------------------------------------- through the trainer
MOE_LLM = {"num_moe_experts": 4, "moe_ffn_hidden_size": 32, "moe_router_topk": 2}


def _trainer_cfg(root, manifest, run: str, steps: int, layout: dict) -> dict:
    from tests._trainer_setup import run_config, tiny_llm, write_tiny_hf

    # The teacher is not in the checkpoint: it loads from a tiny HF directory at every launch. A randomly initialised
    # one would differ between layouts (its draws follow the student's, which depend on the experts per EP rank).
    teacher = {"llm": {}, "hf_path": str(write_tiny_hf(manifest.parent / "teacher_hf", seed=2))}
    return run_config(root / run, manifest, trainer={"max_steps": steps, "parallel": layout},
                      model={"student": {"llm": tiny_llm(**MOE_LLM)}, "teacher": teacher},
                      data={"prompts_per_step": 1},
                      checkpoint={"save_every": 1, "keep_last": 0})


def _relaunch(cfg: dict, train_on: bool) -> dict:
    """Build the trainer (it resumes from ``checkpoint.dir``) and read what it loaded: full weights, Adam moments by
    parameter name (plain optimizer, so each rank holds them whole for its parameters), step, LR, data position,
    this rank's next batch and the resume log line; then train on if ``train_on``."""
    import json
    import logging
    from pathlib import Path

    import torch.distributed as dist

    from megatron_xopd.models import gather_canonical_state_dict
    from megatron_xopd.trainer import XOPDTrainer, to_run_config

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("megatron_xopd").addHandler(handler)
    logging.getLogger("megatron_xopd").setLevel(logging.INFO)
    run = to_run_config(cfg)
    trainer = XOPDTrainer(run)
    names = {p: n for n, p in trainer.student.named_parameters()}
    moments = {}
    for inner in (part.optimizer for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])):
        for group in inner.param_groups:
            for p in group["params"]:
                if names.get(p, "").startswith("language_model.") and "exp_avg" in inner.state.get(p, {}):
                    moments[names[p]] = (inner.state[p]["exp_avg"].clone(), float(inner.state[p]["step"]))
    loader = trainer.loader.state_dict()["diagnostics"]
    vocab = trainer.models.student_cfg.vocab_size
    out = {"weights": {k: v.clone() for k, v in gather_canonical_state_dict(trainer.student.language_model,
                                                                             vocab).items()},
           "moments": moments, "step": trainer.step, "epoch": trainer.epoch,
           "lr": trainer.optimizer.param_groups[0]["lr"],
           "kept": loader["stats_per_epoch"][loader["current_epoch"]]["kept_batches"], "log": lines}
    if train_on:
        trainer.train()
        path = Path(run.logging.dir) / "metrics.jsonl"
        out["metrics"] = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        out["next_cuts"] = next(iter(trainer.loader))["cut_ids"]
    dist.barrier()
    return out


def _global_batches(manifest: str, seed: int, count: int) -> list[list[str]]:
    """The epoch's first ``count`` batches of one cut each, in lhotse's order (the same at every DP size)."""
    from megatron_xopd.data.cuts import load_prompt_cuts
    from megatron_xopd.data.dataset import build_dataloader

    cuts = load_prompt_cuts(manifest, seed=seed)
    sampler = build_dataloader(cuts, None, max_cuts=1, seed=seed, num_buckets=2).sampler
    sampler.set_epoch(0)
    return [[c.id for c in batch] for batch, _ in zip(sampler, range(count))]


@pytest.mark.parity
@pytest.mark.slow
def test_the_trainer_resumes_at_another_layout_and_dp_size(tmp_path):
    """A MoE run at EP2 x DP2 (save_every=1) is resumed from its step 2 at EP1 x DP2, where step 3's metrics line
    equals the uninterrupted run's, and at DP1, which loads the same weights and Adam state, keeps step and LR, and
    continues the data at the documented position."""
    import shutil

    from tests._trainer_setup import train, write_feature_cuts

    manifest = write_feature_cuts(tmp_path)
    ep2 = {"expert_model_parallel_size": 2}
    full = run_distributed(train, 2, _trainer_cfg(tmp_path, manifest, "full", 3, ep2), timeout_s=TIMEOUT_S)[0]
    for run in ("same_dp", "dp1"):
        shutil.copytree(tmp_path / "full" / "ckpt" / "step_0000002", tmp_path / run / "ckpt" / "step_0000002")
    plain = {"use_distributed_optimizer": False}
    same_dp = run_distributed(_relaunch, 2, _trainer_cfg(tmp_path, manifest, "same_dp", 3, plain), True,
                              timeout_s=TIMEOUT_S)[0]
    dp1 = run_distributed(_relaunch, 1, _trainer_cfg(tmp_path, manifest, "dp1", 3, {}), False,
                          timeout_s=TIMEOUT_S)[0]

    assert [r["step"] for r in full] == [1, 2, 3] and [r["step"] for r in same_dp["metrics"]] == [3]
    for key in ("loss", "kl_cm", "kl_im", "grad_norm", "lr", "response_len_cm", "response_len_im"):
        assert same_dp["metrics"][0][key] == pytest.approx(full[2][key], abs=1e-5, rel=1e-5), key
    for got, now in ((same_dp, "TP1 PP1 EP1 ETP1 DP2"), (dp1, "TP1 PP1 EP1 ETP1 DP1")):
        assert any(line.startswith(f"resuming step 2 written at TP1 PP1 EP2 ETP1 DP2, distributed optimizer on a new "
                                   f"layout {now}, plain optimizer (") for line in got["log"]), got["log"]
    assert (dp1["step"], dp1["epoch"], dp1["lr"]) == (same_dp["step"], same_dp["epoch"], same_dp["lr"]) == (2, 0, 1e-3)
    assert dp1["weights"].keys() == same_dp["weights"].keys() and any(".experts." in k for k in dp1["weights"])
    for key, value in same_dp["weights"].items():
        torch.testing.assert_close(dp1["weights"][key], value, atol=0, rtol=0, msg=key)
    assert dp1["moments"].keys() == same_dp["moments"].keys() and dp1["moments"]
    for key, (moment, step) in same_dp["moments"].items():
        assert dp1["moments"][key][1] == step == 2.0
        torch.testing.assert_close(dp1["moments"][key][0], moment, atol=0, rtol=0, msg=key)
    # the data position: 2 batches per rank at DP2 are the epoch's first 4; DP1 goes on with the 5th
    assert same_dp["kept"] == 2 and dp1["kept"] == 4
    assert dp1["next_cuts"] == _global_batches(str(manifest), 7, 5)[4]
