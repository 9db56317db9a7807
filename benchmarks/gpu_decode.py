"""Decode throughput on one GPU: the rollout engine next to ``transformers.generate``, tokens/s per GPU.

    python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"       # called by benchmarks/gpu_check.sh

One process, world size 1, TP = PP = EP = 1, bf16 weights on both sides, greedy decoding, no stop token (every
row generates ``--new-tokens``), ``--rows`` prompts of ``--prompt-len`` random token ids. Sections, each recorded
even if another fails:

1. ``smollm2``: SmolLM2-135M's shape (``bench_rollout.SMOLLM2_SHAPE``: 30 layers, hidden 576, 9 heads / 3 KV
   heads, FFN 1536, vocabulary 49152, tied embeddings), random weights (transformers' initialisation, seed 0).
2. ``qwen3_moe``: Qwen3-30B-A3B's layer shape (hidden 2048, 32 query / 4 KV heads of 128, 128 experts, top-8,
   expert FFN 768, QK norms, vocabulary 151936, untied) with ``--moe-layers`` layers (default 4, ~3.1B
   parameters) so that both copies of the weights, ours and transformers', fit one GPU next to two KV caches.

For each: the same random weights in ``transformers`` (``AutoModelForCausalLM.from_config`` on the GPU) and in
megatron-core (``megatron_xopd.convert.hf.hf_to_canonical``; transformers 5 holds the experts fused in memory,
``[E, 2F, H]`` / ``[E, H, F]``, which are split into the per-expert tensors of a checkpoint first). Timed after a
warm-up, with ``torch.cuda.synchronize`` around each run:

* ``ours_tok_s`` / ``hf_tok_s``: generated tokens (rows x new tokens) per second of the whole ``generate``;
* ``ours_decode_tok_s`` / ``hf_decode_tok_s``: of the decode steps alone (the time of a one-token run, i.e. the
  prefill and first sample, subtracted);
* ``ours_over_hf``: the ratio of the decode rates; ``tokens_match_hf`` / ``rows_matching``: greedy tokens equal
  (bf16 logits meet near-ties that the two implementations' rounding breaks differently: a row that differs
  from some step on is expected now and then, and reported, not failed);
* ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the section.

``--budget-s``: when a short run (``--probe-tokens``) predicts that a section's timed runs would not fit in the
time left, its ``--new-tokens`` is cut to what fits and recorded (``new_tokens``, ``new_tokens_asked``).

Prints ONE JSON line (also written to ``--out`` after every section). Exit 0 when every section ran, 1 when one
failed, 2 without CUDA. ``--allow-cpu`` runs tiny shapes in float32 on the CPU (``tests/test_gpu_decode.py``), so
the script is known to work before GPU minutes are spent on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

QWEN3_MOE_SHAPE = dict(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=6144,  # unused: every layer is an MoE layer
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
)

# --allow-cpu: the same families at a size the CPU runs in seconds.
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)
TINY_MOE = dict(TINY, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def checkpoint_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers-5 state dict with experts fused in memory (``experts.gate_up_proj`` [E, 2F, H], gate rows
    first, and ``experts.down_proj`` [E, H, F]) as a checkpoint names them: one tensor per expert."""
    out = {}
    for name, tensor in state_dict.items():
        match = _FUSED.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
    return out


def _models(shape: dict, dtype: torch.dtype, device: str):
    """transformers' model (random, seed 0) and megatron's with the same weights, both on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_xopd.convert.hf import hf_config_to_model_config, hf_to_canonical
    from megatron_xopd.models import build_gpt_model, load_canonical_state_dict
    from megatron_xopd.runtime import set_seed

    fields = dict(shape)
    model_type = fields.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval()
    hf.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    hf.generation_config.pad_token_id = 0
    set_seed(0)
    cfg = hf_config_to_model_config(config.to_dict(), params_dtype=str(dtype).removeprefix("torch."))
    model = build_gpt_model(cfg)  # on the GPU when there is one (megatron_xopd.models.gpt)
    load_canonical_state_dict(model, hf_to_canonical(checkpoint_tensors(hf.state_dict()), cfg))
    model.to(device)
    return hf, model, cfg


def _section(name: str, shape: dict, args: argparse.Namespace, dtype: torch.dtype, device: str, deadline: float) -> dict:
    from megatron_xopd.rollout import RolloutEngine, SamplingParams

    cuda = device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hf, model, cfg = _models(shape, dtype, device)
    engine = RolloutEngine(model, cfg.text_vocab_size)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.text_vocab_size, (args.rows, args.prompt_len), generator=gen)
    prompts = ids.tolist()
    x = ids.to(device)

    def ours(n: int) -> torch.Tensor:
        return engine.generate(prompts, SamplingParams(max_new_tokens=n, greedy=True)).tokens

    def theirs(n: int) -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n)
        return out[:, args.prompt_len :]

    def timed(fn, n: int) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        out = fn(n)
        sync()
        return time.perf_counter() - start, out.cpu()

    probe = max(2, min(args.probe_tokens, args.new_tokens))
    timed(ours, 2), timed(theirs, 2)  # warm-up: allocator, kernels, lazy imports
    first = {"ours": timed(ours, 1)[0], "hf": timed(theirs, 1)[0]}
    short = {"ours": timed(ours, probe)[0], "hf": timed(theirs, probe)[0]}
    per_token = {k: max(short[k] - first[k], 1e-6) / (probe - 1) for k in short}
    new = args.new_tokens
    left = deadline - time.monotonic()
    predicted = sum(first.values()) + sum(per_token.values()) * (new - 1)
    if predicted > left:  # cut the run to what the budget allows
        new = max(probe, int((left - sum(first.values())) / sum(per_token.values())))
    wall_ours, tok_ours = timed(ours, new)
    wall_hf, tok_hf = timed(theirs, new)
    rows_steps = args.rows * (new - 1)
    ours_decode = rows_steps / max(wall_ours - first["ours"], 1e-9)
    hf_decode = rows_steps / max(wall_hf - first["hf"], 1e-9)
    matching = (tok_ours == tok_hf).all(dim=1)
    result = {
        "ok": True,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": cfg.num_layers,
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "rows": args.rows,
        "prompt_len": args.prompt_len,
        "new_tokens": new,
        "new_tokens_asked": args.new_tokens,
        "ours_tok_s": round(args.rows * new / wall_ours, 1),
        "hf_tok_s": round(args.rows * new / wall_hf, 1),
        "ours_decode_tok_s": round(ours_decode, 1),
        "hf_decode_tok_s": round(hf_decode, 1),
        "ours_over_hf": round(ours_decode / hf_decode, 3),
        "prefill_s": {k: round(v, 3) for k, v in first.items()},
        "tokens_match_hf": bool(matching.all()),
        "rows_matching": int(matching.sum()),
        "sync_every": engine.sync_every,
        "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    del hf, model, engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON line here")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--probe-tokens", type=int, default=16, help="the short run that predicts a section's time")
    p.add_argument("--budget-s", type=float, default=170.0)
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--allow-cpu", action="store_true", help="tiny shapes in float32 on the CPU, to test this script")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 2
    start = time.monotonic()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    from _sections import device_header, run_sections
    from bench_rollout import SMOLLM2_SHAPE

    from megatron_xopd.runtime import ParallelConfig, init_distributed, initialize_model_parallel

    init_distributed()
    initialize_model_parallel(ParallelConfig())
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = {
        "smollm2": {**SMOLLM2_SHAPE, **(TINY if not cuda else {})},
        "qwen3_moe": {**QWEN3_MOE_SHAPE, "num_hidden_layers": args.moe_layers, **(TINY_MOE if not cuda else {})},
    }

    def section(name: str) -> Callable[[int], dict]:
        def run(left: int) -> dict:  # each section may use an even share of what is left
            deadline = time.monotonic() + (args.budget_s - (time.monotonic() - start)) / left
            return _section(name, shapes[name], args, dtype, device, deadline)
        return run

    def free() -> None:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    return run_sections(device_header(), {name: section(name) for name in shapes}, args.skip, args.out, free)


if __name__ == "__main__":
    sys.exit(main())
