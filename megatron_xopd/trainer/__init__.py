"""The X-OPD trainer: configs, the training loop, checkpoints, metrics and evaluation."""

from .config import RunConfig, register_schema, to_run_config

__all__ = ["RunConfig", "XOPDTrainer", "register_schema", "to_run_config"]


def __getattr__(name: str):
    # The loop pulls in the models and the rollout engine; config-only users (tools, tests) don't pay for it.
    if name == "XOPDTrainer":
        from .loop import XOPDTrainer

        return XOPDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
