"""Peak resident memory of the mcore -> HF export on each rank, against the checkpoint's size (CPU, gloo, 2 ranks).

    python benchmarks/bench_export_memory.py [--work DIR]

Two checkpoints: SmolLM2-135M (``builtin:smollm2``, its 9 heads padded for TP=2 by ``convert.heads``, converted by
``tools/convert_hf_to_mcore.py``), exported at TP=2; and a random Qwen3-MoE of similar size (8 experts), saved
by megatron's ``dist_checkpointing``, exported at EP=2. Each rank runs what ``tools/export_mcore_to_hf.py`` runs
(``model_parallel``, build, ``load_mcore_checkpoint``, ``export_model_to_hf``) and measures its resident-memory
growth during the export: VmHWM after it minus VmRSS before it (the peak is reset through /proc/self/clear_refs
first). The target: at most its own shard plus two of the largest tensor. Beside it, the same rank's growth during
``gather_canonical_state_dict`` (every rank receives the whole model: what the export did before it streamed).

Prints ONE JSON line: per case and rank, the growth and the bounds, in MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _growth(fn) -> int:
    """Bytes of resident memory ``fn`` added at its peak, above the resident set before it."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024


def worker(ckpt: Path, out: Path, tp: int, ep: int) -> None:
    import torch

    from megatron_xopd.convert.checkpoint import export_model_to_hf, load_mcore_checkpoint, load_model_config
    from megatron_xopd.convert.cli import model_parallel
    from megatron_xopd.models import build_gpt_model
    from megatron_xopd.models.sharding import canonical_layout, gather_canonical_state_dict
    from megatron_xopd.runtime import set_seed

    with model_parallel(tp, 1, ep) as rank:
        set_seed(0)
        cfg = load_model_config(ckpt)
        model = build_gpt_model(cfg)
        load_mcore_checkpoint(model, ckpt)
        layout = canonical_layout(model, cfg.vocab_size)
        own = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(entry.nbytes for entry in layout)
        total = sum(entry.nbytes for entry in layout)
        streamed = _growth(lambda: export_model_to_hf(model, cfg, out, side_files_dir=ckpt))
        gathered = _growth(lambda: gather_canonical_state_dict(model, cfg.vocab_size))
        torch.distributed.barrier()
        print("RESULT " + json.dumps({"rank": rank, "export_growth_mib": round(streamed / MiB, 1),
                                      "all_gather_growth_mib": round(gathered / MiB, 1),
                                      "own_shard_mib": round(own / MiB, 1), "largest_tensor_mib": round(largest / MiB, 1),
                                      "target_mib": round((own + 2 * largest) / MiB, 1),
                                      "checkpoint_mib": round(total / MiB, 1),
                                      "within_target": streamed <= own + 2 * largest}), flush=True)


def _moe_checkpoint(path: Path) -> None:
    """A random Qwen3-MoE of SmolLM2's width and vocabulary (8 experts, 8 layers), saved as the converter saves."""
    from megatron_xopd.convert.checkpoint import MODEL_CONFIG, save_mcore_checkpoint
    from megatron_xopd.convert.cli import model_parallel
    from megatron_xopd.models import GPTModelConfig, build_gpt_model
    from megatron_xopd.runtime import set_seed

    cfg = GPTModelConfig(family="qwen3", num_layers=8, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=8,
                         num_query_groups=4, kv_channels=64, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=512)
    with model_parallel(1, 1, 1):
        set_seed(0)
        model = build_gpt_model(cfg)
        save_mcore_checkpoint(model, path)
    cfg.save(path / MODEL_CONFIG)


def _torchrun(*args: str) -> list[dict]:
    port = str(20000 + int.from_bytes(os.urandom(2), "little") % 20000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--worker", nargs=4, metavar=("CKPT", "OUT", "TP", "EP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ckpt, out, tp, ep = args.worker
        worker(Path(ckpt), Path(out), int(tp), int(ep))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_export_"))
    from megatron_xopd.convert.heads import write_padded_copy
    from megatron_xopd.convert.sources import resolve_path

    dense_hf, dense, moe = work / "smollm2_tp2", work / "smollm2_mcore", work / "moe_mcore"
    if not (dense / "metadata.json").is_file():
        write_padded_copy(resolve_path("builtin:smollm2"), dense_hf, 2)
        subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_mcore.py"), str(dense_hf), str(dense)],
                       check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if not (moe / "metadata.json").is_file():
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"from benchmarks.bench_export_memory import _moe_checkpoint; "
                        f"from pathlib import Path; _moe_checkpoint(Path({str(moe)!r}))"],
                       check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = {"smollm2_tp2": _torchrun("--worker", str(dense), str(work / "out_tp2"), "2", "1"),
              "moe_ep2": _torchrun("--worker", str(moe), str(work / "out_ep2"), "1", "2")}
    print(json.dumps(result))


if __name__ == "__main__":  # dist_checkpointing's writer spawns processes
    main()
