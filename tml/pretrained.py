"""A trained model, from wherever it was saved: `tml.load(path)` and the self-describing files of `tml export`.

`path` is a run directory (its `best`, else `last`), a checkpoint directory, or a file `tml export` wrote. An
export is two files: the weights, a plain fp32 state dict that `torch.load(weights_only=True)` reads, and beside
it `<name>.json`, which holds the model's shape, the tokenizer and where the weights came from, so a copy on
another machine rebuilds without its run directory. The JSON also holds the weights' sha256: each file is
replaced atomically, but not the pair, so a pair from two different exports is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from tml.config import Config
from tml.data.tokenizer import TOKENIZER_NAME
from tml.files import file_sha256, make_directory, replaced_on_success, write_failure, write_synced
from tml.model import ModelConfig, ModelConfigError, Transformer
from tml.model.config import YARN_FIELDS
from tml.train.checkpoint import (
    WEIGHT_FILES,
    CheckpointError,
    find_checkpoint,
    load_model_weights,
    read_weights,
    safe_load,
    verify_checkpoint,
)

EXPORT_FORMAT = "tml-export/3"
# The model fields each earlier export format lacks, and the value every model of its time had: GPT-2's block before
# format 2, no YaRN scaling before format 3.
NO_YARN = {field: getattr(ModelConfig(), field) for field in YARN_FIELDS}
FIELDS_ADDED_SINCE_FORMAT = {"tml-export/1": {"norm_type": "layernorm", "mlp": "gelu", **NO_YARN},
                             "tml-export/2": NO_YARN}
# Model fields a run started from other weights (train.init_from) may set anew: none of them shapes a parameter
# (YaRN's, to extend the context the weights were trained at).
SHAPELESS_MODEL_FIELDS = ("dropout", "block_size", "rope_theta", *YARN_FIELDS)
# torch state-dict files go by these names; a .safetensors name would promise a format that is not written.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")


class ExportWriteError(OSError):
    """An export file that could not be written; the message names it, the reason and the free space."""


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
    described = description_path(output)
    if described.exists() and not _is_export_description(described):  # e.g. --output runs/x/summary.pt
        raise ValueError(f"--output {output}: {described} exists and is not an export's description, which would "
                         "replace it; choose another name")


def _is_export_description(path: Path) -> bool:
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(description, dict) and str(description.get("format", "")).startswith("tml-export/")


def export(checkpoint: str | Path, output: str | Path) -> tuple[Path, Path, int]:
    """Write the fp32 weights of a checkpoint (or run directory, or export) to `output` and their description
    beside it; returns (weights file, description file, tensors written).

    Both are written in full to temporary files before either is renamed into place, so a write that fails (a full
    disk, a read-only description) leaves the previous pair as it was. Raises ExportWriteError naming the file that
    could not be written.
    """
    output = Path(output)
    check_export_path(output)
    state, config, source = _weights_and_source(checkpoint)
    state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: a full disk is then Python's ENOSPC, not torch's zip-writer text
    weights = buffer.getvalue()
    description = {
        "format": EXPORT_FORMAT,
        "weights": output.name,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_bytes": len(weights),  # what a launcher's pre-check compares, without hashing the file
        "model": asdict(config.model),
        "tokenizer": TOKENIZER_NAME,  # a record: every tml model uses it, so loading does not check it
        **source,
        "config": {section: values for section, values in config.to_dict().items() if section != "model"},
    }
    described = description_path(output)
    make_directory(output.parent)
    with replaced_on_success(output, _hidden_temporary(output)) as weights_file, \
            replaced_on_success(described, _hidden_temporary(described)) as description_file:
        _write(weights_file, weights, output)
        _write(description_file, (json.dumps(description, indent=1) + "\n").encode(), described)
    return output, described, len(state)


def _hidden_temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write(temporary: Path, data: bytes, target: Path) -> None:
    try:
        write_synced(temporary, data)
    except OSError as error:
        raise ExportWriteError(f"cannot write {target}: {write_failure(error, target.parent)}") from error


def _weights_and_source(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """The weights, the config they were trained with and where they come from (the checkpoint and its step)."""
    path = Path(path)
    if path.is_file():
        state, model_config, description = _read_export(path)
        source = {key: description[key] for key in ("checkpoint", "step") if key in description}
        recorded = description.get("config")
        config = Config.from_dict({**(recorded if isinstance(recorded, dict) else {}), "model": asdict(model_config)})
        return state, config, source
    weights = read_weights(path)
    return weights.state, weights.config, {"checkpoint": str(weights.directory), "step": weights.step}


def _described_model(description: Any) -> ModelConfig:
    """The description's model section as a ModelConfig: every field present (one of an earlier format may lack
    the FIELDS_ADDED_SINCE_FORMAT of its format), of its type, valid."""
    if not isinstance(description, dict):
        raise ValueError(f"it holds a {type(description).__name__}, not an object")
    if description.get("format") not in (EXPORT_FORMAT, *FIELDS_ADDED_SINCE_FORMAT):
        raise ValueError(f"format {description.get('format')!r}, expected {EXPORT_FORMAT!r}")
    section = description.get("model")
    if not isinstance(section, dict):
        raise ValueError("it has no 'model' section")
    section = FIELDS_ADDED_SINCE_FORMAT.get(description["format"], {}) | section
    expected = [field.name for field in fields(ModelConfig)]
    missing = [name for name in expected if name not in section]
    unknown = [name for name in section if name not in expected]
    if missing or unknown:
        raise ValueError("; ".join(filter(None, [missing and f"model.{', model.'.join(missing)} missing",
                                                  unknown and f"unknown model.{', model.'.join(unknown)}"])))
    defaults = ModelConfig()
    for name, value in section.items():
        wanted = type(getattr(defaults, name))
        if type(value) is not wanted and not (wanted is float and type(value) is int):
            raise ValueError(f"model.{name} is {value!r}, not a {wanted.__name__}")
    return ModelConfig(**section)


def _read_export(weights: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """An export's weights, model config and description, checked to belong together."""
    model_config, description = _read_description(weights)
    if file_sha256(weights) != description.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match {description_path(weights)} (another export's weights, or "
                              "altered): export the checkpoint again")
    return safe_load(weights), model_config, description


def _read_description(weights: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and description beside an export's weights (the weights themselves are not read)."""
    described = description_path(weights)
    if weights.suffix == ".json":
        raise CheckpointError(f"{weights} is an export's description; name its weights file instead")
    if not described.is_file():
        raise CheckpointError(f"{weights} has no {described.name} beside it describing the model (files written by "
                              "`tml export` have one): export the checkpoint again, or build the model yourself with "
                              "tml.model.Transformer(config) and load_state_dict")
    try:
        description = json.loads(described.read_text())
        model_config = _described_model(description)
    except (OSError, ValueError, ModelConfigError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{described} is not a usable export description: {error}") from error
    return model_config, description


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU: where a loaded model and the inputs made for it both go."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


LOAD_DTYPES = ("float32", "bfloat16", "float16")  # what `load` (and tml generate/eval --dtype) casts weights to


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None) -> Transformer:
    """The trained model at `path` (run directory, checkpoint directory or exported weights) in eval mode, on
    `device` (default: CUDA when there is one, else the CPU), in `dtype` (a torch dtype or its name; default: fp32,
    as saved; the KV cache takes the weights' dtype). Generate with `model.generate(..., vocab_limit=50257)` so the
    embedding's padding rows are never sampled."""
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in LOAD_DTYPES:
            raise ValueError(f"dtype {name!r}: choose one of {', '.join(LOAD_DTYPES)}")
        dtype = getattr(torch, name)
    path = Path(path)
    if path.is_file():
        state, model_config, _ = _read_export(path)
    else:
        state, config = load_model_weights(path)
        model_config = config.model
    model = Transformer(model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # an edited description, or weights of another model under a checkpoint's name
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise CheckpointError(f"{path}: the weights do not fit the model its description or config names ({first})"
                              ) from error
    device = device if device is not None else default_device()
    return model.to(device=device, dtype=dtype).eval()


def check_start_from(path: str | Path, model: ModelConfig) -> None:
    """train.init_from's checks without reading a tensor (what launchers ask before data or a queued job): the
    weights' model has the run's shape. Every other field than SHAPELESS_MODEL_FIELDS is named in one
    CheckpointError."""
    path = _existing_init_from(path)
    if path.is_file():
        source_model, description = _read_description(path)
        expected = description.get("weights_bytes")  # exports before it was recorded: the start's hash check only
        if expected is not None and (size := path.stat().st_size) != expected:
            raise CheckpointError(f"{path} is truncated or altered: {size} bytes, expected {expected} "
                                  f"({description_path(path).name}): export the checkpoint again")
    else:
        try:  # the files the start reads, each at its manifest size (a stat each; the start hashes them)
            meta = verify_checkpoint(find_checkpoint(path), only=WEIGHT_FILES, hash_files=False)
        except CheckpointError:  # a training still running there replaced the checkpoint `last` named: once more
            meta = verify_checkpoint(find_checkpoint(path), only=WEIGHT_FILES, hash_files=False)
        source_model = Config.from_dict(meta["config"]).model
    _check_same_shape(path, source_model, model)


def _existing_init_from(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"train.init_from={path}: no such run directory, checkpoint or exported file")
    return path


def _check_same_shape(path: Path, source: ModelConfig, model: ModelConfig) -> None:
    unread = model.unread_fields  # when both are of one kind; else model.attention differs
    differing = [f"model.{field.name} {getattr(source, field.name)!r} there, {getattr(model, field.name)!r} here"
                 for field in fields(ModelConfig) if field.name not in (*SHAPELESS_MODEL_FIELDS, *unread)
                 and getattr(source, field.name) != getattr(model, field.name)]
    if differing:
        raise CheckpointError(f"train.init_from={path}: its model has another shape ({'; '.join(differing)}); "
                              "a run starts from weights of its own shape")


def weights_to_start_from(path: str | Path, model: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """train.init_from: the weights at `path` for a new run of the shape `model` (refused as check_start_from
    does), and where they come from, for the log."""
    path = _existing_init_from(path)
    state, config, source = _weights_and_source(path)
    _check_same_shape(path, config.model, model)
    step = f", step {source['step']}" if source.get("step") is not None else ""
    origin = f"{path} (exported from {source['checkpoint']}{step})" if path.is_file() else (
        f"{source['checkpoint']} ({step.removeprefix(', ')})" if step else str(source["checkpoint"]))
    if model.block_size > config.model.block_size:
        origin += (f"; trained on windows of {config.model.block_size} tokens, this run's {model.block_size}: positions "
                   "past that are new to the weights")
    return state, origin
