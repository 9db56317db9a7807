"""The frozen text teacher: a megatron-core GPT on the student's ranks and vocab partition."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from .config import GPTModelConfig
from .gpt import build_gpt_model
from .speech import check_vocab_partition


def build_teacher(teacher_cfg: GPTModelConfig, student_cfg: GPTModelConfig, *, sequence_parallel: bool = False) -> GPTModel:
    """Build this rank's teacher shard: same TP/PP layout as the student, eval mode, no gradients.

    Fails with a clear error when the two vocabularies would be sharded differently.
    """
    check_vocab_partition(student_cfg, teacher_cfg, parallel_state.get_tensor_model_parallel_world_size())
    teacher = build_gpt_model(teacher_cfg, sequence_parallel=sequence_parallel)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
