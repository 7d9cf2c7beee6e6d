"""The model: MLA/MHA decoder-only transformer and its config."""

from tml.model.config import ModelConfig, ModelConfigError

__all__ = ["ModelConfig", "ModelConfigError", "Transformer"]


def __getattr__(name: str):
    # Imported on first use: the transformer pulls in torch (about a second), which the config parser, the data
    # tools and the SLURM launcher's --dry-run never need.
    if name == "Transformer":
        from tml.model.transformer import Transformer

        return Transformer
    raise AttributeError(f"module 'tml.model' has no attribute {name!r}")
