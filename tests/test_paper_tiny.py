"""examples/paper_tiny/run.sh: the paper's run, command for command, on tiny random models (EP=2, 2 gloo processes).

From two HF checkpoints (a tiny Qwen3-MoE teacher, a tiny Qwen3-Omni thinker) to a trained Qwen3-Omni directory:
the losses are finite, samples.jsonl shows each model's own prompt layout, the export loads in transformers, its LLM tensors changed and every other tensor (audio
tower, vision tower) is bit-identical to the original, and compare_logits agrees with the trained checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLM_PREFIXES = ("model.", "lm_head.")


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_paper_tiny_run(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(20000 + os.getpid() % 20000),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["bash", str(ROOT / "examples/paper_tiny/run.sh"), str(out)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl_cm"]) and math.isfinite(r["kl_im"]) for r in rows)

    # the rollouts as the models saw them: the student's speech prompt in Qwen3-Omni's audio layout (start, the
    # tower's rows as pads, end), the teacher's prompt in its own template (SmolLM2's, with its system turn)
    samples = [json.loads(line) for line in (out / "logs" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and {s["modality"] for s in samples} == {"speech", "text"}
    start, end, pad = 49152, 49153, 49154  # make_models.py's audio token ids
    for s in samples:
        assert s["response_ids"] and isinstance(s["response_text"], str)
        assert not {start, end, pad} & set(s["teacher_prompt_ids"])
        if s["modality"] == "speech":
            ids = s["prompt_ids"]
            i, j = ids.index(start), ids.index(end)
            assert j - i > 2 and set(ids[i + 1 : j]) == {pad} and ids.count(pad) == j - i - 1
        else:
            assert s["prompt_ids"] != s["teacher_prompt_ids"]  # two templates: SmolLM2's adds its system prompt

    Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(out / "student_hf"))  # loads in transformers
    old, new = load_file(str(out / "hf/student/model.safetensors")), load_file(str(out / "student_hf/model.safetensors"))
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    llm = {k for k in old if k.startswith(LLM_PREFIXES)}
    others = set(old) - llm
    assert any(k.startswith("audio_tower.") for k in others) and any(k.startswith("visual.") for k in others)
    assert not changed & others  # audio tower and vision tower bit-identical
    # every LLM tensor but experts no token was routed to trained (a never-routed expert gets no gradient)
    assert {k for k in llm - changed if ".mlp.experts." not in k} == set()
    assert any(".mlp.experts." in k for k in changed)

    compare = json.loads((out / "compare.json").read_text().splitlines()[-1])
    assert compare["greedy_equal"] and compare["max_abs_diff"] < 1e-4
