"""GPU check of the memory plan's activation, logits and KV-cache model (``megatron_xopd.models.memory``) against
``torch.cuda.max_memory_reserved`` (what the GPU holds, the caching allocator's reserve included; the allocated peak
is printed beside it), on one GPU (TP = PP = 1).

    python3 benchmarks/memory_plan_check.py [--out "$OUT/memory_plan_check.json"]

A dense bf16 model (sizes from the options) is built with megatron-core and wrapped in megatron's DDP as the
trainer does. Two measurements, each the reserved peak above what was reserved before it (after emptying the
allocator's cache), ``measured_allocated`` the allocated peak above what was allocated:

* ``training``: forward and backward of one micro-batch (b x s tokens, the sampled-token log-probs of the last
  ``--new`` positions, gathered as the loss does) vs ``activations`` + ``loss logits`` of the plan;
* ``rollout``: ``RolloutEngine.generate`` of ``--prompts`` prompts x ``--n`` samples vs ``KV cache`` + ``prefill
  working set`` + ``sampling logits``.

Prints ONE JSON line with measured and planned bytes and ratio = measured / planned per measurement (recorded in
docs/scaling.md). Without CUDA it prints {"skipped": "no CUDA"} and exits 0; ``--cpu-smoke`` runs the same code on
CPU with tiny sizes and no measurement (measured and ratio null), to test this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def check(args: argparse.Namespace, device: str = "cuda") -> dict:
    """Measured vs planned bytes of one training micro-batch and one rollout (measured on CUDA only)."""
    import torch

    cuda = device == "cuda"

    def start() -> tuple[int, int]:
        """(reserved, allocated) bytes before a measurement; the allocator's cache is emptied first, so the reserve
        then holds only live tensors and the reserved peak above it is what the measured code made the GPU hold."""
        if not cuda:
            return 0, 0
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_reserved(), torch.cuda.memory_allocated()

    def record(base: tuple[int, int], planned: int) -> dict:
        measured = allocated = None
        if cuda:
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_reserved() - base[0]
            allocated = torch.cuda.max_memory_allocated() - base[1]
        return {"measured": measured, "measured_allocated": allocated, "planned": planned,
                "ratio": measured / planned if cuda else None}

    from megatron_xopd.algo import pack_sequences, response_logprobs
    from megatron_xopd.models import GPTModelConfig, build_gpt_model
    from megatron_xopd.models.gpt import uses_transformer_engine
    from megatron_xopd.models.memory import Layout, Workload, activation_bytes, kv_cache_bytes, plan_memory
    from megatron_xopd.ops.sampling import SamplingParams
    from megatron_xopd.rollout.engine import RolloutEngine
    from megatron_xopd.runtime import ParallelConfig, init_distributed, initialize_model_parallel, set_seed
    from megatron_xopd.trainer.build import wrap_ddp

    init_distributed()
    parallel = ParallelConfig()
    initialize_model_parallel(parallel)
    set_seed(0)  # megatron's model-parallel RNG states
    cfg = GPTModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                         num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                         family="qwen3", max_position_embeddings=args.prompt + args.new, params_dtype="bfloat16")
    layout = Layout(parallel, 1)
    flash = uses_transformer_engine(cfg)
    # the logits form: the measured pass below takes the log-probs from the output layer's logits
    train_work = Workload(prompts=args.micro_batch, n_samples=1, modalities=1, prompt_tokens=args.prompt,
                          new_tokens=args.new, micro_batch=args.micro_batch, flash_attention=flash,
                          divergence_form="logits")
    rollout_work = Workload(prompts=args.prompts, n_samples=args.n, modalities=1, prompt_tokens=args.prompt,
                            new_tokens=args.new, micro_batch=args.micro_batch, flash_attention=flash)
    model = build_gpt_model(cfg).to(device)
    ddp = wrap_ddp(model)
    out: dict = {"model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab}, "flash": flash}

    # training: one micro-batch forward + backward
    b, s = args.micro_batch, args.prompt + args.new
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=gen).tolist() for _ in range(b)]
    responses = torch.randint(0, args.vocab, (b, args.new), generator=gen)
    packed = pack_sequences(prompts, responses, torch.full((b,), args.new), seq_len=s).to(device)
    base = start()
    logits = ddp(packed.input_ids, packed.position_ids, None)
    loss = -response_logprobs(logits, packed, args.vocab).sum()
    loss.backward()
    del logits, loss
    plan = plan_memory(cfg, cfg, layout, train_work, 1 << 50)
    training = {l.name: l.bytes for l in plan.phases[2].lines}
    planned = activation_bytes(cfg, layout, train_work, 0, None) + training["loss logits"]
    out["training"] = record(base, planned)

    # rollout: KV cache, prefill and sampling
    ddp.zero_grad_buffer()
    engine = RolloutEngine(ddp, text_vocab_size=args.vocab)
    rollout_prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=gen).tolist() for _ in range(args.prompts)]
    base = start()
    engine.generate(rollout_prompts, SamplingParams(max_new_tokens=args.new, n=args.n, stop_ids=()))
    rollout = {l.name: l.bytes for l in plan_memory(cfg, cfg, layout, rollout_work, 1 << 50).phases[0].lines}
    planned = kv_cache_bytes(cfg, layout, rollout_work, 0) + rollout["prefill working set"] + rollout["sampling logits"]
    out["rollout"] = record(base, planned)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, nothing measured")
    args = parser.parse_args()
    import torch

    if args.cpu_smoke:
        for name, value in dict(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256, prompt=8, new=4,
                                micro_batch=2, prompts=2, n=2).items():
            setattr(args, name, value)
        result = check(args, "cpu")
    else:
        result = check(args) if torch.cuda.is_available() else {"skipped": "no CUDA"}
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
