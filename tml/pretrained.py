"""A trained model, from wherever it was saved: `tml.load(path)` and the self-describing files of `tml export`.

`path` is a run directory (its `best`, else `last`), a checkpoint directory, or a file `tml export` wrote. An
export is two files: the weights, a plain fp32 state dict that `torch.load(weights_only=True)` reads, and beside
it `<name>.json`, which holds the model's shape, the tokenizer and where the weights came from, so a copy on
another machine rebuilds without its run directory. The JSON also holds the weights' sha256: each file is
replaced atomically, but not the pair, so a pair from two different exports is refused rather than mixed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tml.config import Config
from tml.files import file_sha256, write_atomic
from tml.model import ModelConfig, ModelConfigError, Transformer
from tml.train.checkpoint import CheckpointError, find_checkpoint, load_model_weights, read_meta, safe_load
from tml.train.zero_export import save_fp32_state_dict

EXPORT_FORMAT = "tml-export/1"
# torch state-dict files go by these names; a .safetensors name would promise a format that is not written.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")
TOKENIZER = "gpt2"  # the BPE every tml model is trained with (tml/data/tokenizer.py)


def description_path(weights: Path) -> Path:
    """`model.json` beside `model.pt`."""
    return weights.with_suffix(".json")


def check_export_path(output: Path) -> None:
    """Refused before anything is read or written: a directory, or a name that is not a torch state-dict file."""
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; name the file to write, e.g. {output / 'model.pt'}")
    if output.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"--output {output}: tml export writes a torch state dict, so name it "
                         f"{' or '.join(WEIGHT_SUFFIXES)} (e.g. {output.with_suffix('.pt')})")


def export(checkpoint: str | Path, output: str | Path) -> tuple[Path, Path, int]:
    """Write the fp32 weights of a checkpoint (or run directory, or export) to `output` and their description
    beside it; returns (weights file, description file, tensors written)."""
    output = Path(output)
    check_export_path(output)
    state, config, source = _weights_and_source(checkpoint)
    save_fp32_state_dict(state, output)
    description = {
        "format": EXPORT_FORMAT,
        "weights": output.name,
        "weights_sha256": file_sha256(output),
        "model": asdict(config.model),
        "tokenizer": TOKENIZER,
        **source,
        "config": config.to_dict(),
    }
    write_atomic(description_path(output), (json.dumps(description, indent=1) + "\n").encode())
    return output, description_path(output), len(state)


def _weights_and_source(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """The weights, the run's config and where they come from (the checkpoint and its step)."""
    path = Path(path)
    if path.is_file():
        state, model_config, description = _read_export(path)
        source = {key: description[key] for key in ("checkpoint", "step") if key in description}
        config = Config.from_dict(description["config"]) if "config" in description else Config(model=model_config)
        return state, config, source
    directory = find_checkpoint(path)
    step = read_meta(directory).get("step")
    state, config = load_model_weights(directory)
    return state, config, {"checkpoint": str(directory), "step": step}


def _read_export(weights: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """An export's weights, model config and description, checked to belong together."""
    described = description_path(weights)
    if weights.suffix == ".json":
        raise CheckpointError(f"{weights} is an export's description; name its weights file instead")
    if not described.is_file():
        raise CheckpointError(f"{weights} has no {described.name} beside it describing the model (files written by "
                              "`tml export` have one): export the checkpoint again, or build the model yourself with "
                              "tml.model.Transformer(config) and load_state_dict")
    try:
        description = json.loads(described.read_text())
        if description.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format {description.get('format')!r}, expected {EXPORT_FORMAT!r}")
        model_config = ModelConfig(**description["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ModelConfigError) as error:
        raise CheckpointError(f"{described} is not a usable export description: {error}") from error
    if file_sha256(weights) != description.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match {described} (another export's weights, or altered): "
                              "export the checkpoint again")
    return safe_load(weights), model_config, description


def load(path: str | Path, device: str | torch.device | None = None) -> Transformer:
    """The trained model at `path` (run directory, checkpoint directory or exported weights) in eval mode, on
    `device` (default: CUDA when there is one, else the CPU). Generate with `model.generate(..., vocab_limit=50257)`
    so the embedding's padding rows are never sampled."""
    path = Path(path)
    if path.is_file():
        state, model_config, _ = _read_export(path)
    else:
        state, config = load_model_weights(path)
        model_config = config.model
    model = Transformer(model_config)
    model.load_state_dict(state)
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
