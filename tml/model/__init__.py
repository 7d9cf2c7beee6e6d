"""The model: MLA/MHA decoder-only transformer and its config."""

from tml.model.config import ModelConfig, ModelConfigError
from tml.model.transformer import Transformer

__all__ = ["ModelConfig", "ModelConfigError", "Transformer"]
