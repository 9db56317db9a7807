"""Vocab-parallel token sampling: greedy, temperature, top-k and top-p, without gathering the logits.

Every tensor-parallel rank holds the logits of its vocabulary shard ``[N, V/TP]`` (megatron's contiguous,
equal split; columns at or beyond ``text_vocab_size`` are padding or added tokens and are never sampled).
Per step each rank reduces its shard to a few numbers per row and the ranks exchange those with one
``all_gather`` of a ``[N, 3 + 2k]`` tensor:

* the shard's max logit and its sums of ``exp(x - max)`` at temperature 1 and at the sampling temperature
  (from which every rank forms the global log-normaliser, in the same order, so bit-identical on all ranks);
* ``k`` candidates (logit, global id): the shard's argmax (greedy), its Gumbel-max winner (plain temperature
  sampling: exact, since the global Gumbel-max is the max of the shard winners), or its top ``k`` (top-k,
  and top-p, whose nucleus must lie among the global top ``k`` candidates: exact when the top
  ``top_p_candidates`` tokens hold at least ``top_p`` of the mass, otherwise the nucleus is cut at that
  many tokens; see :class:`SamplingParams`).

Randomness is a counter-based hash of (seed, sample row, response index, global token id), not a stateful
generator: a run is reproducible, every TP rank draws the same noise, and the draw does not depend on the TP
layout (TP=1 and TP=2 sample the same tokens up to float ties).

Log-probabilities: ``logprobs`` are those of the sampled token under the model's own distribution at
temperature 1 over the text vocabulary, i.e. ``log_softmax(logits[..., :text_vocab_size])``; this is what
the trainer recomputes for the importance ratio ``p_theta / p_old``, which therefore starts at 1.
``sampling_logprobs`` are under the distribution actually sampled from (temperature, top-k, top-p applied;
0 for greedy decoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .sharding import vocab_shard

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to decode.

    ``greedy`` (or ``temperature == 0``) takes the argmax. Otherwise tokens are drawn from
    ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely tokens (0: no limit) and then
    to the smallest set whose probability (renormalised after top-k) reaches ``top_p``. Exact top-p over
    vocab shards gathers ``top_p_candidates`` candidates per shard (when ``top_k`` is 0): if those hold less
    than ``top_p`` of the mass, the nucleus is cut there, a documented approximation that only bites for very
    flat distributions. Generation of a sample stops after a token in ``stop_ids`` (which should include the
    EOS id; the stop token is part of the response) or after ``max_new_tokens``. ``n`` samples are drawn per
    prompt. ``seed`` fixes the draw; use a different one per data-parallel rank and per step.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    n: int = 1
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int = 0
    top_p_candidates: int = 1024
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0:
            object.__setattr__(self, "greedy", True)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.top_p_candidates < 1:
            raise ValueError(f"top_p_candidates must be >= 1, got {self.top_p_candidates}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p restricts the sampling distribution."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    def candidates(self) -> int:
        """Candidates (global top-k) the filtered sampler keeps."""
        return self.top_k if self.top_k > 0 else self.top_p_candidates


# ----------------------------------------------------------------------------------------------------------
# Counter-based random numbers: 32-bit murmur3 finaliser on int64 tensors, with no int64 overflow.
# ----------------------------------------------------------------------------------------------------------


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x = (x * c) mod 2**32`` in place for ``0 <= x, c < 2**32``: ``c``'s 16-bit halves keep every int64
    product below 2**48 (``x * c_hi`` only matters mod 2**16 once shifted)."""
    hi = x * (c >> 16)
    hi.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(hi).bitwise_and_(_M32)


def _fmix32_(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser in place on 32-bit values held in int64 (``x`` must be a tensor of the caller's)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x85EBCA6B)
    x.bitwise_xor_(x >> 13)
    _mul32_(x, 0xC2B2AE35)
    return x.bitwise_xor_(x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x, c < 2**32``."""
    return _mul32_(x.clone(), c)


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser: a bijective avalanche mix of 32-bit values held in int64.

    The values stay in int64 (torch has no wrapping 32-bit unsigned multiply on every device); the multiplies
    are exact there, so every device and layout computes the same bits."""
    return _fmix32_(x.to(torch.int64) & _M32)


def row_keys(seed: int, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, sample row, response index)."""
    s = fmix32(torch.tensor([seed & _M32], dtype=torch.int64, device=rows.device) ^ fmix32(
        torch.tensor([(seed >> 32) & _M32], dtype=torch.int64, device=rows.device) + 0x632BE5AB))
    return fmix32(_mul32(rows.to(torch.int64), 0x9E3779B1) ^ fmix32(steps.to(torch.int64) ^ s))


_TOKEN_HASHES: dict[tuple[int, int, str], torch.Tensor] = {}


def _token_hashes(start: int, count: int, device: torch.device) -> torch.Tensor:
    """``fmix32(id + 0x27D4EB2F)`` of the token ids ``start .. start + count - 1``: the per-token half of
    :func:`gumbel_noise`, the same at every step, so computed once per vocabulary shard and kept."""
    key = (start, count, str(device))
    if key not in _TOKEN_HASHES:
        if len(_TOKEN_HASHES) > 8:
            _TOKEN_HASHES.clear()
        _TOKEN_HASHES[key] = fmix32(torch.arange(start, start + count, device=device) + 0x27D4EB2F)
    return _TOKEN_HASHES[key]


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor | None = None, *, shard: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """Standard Gumbel noise (float64) for each (row key [N], global token id [N, K] or [K]); or, with
    ``shard=(start, count)``, for the token ids ``start .. start + count - 1`` of a vocabulary shard [N, count]."""
    if shard is not None:
        tokens = _token_hashes(shard[0], shard[1], keys.device)
    else:
        tokens = fmix32(token_ids.to(torch.int64) + 0x27D4EB2F)
    h = _fmix32_(keys.unsqueeze(-1) ^ tokens)
    u = (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)  # in (0, 1)
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------------------------------------------------
# The sampler.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [N] int64, global token ids, identical on every TP rank
    logprobs: torch.Tensor  # [N] float32, log p(token) at temperature 1 over the text vocabulary
    sampling_logprobs: torch.Tensor  # [N] float32, log-prob under the distribution sampled from (0: greedy)


def _first_max(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Column of each row's max; ties go to the smallest token id (as ``argmax`` over the full vocabulary)."""
    best = values.amax(dim=1, keepdim=True)
    tied = torch.where(values == best, ids, torch.full_like(ids, torch.iinfo(torch.int64).max))
    return tied.argmin(dim=1)


@torch.no_grad()
def sample_vocab_parallel(
    logits: torch.Tensor,
    params: SamplingParams,
    keys: torch.Tensor,
    *,
    text_vocab_size: int,
    group: ProcessGroup | None = None,
) -> SampleOutput:
    """Draw one token per row from this rank's vocabulary shard ``logits`` [N, V/TP].

    ``keys`` [N] are :func:`row_keys` (ignored by greedy decoding). ``group`` is the tensor-parallel group
    (default: megatron's, when initialised). Every rank of the group returns the same tokens and log-probs.
    """
    n, local = logits.shape
    shard = vocab_shard(local, group, text_vocab_size)
    start, valid = shard.offset, shard.valid
    x = logits[:, :valid].to(torch.float32)
    dev = logits.device
    inv_t = 1.0 if params.greedy else 1.0 / params.temperature

    # Shard statistics: max, sum exp(x - max), sum exp((x - max) / T).
    if valid:
        m = x.amax(dim=1)
        shifted = x - m[:, None]
        s1 = shifted.exp().sum(dim=1)
        s_t = s1 if inv_t == 1.0 else (shifted * inv_t).exp().sum(dim=1)
    else:
        m = torch.full((n,), -math.inf, device=dev)
        s1 = s_t = torch.zeros(n, device=dev)

    # Shard candidates (logit, global id).
    if params.greedy:
        k = 1
        if valid:
            val, col = x.max(dim=1, keepdim=True)  # first max within the shard
        else:
            val, col = torch.full((n, 1), -math.inf, device=dev), torch.zeros(n, 1, dtype=torch.int64, device=dev)
    elif not params.filtered:
        k = 1
        if valid:
            score = x.to(torch.float64) * inv_t + gumbel_noise(keys, shard=(start, valid))
            col = score.argmax(dim=1, keepdim=True)
            val = x.gather(1, col)
        else:
            val, col = torch.full((n, 1), -math.inf, device=dev), torch.zeros(n, 1, dtype=torch.int64, device=dev)
    else:
        k = min(params.candidates(), local)
        val = torch.full((n, k), -math.inf, device=dev)
        col = torch.zeros(n, k, dtype=torch.int64, device=dev)
        kv = min(k, valid)
        if kv:
            val[:, :kv], col[:, :kv] = x.topk(kv, dim=1)
    gid = col + start

    pack = torch.cat([m[:, None], s1[:, None], s_t[:, None], val, gid.to(torch.float32)], dim=1).to(torch.float64)
    if shard.group is not None:
        parts = [torch.empty_like(pack) for _ in range(dist.get_world_size(shard.group))]
        dist.all_gather(parts, pack.contiguous(), group=shard.group)
        allp = torch.stack(parts, dim=1)  # [N, TP, C]
    else:
        allp = pack[:, None]
    ms, s1s, sts = allp[..., 0], allp[..., 1], allp[..., 2]
    cand_val = allp[..., 3 : 3 + k].reshape(n, -1)
    cand_id = allp[..., 3 + k :].reshape(n, -1).to(torch.int64)

    big_m = ms.amax(dim=1)
    scale = torch.where(torch.isfinite(ms), (ms - big_m[:, None]), torch.full_like(ms, -math.inf))
    lse1 = big_m + torch.log((s1s * scale.exp()).sum(dim=1))

    if params.greedy:
        pick = _first_max(cand_val, cand_id)
        tok_val = cand_val.gather(1, pick[:, None]).squeeze(1)
        sampling_lp = torch.zeros(n, dtype=torch.float64, device=dev)
    elif not params.filtered:
        score = cand_val * inv_t + gumbel_noise(keys, cand_id)
        pick = _first_max(score, cand_id)
        tok_val = cand_val.gather(1, pick[:, None]).squeeze(1)
        lse_t = big_m * inv_t + torch.log((sts * (scale * inv_t).exp()).sum(dim=1))
        sampling_lp = tok_val * inv_t - lse_t
    else:
        # Global top-K of the gathered candidates, ties broken by token id (layout independent).
        by_id = cand_id.argsort(dim=1)
        cand_val, cand_id = cand_val.gather(1, by_id), cand_id.gather(1, by_id)
        order = torch.sort(cand_val, dim=1, descending=True, stable=True).indices[:, : params.candidates()]
        top_val, top_id = cand_val.gather(1, order), cand_id.gather(1, order)
        finite = torch.isfinite(top_val)
        scaled = torch.where(finite, top_val * inv_t, torch.full_like(top_val, -math.inf))
        if params.top_k > 0:
            log_norm = torch.logsumexp(scaled, dim=1)
        else:
            log_norm = big_m * inv_t + torch.log((sts * (scale * inv_t).exp()).sum(dim=1))
        keep = finite
        if params.top_p < 1.0:
            probs = (scaled - log_norm[:, None]).exp()
            keep = keep & ((probs.cumsum(dim=1) - probs) < params.top_p)
        kept = torch.where(keep, scaled, torch.full_like(scaled, -math.inf))
        score = kept + gumbel_noise(keys, top_id)
        pick = _first_max(score, top_id)
        tok_val = top_val.gather(1, pick[:, None]).squeeze(1)
        sampling_lp = kept.gather(1, pick[:, None]).squeeze(1) - torch.logsumexp(kept, dim=1)
        cand_id = top_id
    tokens = cand_id.gather(1, pick[:, None]).squeeze(1)
    return SampleOutput(tokens, (tok_val - lse1).to(torch.float32), sampling_lp.to(torch.float32))
