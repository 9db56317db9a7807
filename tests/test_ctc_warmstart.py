"""The CTC warm start of a speech adapter: it learns to point frames at the LLM's token embeddings."""

import pytest
import torch

from megatron_xopd.models.speech import FeaturePerception, PerceptionConfig
from megatron_xopd.prep.ctc_warmstart import CTCWarmStartConfig, ctc_warmstart, greedy_ctc_decode

IDENTITY = {"modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector"}}


def _spoken(num: int, seed: int) -> list[tuple[torch.Tensor, list[int]]]:
    """'Speech' whose frames are a noisy code of each token (2-3 frames a token, silence between some)."""
    codes = torch.randn(100, 12, generator=torch.Generator().manual_seed(0))  # one "pronunciation" per token
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(num):
        ids = torch.randint(20, 28, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        frames = []
        for t in ids:
            frames += [codes[t]] * int(torch.randint(2, 4, (1,), generator=g)) + [torch.zeros(12)]
        x = torch.stack(frames)
        examples.append((x + 0.1 * torch.randn(x.shape, generator=g), ids))
    return examples


def test_frames_decode_to_the_transcript_and_match_the_token_scale():
    torch.manual_seed(0)
    embeddings = torch.randn(100, 16) * 0.05
    perception = FeaturePerception(PerceptionConfig(source="features", feature_dim=12, nemo=IDENTITY), 16)
    train, held_out = _spoken(64, seed=1), _spoken(16, seed=2)
    result = ctc_warmstart(perception, embeddings, train, CTCWarmStartConfig(steps=150, batch_size=16, lr=1e-2),
                           progress=False)
    assert result["exact_transcripts"] >= 0.9 and result["loss"] < 0.5
    vocab = sorted({t for _, ids in train for t in ids})
    table = torch.nn.functional.normalize(embeddings[vocab], dim=-1)
    with torch.no_grad():
        for x, ids in held_out:
            frames, _ = perception(x.unsqueeze(0), torch.tensor([x.shape[0]]))
            # each token's frames point at that token's embedding, more than at any other token's
            hits = (torch.nn.functional.normalize(frames[0], dim=-1) @ table.T).argmax(-1)
            assert set(vocab[h] for h in hits.tolist()) >= set(ids)
        frames, _ = perception(held_out[0][0].unsqueeze(0), torch.tensor([held_out[0][0].shape[0]]))
    mean_norm = embeddings[vocab].norm(dim=-1).mean()
    assert frames.norm(dim=-1).mean() == pytest.approx(float(mean_norm), rel=0.5)  # the LLM's scale, not 10x off


def test_greedy_decode_merges_repeats_and_drops_blanks():
    logits = torch.full((7, 3), -1.0)
    for frame, c in enumerate([1, 1, 0, 1, 2, 2, 0]):
        logits[frame, c] = 1.0
    assert greedy_ctc_decode(logits, 7, [50, 60]) == [50, 50, 60]
    assert greedy_ctc_decode(logits, 2, [50, 60]) == [50]


def test_more_tokens_than_frames_is_a_clear_error():
    perception = FeaturePerception(PerceptionConfig(source="features", feature_dim=12, nemo=IDENTITY), 16)
    with pytest.raises(ValueError, match="more transcript tokens than frames"):
        ctc_warmstart(perception, torch.randn(100, 16), [(torch.randn(2, 12), [20, 21, 22])], CTCWarmStartConfig(),
                      progress=False)
