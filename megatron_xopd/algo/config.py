"""The ``xopd`` config group: which rollouts, which loss, and the weight lam of the in-modal term."""

from __future__ import annotations

from dataclasses import dataclass

LOSSES = ("sampled_token", "reverse_kl", "jsd", "topk_reverse_kl", "topk_forward_kl", "sft")
DIVERGENCE_FORMS = ("linear", "logits")
RESPONSES = ("on_policy", "teacher_greedy", "transcript", "reference")
IN_MODAL, CROSS_MODAL = 0, 1  # modality of a rollout: prompted with T, or with S


@dataclass
class XOPDConfig:
    """The ``xopd`` config group."""

    lam: float = 0.5  # weight of the in-modal (text-prompted) term; 1 - lam for the cross-modal one
    n_samples: int = 4  # responses sampled per prompt and modality
    # sampled_token (paper) | reverse_kl | jsd | topk_reverse_kl | topk_forward_kl (against the teacher's top-k and
    # a tail bucket) | sft (log-likelihood of the responses)
    loss: str = "sampled_token"
    # linear: every loss but the topk_* ones reads both models' final hidden states through their output-layer
    # shards, chunked over tokens, on the response positions only (no [rows, length, V/TP] logits built or kept);
    # logits: from the models' logits (reverse_kl / jsd keep the teacher's per row)
    divergence_form: str = "linear"
    topk: int = 32  # teacher tokens kept per position by the topk_* losses (the rest is one tail bucket)
    # on_policy: n student samples | teacher_greedy: the teacher's greedy answer to T | transcript: T's text itself
    # (with loss=sft and lam=0: speech recognition, the usual first alignment of a speech adapter) | reference: the
    # cut's reference response (custom "response", else "answer"; with loss=sft: supervised fine-tuning)
    responses: str = "on_policy"
    beta: float = 0.5  # JSD mixture weight of the teacher (TRL convention); 0 = forward KL, 1 = reverse KL
    kl_temperature: float = 1.0  # temperature of the full-vocabulary divergences
    coef: float = 1.0  # scales the whole loss
    normalization: str = "sequence"  # sequence: (1/|y|) sum_t (paper) | token: mean over all tokens
    clip_ratio: float | None = None  # PPO-style clip of r to [1 - eps, 1 + eps]; None in the paper
    minibatches: int = 1  # optimizer steps per rollout batch (at most the rows of the DP rank with the most)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"xopd.lam must lie in [0, 1], got {self.lam}")
        if self.loss not in LOSSES:
            raise ValueError(f"xopd.loss: {self.loss!r} is not one of {LOSSES}")
        if self.responses not in RESPONSES:
            raise ValueError(f"xopd.responses: {self.responses!r} is not one of {RESPONSES}")
        if self.loss == "sft" and self.responses == "on_policy":
            raise ValueError("xopd.loss=sft trains on given responses: set xopd.responses=teacher_greedy, "
                             "transcript or reference")
        if self.responses == "transcript" and self.loss != "sft":
            raise ValueError("xopd.responses=transcript (speech recognition) has no teacher to match: set xopd.loss=sft")
        if self.loss == "sampled_token" and self.responses != "on_policy":
            raise ValueError("xopd.loss=sampled_token is the on-policy X-OPD loss: set xopd.responses=on_policy "
                             "(or use loss=sft / reverse_kl / jsd on the teacher's answers)")
        if self.divergence_form not in DIVERGENCE_FORMS:
            raise ValueError(f"xopd.divergence_form: {self.divergence_form!r} is not one of {DIVERGENCE_FORMS}")
        if self.topk < 1:
            raise ValueError(f"xopd.topk must be >= 1, got {self.topk}")
        if self.normalization not in ("sequence", "token"):
            raise ValueError(f"xopd.normalization: {self.normalization!r} is not 'sequence' or 'token'")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"xopd.beta must lie in [0, 1], got {self.beta}")
        if self.clip_ratio is not None and self.clip_ratio <= 0:
            raise ValueError(f"xopd.clip_ratio must be positive or null, got {self.clip_ratio}")
        if self.n_samples < 1 or self.minibatches < 1:
            raise ValueError("xopd.n_samples and xopd.minibatches must be >= 1")

    @property
    def modality_weights(self) -> dict[int, float]:
        """w_im = lam, w_cm = 1 - lam: each modality's weight in L = lam * L_im + (1 - lam) * L_cm."""
        return {IN_MODAL: self.lam, CROSS_MODAL: 1.0 - self.lam}

    @property
    def modalities(self) -> tuple[int, ...]:
        """The rollout modalities with a non-zero weight (lam = 1 or 0 drops the other term)."""
        return tuple(m for m, w in self.modality_weights.items() if w > 0)
