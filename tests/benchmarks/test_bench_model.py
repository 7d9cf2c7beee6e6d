"""benchmarks/bench_model.py measures the shape a config names (with --model overrides), not only the reference."""

import importlib.util
import json
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tml.config import load_yaml_config
from tml.model.kv_cache import kv_cache_bytes_per_token

SCRIPT = REPO_ROOT / "benchmarks" / "bench_model.py"
TINY_YAML = REPO_ROOT / "configs" / "tiny.yaml"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(monkeypatch, capsys, *argv: str) -> dict:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    load_script().main()
    return json.loads(capsys.readouterr().out)


def test_config_and_model_overrides_set_the_measured_shape(monkeypatch, capsys):
    overrides = ["--model.n_layer", "1", "--model.block_size", "16", "--model.kv_lora_rank", "32"]
    report = run(monkeypatch, capsys, "--config", str(TINY_YAML), *overrides, "--decode-steps", "1", "--threads", "1")
    model = load_yaml_config(TINY_YAML, overrides).model
    assert report["shape"]["source"] == str(TINY_YAML) and report["shape"]["n_layer"] == 1
    assert report["kv_cache"]["mla"]["bytes_per_token_bf16"] == kv_cache_bytes_per_token(model, torch.bfloat16)
    assert report["kv_cache"]["mha"]["numbers_per_token_per_layer"] == 2 * model.n_embd
    assert list(report["decode_tokens_per_s"]["mla_absorbed"]) == ["15"]  # block_size - 1 cached, one decoded
    assert report["decode_tokens_per_s"]["max_abs_logit_diff_absorbed_vs_naive"] < 1e-4
    assert "bench_train.py" in report["train_step"]  # a config's training speed is bench_train.py's job
    assert "goals" not in report  # set for the reference shape, not for one of the user's own


def test_reference_shape_keeps_its_three_contexts():
    script = load_script()
    assert script.contexts_for(script.reference_shape()) == list(script.CONTEXTS)


def test_model_overrides_without_a_config_are_refused_in_one_line():
    with pytest.raises(SystemExit, match="--model.n_layer needs --config FILE"):
        load_script().model_shape(None, ["--model.n_layer", "2"])


def test_gqa_gets_the_most_key_value_heads_that_fit_in_mlas_cache():
    script = load_script()
    reference = script.reference_shape()  # MLA: 256 + 32 = 288 numbers; a 64-dim head's K and V are 128
    gqa = script.equal_cache_gqa(reference)
    assert (gqa.attention, gqa.n_kv_head) == ("mha", 2)  # 256 fits, 3 heads' 384 would not
    sizes = script.cache_sizes(reference)
    assert sizes["gqa"]["numbers_per_token_per_layer"] == 256 <= sizes["mla"]["numbers_per_token_per_layer"]
    assert list(script.attention_variants(reference)) == ["mla", "gqa", "mha"]
    narrow = load_yaml_config(TINY_YAML, ["--model.kv_lora_rank", "16"]).model  # 32 numbers: less than one head
    assert script.equal_cache_gqa(narrow) is None and "gqa" not in script.cache_sizes(narrow)
