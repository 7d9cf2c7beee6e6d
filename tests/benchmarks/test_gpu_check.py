"""benchmarks/gpu_check.py runs its whole path on CPU with a debug-size model, so the GPU check works first time."""

import importlib.util
import json
import math
import os
import shutil

import pytest

from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import write_synthetic_shards

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
DEBUG_MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def debug_overrides(vocab_size: int) -> list[str]:
    model = debug_model_config(vocab_size=vocab_size)
    return [f"--model.{key}={getattr(model, key)}" for key in ("vocab_size", *DEBUG_MODEL_KEYS)] + [
        "--train.batch_size=2", "--train.grad_accum=2", "--train.accelerator=cpu"]


def test_gpu_check_refuses_to_run_without_cuda_unless_allowed(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        load_script().main(["--shards", str(tmp_path), "--work", str(tmp_path)])


@pytest.fixture
def restored_environment():
    """The zero2 variant runs DeepSpeed in this process, which sets MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... in
    os.environ: left there, every later test's subprocess would inherit them (a taken port; a launcher that
    believes its ranks are started by someone else)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_gpu_check_trains_the_reference_config_decodes_and_writes_json_on_cpu(tmp_path, restored_environment):
    shards = write_synthetic_shards(tmp_path / "shards")
    json_path = tmp_path / "result.json"
    report = load_script().main(["--shards", str(shards), "--steps", "12", "--work", str(tmp_path / "work"),
                                 "--json", str(json_path), "--variants", "mha,gqa,bf16,zero2,muon", "--variant-steps", "2",
                                 "--allow-cpu", *debug_overrides(vocab_size=256)])
    assert json.loads(json_path.read_text()) == report
    run = report["run"]
    assert run["precision"] == "bf16-mixed"  # the reference's 16-mixed, as CPU runs it
    assert run["compile"] is False  # eager, though reference.yaml compiles: the `compiled` variant is the change
    assert run["steps"] == 12 and run["tokens_per_step"] == 2 * 2 * 32
    # No upper bound: on a CPU without native bf16 the bf16 peak probed at start-up (a 1024-wide matmul) is below what
    # this debug model's small matmuls reach, so its MFU exceeds 1 there (1.6 on an AMD EPYC without AVX512)
    assert run["tokens_per_s_median"] > 0 and run["mfu_median"] > 0
    assert run["peak_memory_gib"] is None  # CUDA only
    assert math.isfinite(run["train_loss_first"]) and math.isfinite(run["train_loss_last"])
    assert run["val_perplexity"] == pytest.approx(math.exp(run["val_loss"]))
    decode = report["decode"]
    assert decode["new_tokens"] == 32 - 16
    assert decode["absorbed_tokens_per_s"] > 0 and decode["naive_tokens_per_s"] > 0
    assert decode["greedy_tokens_agree"] > 0.9  # same model, two exact attention forms (fp32 on CPU)
    first = decode["greedy_first_difference"]
    assert (first is None) == (decode["greedy_tokens_agree"] == 1.0) and (first is None or 0 <= first < 16)
    assert report["mha_run"]["attention"] == "MHA" and report["mha_run"]["steps"] == 2
    assert report["gqa_run"]["attention"] == "GQA"
    assert report["bf16_run"]["precision"] == "bf16-mixed" and report["bf16_run"]["attention"] == "MLA"
    assert report["zero2_run"]["strategy"] == "zero2" and report["zero2_run"]["steps"] == 2  # DeepSpeed in-process
    assert report["run"]["strategy"] == "auto" and report["run"]["optimizer"] == "adamw"
    assert report["muon_run"]["optimizer"] == "muon" and report["muon_run"]["steps"] == 2
    assert "compiled_run" not in report  # only the variants asked for


def test_an_unknown_variant_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown --variants fp8"):
        load_script().main(["--shards", str(tmp_path), "--variants", "mha,fp8", "--allow-cpu"])


@pytest.mark.shared
def test_gpu_check_prepares_shards_from_a_folder_of_books(tmp_path, shared_gutenberg):
    books = tmp_path / "books"
    books.mkdir()
    for name in ("pg11.txt", "pg16.txt"):  # two short books: Alice in Wonderland, Peter Pan
        shutil.copy(shared_gutenberg / name, books / name)
    argv = ["--books", str(books), "--steps", "2", "--work", str(tmp_path / "work"), "--allow-cpu",
            *debug_overrides(vocab_size=50304)]
    report = load_script().main(argv)
    assert (tmp_path / "work" / "shards").is_dir()
    assert report["run"]["steps"] == 2 and math.isfinite(report["run"]["val_loss"])
    rerun = load_script().main(argv)  # the same --work again: shards reused, the run starts afresh
    assert rerun["run"]["steps"] == 2 and "error" not in rerun["decode"]


def test_a_failing_stage_is_reported_in_the_json_and_the_figures_before_it_are_kept(tmp_path, monkeypatch):
    script = load_script()

    def decode_failing(run_dir, device):  # fault injection: the stage after training breaks
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(script, "decode_speed", decode_failing)
    shards = write_synthetic_shards(tmp_path / "shards")
    json_path = tmp_path / "result.json"
    with pytest.raises(SystemExit, match="a stage failed"):
        script.main(["--shards", str(shards), "--steps", "2", "--work", str(tmp_path / "work"), "--json",
                     str(json_path), "--allow-cpu", *debug_overrides(vocab_size=256)])
    report = json.loads(json_path.read_text())
    assert report["run"]["steps"] == 2
    assert report["decode"]["error"] == "RuntimeError: no kernel image is available for execution on the device"
    assert "decode_failing" in report["decode"]["traceback"]


def test_a_data_problem_comes_back_as_json_naming_it(tmp_path):
    """The likeliest failure on an offline GPU machine is the data: it is a stage of the report too."""
    json_path = tmp_path / "result.json"
    with pytest.raises(SystemExit, match="the data could not be prepared"):
        load_script().main(["--books", str(tmp_path / "no-books"), "--work", str(tmp_path / "work"), "--json",
                            str(json_path), "--allow-cpu", *debug_overrides(vocab_size=50304)])
    report = json.loads(json_path.read_text())
    assert "no-books" in report["data"]["error"] and "run" not in report
