"""The X-OPD trainer end to end on tiny models: metrics, TP=2 parity, exact resume, crash-safe checkpoints,
bad input."""

import math
import shutil

import pytest
import torch

from megatron_xopd.testing import run_distributed
from megatron_xopd.trainer.checkpoint import latest_checkpoint
from tests._trainer_setup import PROMPTS, run_config, tiny_llm, train, train_with_snapshots, write_feature_cuts

REQUIRED = {"kl_cm", "kl_im", "loss", "L_im", "L_cm", "ratio_mean", "ratio_max", "logprob_gap_mean", "logprob_gap_max",
            "response_len_cm", "response_len_im",
            "time_rollout_s", "time_teacher_s", "time_train_s", "time_step_s", "peak_mem_mb", "tokens_per_s", "lr",
            "grad_norm"}
TIMING = {"time_rollout_s", "time_teacher_s", "time_train_s", "time_step_s", "peak_mem_mb", "tokens_per_s", "save_s",
          "save_share"}


def _deterministic(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parity
def test_tp2_run_matches_tp1_and_logs_every_metric(tmp_path):
    manifest = write_feature_cuts(tmp_path)
    evaluation = {"trainer": {"eval_every": 3, "eval_max_new_tokens": 4}, "data": {"validation": str(manifest)}}
    tp1 = run_distributed(train, 1, run_config(tmp_path / "tp1", manifest, hf=True, **evaluation))[0]
    evaluation["trainer"]["parallel"] = {"tensor_model_parallel_size": 2}
    tp2 = run_distributed(train, 2, run_config(tmp_path / "tp2", manifest, hf=True, **evaluation))[0]
    assert [r["step"] for r in tp1] == [1, 2, 3]
    assert REQUIRED <= tp1[0].keys()
    first = tp1[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # on-policy: r starts at 1
    # the decode's log-probs and the training forward's, same weights, fp32 (SDPA in both)
    for run in (tp1, tp2):
        assert 0 <= run[0]["logprob_gap_mean"] <= run[0]["logprob_gap_max"] < 1e-4, run[0]
    assert first["response_len_cm"] > 0 and first["response_len_im"] > 0 and first["lr"] == pytest.approx(1e-3)
    for a, b in zip(tp1, tp2):
        for key in ("kl_cm", "kl_im", "loss", "L_im", "L_cm", "response_len_cm", "response_len_im", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    # the evaluation hook: greedy answers from S and T on the validation cuts, every 3 steps
    assert "eval/acc_speech" not in tp1[1] and tp1[2]["eval/prompts"] == len(PROMPTS)
    for key in ("eval/acc_speech", "eval/acc_text", "eval/gap"):
        assert tp2[2][key] == tp1[2][key]
    assert tp1[2]["eval/gap"] == pytest.approx(tp1[2]["eval/acc_text"] - tp1[2]["eval/acc_speech"])


def test_resume_reproduces_an_uninterrupted_run_and_ignores_half_written_checkpoints(tmp_path):
    manifest = write_feature_cuts(tmp_path)
    full = run_distributed(train, 1, run_config(tmp_path / "full", manifest, trainer={"max_steps": 4},
                                                checkpoint={"save_every": 2}))[0]
    first = run_distributed(train, 1, run_config(tmp_path / "split", manifest, trainer={"max_steps": 2},
                                                 checkpoint={"save_every": 2}))[0]
    ckpt = tmp_path / "split" / "ckpt"
    assert latest_checkpoint(ckpt).name == "step_0000002"
    # A crash while writing step 3: a temporary directory with part of a checkpoint. Resume must skip it.
    partial = ckpt / ".tmp_step_0000003"
    shutil.copytree(ckpt / "step_0000002", partial)
    (partial / "metadata.json").unlink()
    assert latest_checkpoint(ckpt).name == "step_0000002"
    resumed = run_distributed(train, 1, run_config(tmp_path / "split", manifest, trainer={"max_steps": 4},
                                                   checkpoint={"save_every": 2}))[0]
    assert [r["step"] for r in first] == [1, 2] and [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert _deterministic(resumed) == _deterministic(full)


def test_a_bf16_run_with_a_trainable_projection_saves_and_resumes(tmp_path):
    """megatron's mixed-precision optimizer saves only 16-bit parameters: the trainable perception parts of a bf16
    student must hold bf16 too, or the first save fails (``KeyError`` in its ``sharded_state_dict``)."""
    manifest = write_feature_cuts(tmp_path)
    bf16 = {"student": {"llm": tiny_llm(params_dtype="bfloat16")}, "teacher": {"llm": tiny_llm(params_dtype="bfloat16")}}
    cfg = run_config(tmp_path / "run", manifest, trainer={"max_steps": 2}, model=bf16, checkpoint={"save_every": 1})
    full = run_distributed(train, 1, cfg)[0]
    ckpt = tmp_path / "run" / "ckpt"
    assert latest_checkpoint(ckpt).name == "step_0000002"
    shutil.rmtree(ckpt / "step_0000002")  # as if the run had stopped after step 1's save
    resumed = run_distributed(train, 1, cfg)[0]
    assert [r["step"] for r in resumed] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in full)
    assert _deterministic(resumed) == _deterministic(full)


def test_bad_cuts_are_counted_and_skipped_and_training_goes_on(tmp_path):
    manifest = write_feature_cuts(tmp_path, PROMPTS[:4] + ["   ", "word " * 400])
    next((tmp_path / "features").rglob("cut1.npy")).unlink()
    rows = run_distributed(train, 1, run_config(tmp_path / "run", manifest, trainer={"max_steps": 2},
                                                data={"prompts_per_step": 3}))[0]
    assert len(rows) == 2
    last = rows[-1]
    assert last["data/skipped_encoder_features"] == 1  # cut1's feature file is gone
    assert last["data/cuts_skipped"] >= 2  # and the empty prompt (or the over-long one) once drawn


def test_bad_cuts_raise_naming_cut_and_field_when_asked(tmp_path):
    manifest = write_feature_cuts(tmp_path, ["   "] * 2)
    with pytest.raises(RuntimeError, match=r"cut 'cut0', field 'text_prompt': empty prompt"):
        run_distributed(train, 1, run_config(tmp_path / "run", manifest, data={"on_bad_cut": "raise"}))


def test_unknown_config_key_and_unequal_vocab_are_clear_errors(tmp_path):
    from omegaconf.errors import ConfigKeyError

    from megatron_xopd.trainer import to_run_config

    manifest = write_feature_cuts(tmp_path)
    with pytest.raises(ConfigKeyError, match="lamb"):
        to_run_config(run_config(tmp_path, manifest, xopd={"lamb": 0.5}))
    bad_vocab = run_config(tmp_path / "run", manifest, model={"teacher": {"llm": {"vocab_size": 1000}}})
    with pytest.raises(RuntimeError, match="unequal vocab: model.teacher has 1000 embedding rows"):
        run_distributed(train, 1, bad_vocab)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_alignment_stage_then_offline_kd_from_its_checkpoint(tmp_path):
    """The study's stages: SFT of the perception alone (the LLM frozen) on the transcripts from S, then offline KD
    of the LLM on the teacher's greedy answers from that checkpoint, evaluated first with the teacher's accuracy."""
    manifest = write_feature_cuts(tmp_path)
    sft = {"loss": "sft", "responses": "teacher_greedy"}
    align_cfg = run_config(tmp_path / "align", manifest, hf=True, trainer={"max_steps": 2},
                           xopd={"loss": "sft", "responses": "transcript", "lam": 0.0},
                           model={"student": {"freeze_llm": True}})
    before, after, rows, answers = run_distributed(train_with_snapshots, 1, align_cfg)[0]
    assert _changed(before["llm"], after["llm"]) == set()
    assert _changed(before["perception"], after["perception"]) == set(before["perception"])
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["L_im"] == 0.0 and rows[0]["L_cm"] < 0.0
    assert math.isnan(rows[0]["kl_cm"])  # no student samples: the sampled-token KL estimate does not apply
    assert answers == {} and rows[0]["response_len_cm"] > 6  # transcripts: longer than any sampled response

    # Offline KD from the aligned student: the teacher is the student's own LLM here, so from T they answer alike.
    teacher_hf = align_cfg["model"]["student"]["hf_path"]
    kd_cfg = run_config(tmp_path / "kd", manifest, hf=True, trainer={"max_steps": 1, "eval_at_start": True,
                                                                       "eval_max_new_tokens": 4},
                        xopd={**sft, "lam": 0.5},
                        model={"teacher": {"hf_path": teacher_hf}, "student": {"perception": {"freeze_adapter": True}}},
                        data={"validation": str(manifest), "scorer": "tests._trainer_setup:response_length_parity"},
                        checkpoint={"init_from": str(tmp_path / "align" / "ckpt")})  # its newest step
    start, end, kd_rows, answers = run_distributed(train_with_snapshots, 1, kd_cfg)[0]
    assert len(answers) == 2 and all(0 < len(a) <= 6 for a in answers.values())  # 1 step x 2 prompts, cached
    for k in after["perception"]:
        torch.testing.assert_close(start["perception"][k], after["perception"][k], rtol=0, atol=0)
    assert _changed(start["llm"], end["llm"]) and not _changed(start["perception"], end["perception"])
    first = kd_rows[0]
    assert first["step"] == 0 and first["eval/prompts"] == len(PROMPTS)
    assert first["eval/acc_teacher_text"] == first["eval/acc_text"]
    assert kd_rows[1]["L_im"] < 0.0 and kd_rows[1]["L_cm"] < 0.0


def test_init_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    manifest = write_feature_cuts(tmp_path)
    cfg = run_config(tmp_path / "run", manifest, checkpoint={"init_from": str(tmp_path)})
    with pytest.raises(RuntimeError, match="checkpoint.init_from: .* is neither a checkpoint"):
        run_distributed(train, 1, cfg)
