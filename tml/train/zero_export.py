"""Turn a DeepSpeed ZeRO checkpoint directory into one plain fp32 state dict that `Transformer` loads directly.

ZeRO checkpoints are sharded by rank (optimizer state and, under ZeRO-3, the weights themselves) and hold the
fp32 master weights inside the optimizer shards. DeepSpeed's `zero_to_fp32` reassembles them; this module adds
the two things tml needs around it: the files are checked to be data before DeepSpeed unpickles them, and the
result is named as `Transformer.state_dict()` names it. (`tml export` writes it to a file: tml/pretrained.py.)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

# DeepSpeed reads its own files with torch.load(weights_only=False). Its optimizer shards hold, besides tensors and
# containers, instances of exactly these plain data classes; anything else in a file means it is not a checkpoint
# this code wrote, and it is refused before DeepSpeed unpickles it.
DEEPSPEED_DATA_CLASSES = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 with dynamic loss scaling (tml's fp16 config)
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
# Prefixes that wrappers add to parameter names and `Transformer.load_state_dict` does not expect.
WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.")


class ZeroCheckpointError(ValueError):
    """A path that is not a usable DeepSpeed ZeRO checkpoint; the message names the file."""


def _deepspeed_data_classes() -> list[type]:
    import importlib

    classes = []
    for dotted in DEEPSPEED_DATA_CLASSES:
        module_name, _, name = dotted.rpartition(".")
        classes.append(getattr(importlib.import_module(module_name), name))
    return classes


def checkpoint_tag_dir(checkpoint_dir: str | Path) -> Path:
    """The folder with the rank shards, named by the `latest` file that DeepSpeed writes beside it."""
    checkpoint_dir = Path(checkpoint_dir)
    latest = checkpoint_dir / "latest"
    if not checkpoint_dir.is_dir():
        raise ZeroCheckpointError(f"{checkpoint_dir} is not a directory (a DeepSpeed checkpoint is one)")
    if not latest.is_file():
        hint = ""
        if (checkpoint_dir.parent / "latest").is_file():
            hint = f"; did you mean its parent {checkpoint_dir.parent}?"
        raise ZeroCheckpointError(f"{latest} is missing: {checkpoint_dir} is not a DeepSpeed checkpoint{hint}")
    tag_dir = checkpoint_dir / latest.read_text().strip()
    if not tag_dir.is_dir() or not any(tag_dir.glob("*model_states.pt")):
        raise ZeroCheckpointError(f"{tag_dir} (named in {latest}) holds no *model_states.pt shard")
    return tag_dir


def verify_deepspeed_checkpoint(checkpoint_dir: str | Path) -> None:
    """Load every shard with `weights_only=True` (tensors, containers and DeepSpeed's data classes only).

    Call it before `fabric.load` or the export: DeepSpeed itself unpickles without that restriction, so this is
    what keeps a checkpoint data, not code. Raises ZeroCheckpointError naming the file that fails.
    """
    tag_dir = checkpoint_tag_dir(checkpoint_dir)
    # `set` is a plain container that torch allows by default only from 2.6 on; DeepSpeed's shards hold one.
    with torch.serialization.safe_globals([*_deepspeed_data_classes(), set]):
        for shard in sorted(tag_dir.glob("*.pt")):
            try:
                torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # truncated zip, a refused global, ...
                raise ZeroCheckpointError(f"cannot load {shard} safely: {error}") from error


def _strip_wrapper_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def fp32_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the ZeRO checkpoint in `checkpoint_dir`, named as `Transformer.state_dict()` names them.

    Runs in one process on any machine (no GPU, no process group).
    """
    # DeepSpeed prints its progress (and, at import, its accelerator notice) on stdout, where `tml generate` and
    # `tml eval` put only their result: to stderr with it. Its logger's handler takes the stream it sees at import.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_deepspeed_checkpoint(checkpoint_dir)
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    return {_strip_wrapper_prefixes(name): tensor.detach().float().contiguous() for name, tensor in state.items()}
