"""`tml generate|eval|export` on a tiny trained run, and `tml train` stopped with Ctrl-C in a real subprocess."""

import errno
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from rich.progress import Progress

import tml
from tests.conftest import REPO_ROOT, debug_model_config
from tests.train.conftest import tiny_run_config
from tml.cli import CTRL_C_EXIT_STATUS, main, prompt_tokens_kept
from tml.config import Config, dump_yaml
from tml.data.tokenizer import get_tokenizer
from tml.model import Transformer
from tml.model.config import GPT2_PADDED_VOCAB
from tml.model.diagnostics import attention_statistics
from tml.text_eval import EVAL_BATCH_TOKENS, text_loss, window_starts
from tml.train import checkpoint
from tml.train.checkpoint import checkpoints_dir, load_model_weights, read_meta
from tml.train.loop import train
from tml.train.parent_death import RANK0_PID_VARIABLE

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards):
    """A 2-step run of a debug model with GPT-2's vocabulary, so the CLI's tokenizer fits it."""
    out_dir = tmp_path_factory.mktemp("cli_run")
    config = tiny_run_config(tiny_shards, out_dir, max_steps=2, val_interval=2, ckpt_interval=2)
    config.model = debug_model_config(vocab_size=GPT2_PADDED_VOCAB)
    train(config)
    return out_dir


def test_generate_continues_the_prompt(trained_run, capsys):
    code = main(["generate", "--checkpoint", str(trained_run), "--prompt", "Once upon a time",
                 "--max-new-tokens", "5", "--top-k", "20", "--top-p", "0.9"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(get_tokenizer().encode(out)) >= 5 + 4


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
def test_generate_says_what_its_kv_cache_holds_in_the_dtype_chosen(trained_run, capsys, dtype, itemsize):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "Once upon a time", "--max-new-tokens",
                 "5", "--num-samples", "2", "--dtype", dtype]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("Once upon a time") == 2
    config = load_model_weights(trained_run)[1].model
    per_token = config.n_layer * (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize  # MLA: latent + rope key
    positions = len(get_tokenizer().encode("Once upon a time")) + 5
    assert (f"KV cache {config.kv_lora_rank + config.qk_rope_head_dim} numbers/token/layer in {dtype}: "
            f"{per_token:,} B/token, {per_token * positions * 2 / 1024:,.1f} KiB for {positions} positions x 2 "
            "samples") in captured.err


def test_a_prompt_longer_than_the_block_keeps_its_last_tokens_and_says_how_many_were_dropped(trained_run, capsys):
    prompt = get_tokenizer().encode(TEXT)
    block = debug_model_config().block_size
    code = main(["generate", "--checkpoint", str(trained_run), "--prompt", TEXT, "--max-new-tokens", "5",
                 "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0
    kept = block - 5  # the new tokens' 5 positions, the prompt the rest
    assert (
        f"tml generate: dropped the first {len(prompt) - kept} tokens of the prompt's {len(prompt)}, keeping its "
        f"last {kept} so that 5 new fit in the model's block_size {block}") in captured.err.splitlines()
    assert captured.out.startswith(get_tokenizer().decode(prompt[-kept:]))
    assert not captured.out.startswith(get_tokenizer().decode(prompt[-kept - 1:]))


@pytest.mark.parametrize(("prompt", "max_new", "kept"), [
    (10, 100, 10),  # fits with room: untouched (fewer new tokens are generated instead)
    (50, 5, 27),  # too long: the 5 new tokens get their room, the prompt the rest of the 32
    (50, 100, 16),  # both want more than the block: new tokens are guaranteed half of it
    (20, 20, 16),
    (50, 0, 31),  # at most block_size - 1 prompt tokens
])
def test_prompt_keeps_the_rest_of_the_block_after_min_of_new_tokens_and_half_the_block(prompt, max_new, kept):
    assert prompt_tokens_kept(prompt, max_new, block_size=32) == kept


def test_generate_with_defaults_fills_the_block_and_says_it_stopped_short(trained_run, capsys):
    code = main(["generate", "--checkpoint", str(trained_run), "--prompt", "Hi"])  # --max-new-tokens 100 > block
    captured = capsys.readouterr()
    block = debug_model_config().block_size
    assert code == 0
    assert (f"tml generate: generating {block - 1} tokens, not 100: a prompt of 1 token leaves {block - 1} of the "
            f"model's block_size {block}") in captured.err.splitlines()
    assert len(get_tokenizer().encode(captured.out.removesuffix("\n"), allowed_special="all")) >= block - 1


def test_generate_context_lets_prompt_and_new_tokens_fill_more_or_fewer_positions_than_the_block(trained_run, capsys):
    block = debug_model_config().block_size
    argv = ["generate", "--checkpoint", str(trained_run), "--prompt", "Hi", "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", str(2 * block), "--context", str(3 * block)]) == 0
    captured = capsys.readouterr()  # all 2 x block new tokens: the latent cache holds 3 x block positions
    assert (f"tml generate: --context {3 * block} is longer than the {block} tokens the model was trained on: "
            "positions past that are new to it") in captured.err.splitlines()
    assert len(get_tokenizer().encode(captured.out.removesuffix("\n"), allowed_special="all")) > block  # past it
    assert main([*argv, "--max-new-tokens", "10", "--context", "5"]) == 0
    assert ("tml generate: generating 4 tokens, not 10: a prompt of 1 token leaves 4 of --context 5"
            in capsys.readouterr().err.splitlines())
    assert main([*argv, "--context", "1"]) == 1
    assert "--context 1: a window needs at least 2 tokens" in capsys.readouterr().err


def test_a_run_directory_says_which_of_its_checkpoints_is_used(trained_run, capsys):
    best = (checkpoints_dir(trained_run) / "best").resolve()
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert f"tml generate: using {best} (the run's best;" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(best), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert "using" not in capsys.readouterr().err  # a checkpoint named by the user needs no notice


def test_a_diverged_run_says_its_checkpoint_is_from_before_the_divergence_or_that_none_is_left(trained_run, tmp_path,
                                                                                              capsys):
    run = tmp_path / "diverged"
    shutil.copytree(trained_run, run, symlinks=True)
    (run / "summary.json").write_text('{"diverged": true}')
    assert main(["eval", "--checkpoint", str(run), "--data", __file__]) == 0
    assert "(the run's best from before the run diverged;" in capsys.readouterr().err
    root = checkpoints_dir(run)
    for link in ("best", "last"):
        (root / link).unlink()
    step = next(root.glob("step-*"))
    step.rename(root / f"diverged-{step.name}")
    assert main(["eval", "--checkpoint", str(run), "--data", __file__]) == 1
    assert (f"{run} diverged before it saved a checkpoint worth using; the one set aside then is "
            f"{root / f'diverged-{step.name}'}: name it to use it anyway") in capsys.readouterr().err


def test_generate_top_k_0_means_off(trained_run, capsys):
    """0 samples exactly as a k as large as the vocabulary, which filters nothing."""
    outputs = []
    for k in ("0", str(GPT2_PADDED_VOCAB)):
        assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "Once", "--max-new-tokens", "8",
                     "--temperature", "1.5", "--top-k", k]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(("flag", "value", "hint"), [("--top-k", "-1", "or 0 for off"), ("--top-p", "0", "1 is off"),
                                                     ("--temperature", "-1", "0 = greedy")])
def test_generate_refuses_bad_sampling_flags_in_the_cli_s_own_terms(trained_run, capsys, flag, value, hint):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "Hi", flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tml generate: {flag} ") and hint in err and "None" not in err and err.count("\n") == 1


def test_several_samples_are_numbered_differ_and_repeat_with_the_seed(trained_run, capsys):
    argv = ["generate", "--checkpoint", str(trained_run), "--prompt", "Once", "--max-new-tokens", "8",
            "--temperature", "1.5", "--num-samples", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    samples = re.split(r"--- sample \d of 3 ---\n", first)[1:]
    assert len(samples) == 3 and len(set(samples)) == 3 and all(sample.startswith("Once") for sample in samples)
    assert main(argv) == 0 and capsys.readouterr().out == first
    assert main([*argv[:-1], "0"]) == 1
    assert capsys.readouterr().err == "tml generate: --num-samples 0 must be >= 1\n"


def test_generate_refuses_a_seed_torch_cannot_take_and_a_temperature_that_is_not_a_number(trained_run, capsys):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "Hi", "--seed", str(2**64)]) == 1
    assert capsys.readouterr().err == (f"tml generate: --seed {2**64} must be in [-2**63, 2**64), the range torch's "
                                       "generator takes\n")
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "Hi", "--temperature", "nan"]) == 1
    assert capsys.readouterr().err == "tml generate: --temperature nan must be a number >= 0 (0 = greedy)\n"


def test_an_empty_prompt_generates_from_a_document_boundary_without_printing_it(trained_run, capsys):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "empty prompt: generating from <|endoftext|>" in captured.err
    printed = get_tokenizer().encode(captured.out.removesuffix("\n"), allowed_special="all")
    assert len(printed) == 4  # the 4 new tokens only: not the <|endoftext|> the user never typed


def test_generate_never_samples_the_embeddings_padding_rows(trained_run, capsys, monkeypatch):
    """GPT-2 has 50,257 tokens; the model's rows up to 50,304 are padding, whose ids cannot be decoded. (That
    generate keeps to the limit is tests/model/test_transformer.py's; here, that the CLI sets it.)"""
    limits = []
    real_generate = Transformer.generate

    def recording_generate(self, *args, **kwargs):
        limits.append(kwargs.get("vocab_limit"))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "generate", recording_generate)
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "The", "--max-new-tokens", "30",
                 "--temperature", "1000"]) == 0
    assert limits == [get_tokenizer().n_vocab] == [50257]
    capsys.readouterr()


def test_eval_leaves_out_a_gutenberg_files_header_and_footer_as_prepare_does(trained_run, tmp_path, capsys):
    body = tmp_path / "body.txt"
    body.write_text(TEXT.strip())  # the book's own text, as the stripper returns it
    book = tmp_path / "pg1.txt"
    book.write_text("The Project Gutenberg eBook of A Tale\n\n*** START OF THE PROJECT GUTENBERG EBOOK A TALE ***\n"
                    + TEXT + "\n*** END OF THE PROJECT GUTENBERG EBOOK A TALE ***\nLicence text. " * 40)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(body)]) == 0
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(book)]) == 0
    captured = capsys.readouterr()
    plain, stripped = (line.split(":", 1)[1] for line in captured.out.splitlines())
    assert plain == stripped  # the same tokens, so the same perplexity
    assert f"--data {book} is a Project Gutenberg file: its header and footer are left out" in captured.err


def test_eval_and_inspect_read_a_jsonl_files_records_as_one_text_a_blank_line_between_two(trained_run, tmp_path,
                                                                                          capsys):
    paragraphs = [TEXT[:240], TEXT[240:480], TEXT[480:]]
    joined, records = tmp_path / "joined.txt", tmp_path / "records.jsonl"
    joined.write_text("\n\n".join(paragraphs))
    records.write_text("".join(json.dumps({"id": n, "body": text}) + "\n" for n, text in enumerate(paragraphs)))
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(joined)]) == 0
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(records), "--text-field", "body"]) == 0
    captured = capsys.readouterr()
    plain, from_records = (line.split(":", 1)[1] for line in captured.out.splitlines())
    assert plain == from_records
    assert (f"--data {records} is JSON Lines: the 'body' field of its {len(paragraphs)} records, read as one text "
            "with a blank line between records") in captured.err
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(records), "--windows", "2",
                 "--context", "8"]) == 1  # the default field, "text", is not there
    assert capsys.readouterr().err.startswith(f"tml inspect: --data {records}: line 1 has no 'text' field (its fields: "
                                              "'body', 'id'): name the field that holds the text with --text-field")
    one_document = tmp_path / "records.json"
    one_document.write_text(json.dumps([{"text": text} for text in paragraphs]))
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(one_document)]) == 1
    assert f"--data {one_document} is one JSON document: write its records one per line" in capsys.readouterr().err


def test_a_run_directory_without_a_checkpoint_yet_is_said_so(trained_run, tmp_path, capsys):
    run = tmp_path / "starting"
    run.mkdir()
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    assert main(["eval", "--checkpoint", str(run), "--data", __file__]) == 1
    assert f"{run} is a run directory with no checkpoint yet" in capsys.readouterr().err


def test_eval_prints_perplexity_equal_to_exp_of_the_token_mean_loss(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # not a terminal: no progress bar, the result line only
    loss = float(re.search(r"loss ([0-9.]+)", out).group(1))
    ppl = float(re.search(r"perplexity ([0-9.]+)", out).group(1))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)

    state, config = load_model_weights(trained_run)
    model = Transformer(config.model)
    model.load_state_dict(state)
    tokens = get_tokenizer().encode_ordinary(TEXT)
    expected, count = text_loss(model.eval(), tokens, torch.device("cpu"))
    assert count == len(tokens) - 1  # every next-token prediction counted once, tail window included
    assert loss == pytest.approx(expected, abs=1e-4)


def test_eval_in_bfloat16_weights_is_close_to_fp32(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--json", "--dtype",
                     dtype]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["dtype"] == dtype
        losses[dtype] = result["loss"]
    assert losses["bfloat16"] != losses["float32"]  # the weights really were cast
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--dtype", "float8"]) == 1
    assert "dtype 'float8': choose one of float32, bfloat16, float16" in capsys.readouterr().err
    assert next(tml.load(trained_run, dtype="bfloat16").parameters()).dtype == torch.bfloat16  # a name or a dtype


def test_eval_json_gives_the_same_numbers_as_the_line(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file)]) == 0
    line = capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == str(text_file) and result["checkpoint"] == str(trained_run)
    assert result["weights"] == str((checkpoints_dir(trained_run) / "best").resolve())  # which of the run's
    assert line == f"{text_file}: {result['tokens']} tokens | loss {result['loss']:.4f} | perplexity " \
                   f"{result['perplexity']:.2f} | {result['bits_per_byte']:.4f} bits per byte\n"
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_eval_bits_per_byte_are_the_loss_over_the_bytes_of_the_predicted_tokens(trained_run, tmp_path, capsys):
    text = "Ünïcode — words: " + TEXT  # multi-byte characters: bytes, not characters, are counted
    text_file = tmp_path / "sample.txt"
    text_file.write_text(text)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    predicted = get_tokenizer().encode_ordinary(text)[1:]  # the first token is never predicted
    assert result["bytes"] == len(get_tokenizer().decode_bytes(predicted)) < len(text.encode())
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * result["bytes"]))


def test_eval_context_sets_the_window_shorter_or_longer_than_the_model_was_trained_on(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT * 2)
    state, config = load_model_weights(trained_run)
    block = config.model.block_size
    results = {}
    for context in (None, block, 8, 2 * block):
        option = [] if context is None else ["--context", str(context)]
        assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--json", *option]) == 0
        captured = capsys.readouterr()
        results[context] = json.loads(captured.out)
        assert ("longer than the" in captured.err) == (context == 2 * block)
    assert results[None] == results[block] and results[None]["context"] == results[None]["trained_context"] == block
    model = Transformer(config.model)
    model.load_state_dict(state)
    tokens = get_tokenizer().encode_ordinary(TEXT * 2)
    short, count = text_loss(model.eval(), tokens, torch.device("cpu"), context=8)
    assert results[8]["loss"] == pytest.approx(short, abs=1e-4) and count == results[8]["tokens"] == len(tokens) - 1
    assert results[8]["loss"] != pytest.approx(results[None]["loss"], abs=1e-3)  # other windows, another number
    longer = results[2 * block]
    assert longer["context"] == 2 * block and math.isfinite(longer["loss"]) and longer["tokens"] == len(tokens) - 1
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--context", "2"]) == 0
    assert f"context 2 (trained at {block})" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--context", "1"]) == 1
    assert "--context 1: a window needs at least 2 tokens" in capsys.readouterr().err


def test_eval_batches_hold_a_bounded_number_of_tokens_whatever_the_window_and_progress_counts_them(trained_run):
    state, config = load_model_weights(trained_run)
    model = Transformer(config.model)
    model.load_state_dict(state)
    tokens = get_tokenizer().encode_ordinary(TEXT * 30)
    for context in (config.model.block_size, 2048):  # a long window is not batched 8 at a time (QA 12: 24 GB)
        model.config.block_size = context
        windows = math.ceil((len(tokens) - 1) / context)
        with Progress(disable=True) as progress:
            text_loss(model.eval(), tokens, torch.device("cpu"), progress, context)
        (task,) = progress.tasks
        assert task.total == task.completed == math.ceil(windows / (EVAL_BATCH_TOKENS // context)) > 1


def test_eval_refuses_a_binary_file_in_one_line(trained_run, tmp_path, capsys):
    data = tmp_path / "model.pt"
    data.write_bytes(b"PK\x03\x04\x00\x00weights")
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tml eval: --data {data} is not a text file: it holds NUL bytes (the first at offset 4)")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("encoding", "said"), [("utf-16", "read as utf-16"), ("cp1252", "read as cp1252"),
                                                ("latin-1", "read as latin-1"), ("utf-8", None)])
def test_eval_reads_text_as_tml_prepare_does_and_says_when_it_is_not_utf8(trained_run, tmp_path, capsys, encoding,
                                                                           said):
    text = "\u201cCaf\u00e9,\u201d she said. " * 20 if encoding != "latin-1" else "Caf\u00e9 cr\u00e8me. " * 20
    data = tmp_path / "held-out.txt"
    data.write_bytes(text.encode(encoding))  # utf-16 writes a byte-order mark
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(data)]) == 0
    out, err = capsys.readouterr()
    utf8 = tmp_path / "utf8.txt"
    utf8.write_text(text, encoding="utf-8")
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(utf8)]) == 0
    assert out.split(":", 1)[1] == capsys.readouterr().out.split(":", 1)[1]  # the same tokens, the same perplexity
    assert (said in err) if said else "read as" not in err


def inspect_table_rows(out: str) -> list[list[str]]:
    """The table's data rows (the lines that start with a layer number), split into cells."""
    return [line.replace("│", " ").split() for line in out.splitlines() if re.match(r"\s*\d+\s+│", line)]


def test_inspect_prints_a_row_per_layer_of_the_statistics_of_evenly_spread_windows(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(text_file), "--windows", "3"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "MLA, caching per token and layer a 32-wide latent" in header and "3 windows of 32 tokens" in header
    rows = inspect_table_rows(out)

    state, config = load_model_weights(trained_run)
    model = Transformer(config.model)
    model.load_state_dict(state)
    tokens = torch.tensor(get_tokenizer().encode_ordinary(TEXT))
    starts = window_starts(len(tokens), 32, 3)
    assert starts[0] == 0 and starts[-1] == len(tokens) - 32  # from the first token to the last full window
    expected = attention_statistics(model, torch.stack([tokens[s : s + 32] for s in starts]))
    assert len(rows) == config.model.n_layer == len(expected)
    for row, layer in zip(rows, expected, strict=True):
        assert row == [str(layer.layer), f"{layer.cache_effective_rank:.1f}", "32",
                       f"{100 * layer.cache_effective_rank / 32:.0f}%", f"{layer.max_logit:.2f}",
                       f"{layer.mean_entropy:.2f}"]


def test_inspect_json_gives_the_tables_numbers(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(text_file), "--context", "16"]) == 0
    rows = inspect_table_rows(capsys.readouterr().out)
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(text_file), "--context", "16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attention"] == "MLA" and result["windows"] == 8 and result["context"] == 16
    assert result["trained_context"] == 32 and result["uniform_entropy"] == pytest.approx(math.lgamma(17) / 16)
    assert result["weights"] == str((checkpoints_dir(trained_run) / "best").resolve())
    for row, layer in zip(rows, result["layers"], strict=True):
        assert row[1] == f"{layer['cache_effective_rank']:.1f}" and row[4] == f"{layer['max_logit']:.2f}"
        assert layer["cache_rank_fraction"] == pytest.approx(layer["cache_effective_rank"] / layer["cache_width"])
        assert 0 < layer["mean_entropy"] < result["uniform_entropy"] + 1e-6


def test_inspect_refuses_a_missing_file_and_a_text_shorter_than_one_window_in_one_line(trained_run, tmp_path,
                                                                                      capsys):
    missing = tmp_path / "missing.txt"
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(missing)]) == 1
    assert capsys.readouterr().err == f"tml inspect: --data {missing}: no such file\n"
    short = tmp_path / "short.txt"
    short.write_text("It was the best of times.")
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(short)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the line naming the run's checkpoint used
        f"tml inspect: --data {short}: 7 tokens, shorter than one window of 32 (a longer text, or a shorter --context)")
    assert main(["inspect", "--checkpoint", str(trained_run), "--data", str(short), "--windows", "0"]) == 1
    assert "--windows 0 must be >= 1" in capsys.readouterr().err


def test_export_writes_a_plain_fp32_state_dict(trained_run, tmp_path):
    output = tmp_path / "weights.pt"
    assert main(["export", "--checkpoint", str(trained_run / "checkpoints" / "last"), "--output", str(output)]) == 0
    exported = torch.load(output, weights_only=True)
    state, _ = load_model_weights(trained_run / "checkpoints" / "last")
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_export_writes_its_model_description_beside_it_and_prints_how_to_load_both(trained_run, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(trained_run), "--output", "weights.pt"]) == 0  # a relative output
    output, described = tmp_path / "weights.pt", tmp_path / "weights.json"
    out = capsys.readouterr().out.splitlines()
    tensors = len(torch.load(output, weights_only=True))
    assert out[0] == f"wrote weights.pt ({tensors} tensors) and weights.json (its model)"
    assert out[1] == f"load it in Python: import tml; model = tml.load({str(output)!r})"  # absolute: works anywhere
    description = json.loads(described.read_text())
    best = (checkpoints_dir(trained_run) / "best").resolve()
    assert description["model"] == asdict(debug_model_config(vocab_size=GPT2_PADDED_VOCAB))
    assert (description["tokenizer"], description["checkpoint"]) == ("gpt2", str(best))
    assert description["step"] == read_meta(best)["step"]


def test_an_export_copied_away_from_its_run_loads_with_tml_load_and_the_cli(trained_run, tmp_path, capsys):
    exported = tmp_path / "export" / "model.pt"
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(exported)]) == 0
    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    for name in ("model.pt", "model.json"):
        shutil.copy(exported.parent / name, elsewhere / name)
    model = tml.load(elsewhere / "model.pt")
    reference = tml.load(trained_run)
    assert not model.training and type(model).__name__ == "Transformer"
    idx = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(model(idx, idx)[0], reference(idx, idx)[0], rtol=0, atol=0)
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    capsys.readouterr()
    for source in (trained_run, elsewhere / "model.pt"):
        assert main(["eval", "--checkpoint", str(source), "--data", str(text_file)]) == 0
    run_line, export_line = capsys.readouterr().out.splitlines()
    assert run_line == export_line
    assert main(["generate", "--checkpoint", str(elsewhere / "model.pt"), "--prompt", "Once", "--max-new-tokens",
                 "3"]) == 0


def test_an_export_without_its_description_or_with_another_exports_is_refused_naming_both(trained_run, tmp_path,
                                                                                          capsys):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    for output in (first, second):
        assert main(["export", "--checkpoint", str(trained_run), "--output", str(output)]) == 0
    torch.save({"tok_emb.weight": torch.zeros(1)}, second)  # weights changed after the export
    assert main(["eval", "--checkpoint", str(second), "--data", __file__]) == 1
    assert f"tml eval: {second} does not match {tmp_path / 'b.json'}" in capsys.readouterr().err
    (tmp_path / "a.json").unlink()
    assert main(["eval", "--checkpoint", str(first), "--data", __file__]) == 1
    assert f"tml eval: {first} has no a.json beside it describing the model" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "model"])
def test_export_refuses_a_name_that_is_not_a_torch_state_dict_file_at_once(trained_run, tmp_path, capsys, name):
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(tmp_path / name)]) == 1
    assert "tml export writes a torch state dict, so name it .pt or .pth or .bin" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_directory_output_at_once(trained_run, tmp_path, capsys):
    output = tmp_path / "emptydir"
    output.mkdir()
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert err == (f"tml export: --output {output} is a directory; name the file to write, "
                   f"e.g. {output / 'model.pt'}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["emptydir"] and not any(output.iterdir())


def test_export_that_fails_while_writing_says_why_in_one_line_and_leaves_no_temporary(trained_run, tmp_path,
                                                                                        capsys, monkeypatch):
    def disk_fills_up(descriptor):  # fault injection: the bytes were written, then the disk turns out full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_fills_up)
    output = tmp_path / "weights.pt"
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(output)]) == 1
    said = re.escape(f"tml export: cannot write {output}: No space left on device (") + r"[\d,.]+ [MGT]B free\)"
    assert re.fullmatch(said, capsys.readouterr().err.splitlines()[-1])
    assert list(tmp_path.iterdir()) == []


def test_eval_of_last_follows_it_when_a_running_training_prunes_its_step_mid_read(trained_run, tmp_path, capsys,
                                                                                  monkeypatch):
    run = tmp_path / "training"
    shutil.copytree(trained_run, run, symlinks=True)
    root = checkpoints_dir(run)
    step = (root / "last").resolve()
    real_verify, moves = checkpoint.verify_checkpoint, [1]

    def training_moves_on(directory, only=None):  # saves a newer step, points last at it, prunes the old one
        if directory == step and moves:
            moves.pop()
            shutil.copytree(step, root / "step-9999999")
            (root / "last").unlink()
            (root / "last").symlink_to("step-9999999")
            os.replace(step, root / f".stale-{step.name}")
        return real_verify(directory, only)

    monkeypatch.setattr(checkpoint, "verify_checkpoint", training_moves_on)
    assert main(["eval", "--checkpoint", str(root / "last"), "--data", __file__]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_a_corrupted_checkpoint_is_refused_naming_the_file(trained_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "checkpoints" / "last", broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(broken), "--data", __file__]) == 1
    assert "model.pt" in capsys.readouterr().err


# --- Ctrl-C in `tml train`: a real process, a real SIGINT --------------------------------------------------------

@pytest.mark.parametrize(("override", "status", "message"), [
    (["--model.vocab_size", "128"], 2,
     "tml: model.vocab_size=128 is smaller than the vocabulary of the shards in {shards} (256): token ids would "
     "fall outside the embedding; set --model.vocab_size 256 or more"),
    (["--model.block_size", "8000"], 1,
     "tml: model.block_size=8000 needs block_size + 1 = 8001 tokens for one window, but split 'val' in {shards} "
     "has 6,000; use --model.block_size 5999 or less, or a larger data.val_frac or more books"),
])
def test_a_model_that_does_not_fit_the_data_is_refused_in_one_line(tmp_path, tiny_shards, capsys, monkeypatch,
                                                                    override, status, message):
    monkeypatch.setenv(RANK0_PID_VARIABLE, "")  # train_main records its pid here; restored afterwards
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(tiny_run_config(tiny_shards, tmp_path / "run")))
    code = main(["train", "--config", str(config_file), *override])
    assert code == status
    assert capsys.readouterr().err == message.format(shards=tiny_shards) + "\n"
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_start_that_fails_before_training_leaves_no_empty_run_directory(tmp_path, tiny_shards, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv(RANK0_PID_VARIABLE, "")
    config = tiny_run_config(tiny_shards, tmp_path / "runs" / "mine")
    config.data.source, config.data.shard_dir = str(tmp_path / "no-such-corpus"), str(tmp_path / "shards")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(config))
    assert main(["train", "--config", str(config_file)]) == 1
    assert "no-such-corpus" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mine").exists()
    (tmp_path / "runs" / "mine").mkdir()
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("mine")  # a directory that was there stays, as it was
    assert main(["train", "--config", str(config_file)]) == 1
    assert sorted(path.name for path in (tmp_path / "runs" / "mine").iterdir()) == ["notes.txt", "train.lock"]


def test_ctrl_c_while_the_data_is_prepared_says_so(tmp_path, tiny_shards, capsys, monkeypatch):
    monkeypatch.setenv(RANK0_PID_VARIABLE, "")
    config = tiny_run_config(tiny_shards, tmp_path / "run")
    config.data.shard_dir = str(tmp_path / "not-built-yet")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Text to prepare.\n")
    config.data.source = str(tmp_path / "corpus")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(config))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tml.data.prepare.prepare_data", interrupted)
    assert main(["train", "--config", str(config_file)]) == CTRL_C_EXIT_STATUS
    assert capsys.readouterr().err == (f"tml: interrupted while preparing {tmp_path / 'not-built-yet'}; the next run "
                                       "starts the unfinished preparation again\n")


@pytest.mark.slow
def test_a_data_error_from_the_command_line_prints_no_traceback(tmp_path, tiny_shards):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(tiny_run_config(tiny_shards, tmp_path / "run")))
    done = subprocess.run([sys.executable, "-m", "tml.cli", "train", "--config", str(config_file),
                           "--model.block_size", "8000"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("tml: model.block_size=8000 needs block_size + 1")


STEP_LINE = re.compile(r"^step\s+(\d+) \| loss")


def start_training(tmp_path: Path, tiny_shards: Path, **train_options) -> subprocess.Popen:
    config = tiny_run_config(tiny_shards, tmp_path / "run", max_steps=10_000, log_interval=1, val_interval=10_000,
                             ckpt_interval=10_000, resume="auto", **train_options)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "tml.cli", "train", "--config", str(config_file)], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, even under `&`
    )
    return process


def read_until(process: subprocess.Popen, wanted, seen: list[str]) -> str:
    """Lines of the run's output until one satisfies `wanted`; fails if the run ends first."""
    for line in process.stdout:
        seen.append(line)
        if wanted(line):
            return line
    pytest.fail("the run ended before the expected line:\n" + "".join(seen))


def test_signals_are_stop_requests_from_train_mains_first_line_and_ctrl_c_too_in_ranks_fabric_started(monkeypatch):
    """A group signal can reach a rank still reading its config: it must not die of it (Fabric would then kill every
    rank, saving nothing). Only rank 0's Ctrl-C interrupts before training, where nothing needs saving."""
    import tml.config
    from tml.train.preemption import PreemptionFlag

    seen: dict[int, object] = {}

    def load_config_noting_handlers(argv, parser):
        seen.update({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)})
        raise tml.config.ConfigError("stopped here by the test")

    def is_the_flags(handler) -> bool:
        return isinstance(getattr(handler, "__self__", None), PreemptionFlag)

    monkeypatch.setattr(tml.config, "load_config", load_config_noting_handlers)
    monkeypatch.delenv(RANK0_PID_VARIABLE, raising=False)  # rank 0 records its pid there; restored after the test
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert main(["train", "--config", "run.yaml"]) == 2
    assert is_the_flags(seen[signal.SIGTERM]) and is_the_flags(seen[signal.SIGUSR1])
    assert seen[signal.SIGINT] is before[signal.SIGINT]  # rank 0: Ctrl-C interrupts the start
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Fabric started
    monkeypatch.delenv(RANK0_PID_VARIABLE)
    assert main(["train", "--config", "run.yaml"]) == 2
    assert is_the_flags(seen[signal.SIGTERM]) and is_the_flags(seen[signal.SIGINT])
    assert {sig: signal.getsignal(sig) for sig in before} == before  # all given back


SIGNALLED_WHILE_STARTING = """
import os, signal, sys
import tml.train.preflight as preflight
from tml.cli import main

original = preflight.check_run_can_start

def signalled_while_starting(config):  # as SLURM preempting a job still importing or preparing its data
    os.kill(os.getpid(), signal.SIGTERM)
    return original(config)

preflight.check_run_can_start = signalled_while_starting
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.timeout(120)
def test_a_scheduler_signal_while_starting_stops_the_run_at_its_first_step_not_by_death(tmp_path, tiny_shards):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(tiny_run_config(tiny_shards, tmp_path / "run", max_steps=50)))
    done = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_STARTING, str(config_file)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]  # not -15: the default action would have killed it
    assert "tml: preempted by SIGTERM at step 1; resume with --train.resume auto" in done.stderr
    assert read_meta(checkpoints_dir(tmp_path / "run") / "last")["step"] == 1


def test_ctrl_c_during_the_last_validation_says_the_run_is_complete_and_exits_130(tmp_path, tiny_shards, capsys,
                                                                                  monkeypatch):
    import tml.train.loop as loop

    def evaluate_pressed_at_the_end(fabric, model, dataset, batch_size, val_batches):
        os.kill(os.getpid(), signal.SIGINT)  # the handler tml train installed takes it: a stop request
        return evaluate(fabric, model, dataset, batch_size, val_batches)

    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", evaluate_pressed_at_the_end)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(tiny_run_config(tiny_shards, tmp_path / "run", max_steps=2, val_interval=2)))
    assert main(["train", "--config", str(config_file)]) == CTRL_C_EXIT_STATUS  # `tml train && next` stops
    assert "tml: Ctrl-C came as the run finished: it is complete at step 2" in capsys.readouterr().err
    assert read_meta(checkpoints_dir(tmp_path / "run") / "last")["step"] == 2


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_saves_last_at_the_current_step_and_resume_continues(tmp_path, tiny_shards, capsys):
    process = start_training(tmp_path, tiny_shards)
    seen: list[str] = []
    read_until(process, lambda line: (m := STEP_LINE.match(line)) and int(m.group(1)) >= 3, seen)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = "".join(seen) + rest
    stopped = re.findall(r"^tml: stopped at step (\d+) \(Ctrl-C\); last checkpoint saved, resume with "
                         r"--train.resume auto$", output, flags=re.MULTILINE)
    assert process.returncode == CTRL_C_EXIT_STATUS, output
    assert "Traceback" not in output and len(stopped) == 1 and output.count("press Ctrl-C again") == 1
    step = int(stopped[0])
    last_logged = max(int(n) for n in re.findall(r"^step\s+(\d+) \| loss", output, flags=re.MULTILINE))
    assert step == last_logged >= 3  # log_interval 1: nothing trained after the save, nothing lost before it
    assert read_meta(checkpoints_dir(tmp_path / "run") / "last")["step"] == step

    config = tiny_run_config(tiny_shards, tmp_path / "run", max_steps=step + 2, log_interval=1,
                             val_interval=10_000, ckpt_interval=10_000, resume="auto")
    result = train(config)
    assert f"at step {step}" in capsys.readouterr().out  # "resumed from ... at step N"
    assert result.final_step == step + 2 and not result.preempted


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_second_ctrl_c_aborts_at_once_in_one_line(tmp_path, tiny_shards):
    process = start_training(tmp_path, tiny_shards, grad_accum=200)  # steps of seconds: the 2nd lands mid-step
    seen: list[str] = []
    read_until(process, STEP_LINE.match, seen)
    process.send_signal(signal.SIGINT)
    read_until(process, lambda line: "press Ctrl-C again" in line, seen)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    rest, _ = process.communicate(timeout=60)
    output = "".join(seen) + rest
    assert process.returncode == CTRL_C_EXIT_STATUS, output
    assert "Traceback" not in output and output.count("tml: aborted;") == 1
    assert time.monotonic() - started < 30  # not after finishing the step and saving
    assert not (checkpoints_dir(tmp_path / "run") / "last").exists()


@pytest.fixture(scope="module")
def small_vocab_run(tmp_path_factory, tiny_shards):
    """A model whose vocab_size (256) is below GPT-2's: it can read only some of GPT-2's token ids."""
    out_dir = tmp_path_factory.mktemp("small_vocab_run")
    train(tiny_run_config(tiny_shards, out_dir, max_steps=2, val_interval=2, ckpt_interval=2))
    return out_dir


def test_text_with_token_ids_beyond_the_models_vocabulary_is_refused_in_one_line(small_vocab_run, tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("Once upon a time")  # "Once" is GPT-2 id 7454
    assert main(["eval", "--checkpoint", str(small_vocab_run), "--data", str(text)]) == 1
    assert (f"tml eval: --data {text} holds GPT-2 token id 7,454, "
                                                        "beyond this model's vocab_size 256: the model cannot read it") in capsys.readouterr().err.splitlines()
    assert main(["generate", "--checkpoint", str(small_vocab_run), "--prompt", "Once upon a time"]) == 1
    assert "--prompt holds GPT-2 token id 7,454, beyond this model's vocab_size 256" in capsys.readouterr().err
    text.write_text("x!y!z!" * 20)  # ids under 256: readable
    assert main(["eval", "--checkpoint", str(small_vocab_run), "--data", str(text)]) == 0


def test_tml_train_refuses_init_from_weights_of_another_shape_in_one_line_before_preparing_data(tmp_path, capsys):
    source = tmp_path / "source" / "checkpoints" / "step-0000001"
    source.mkdir(parents=True)
    (source / "meta.json").write_text(json.dumps({"config": Config(model=debug_model_config(n_layer=3)).to_dict()}))
    checkpoint.write_manifest(source)
    argv = ["train", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--train.out_dir", str(tmp_path / "run"),
            "--data.shard_dir", str(tmp_path / "shards"), "--train.init_from", str(source)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tml: train.init_from={source}: its model has another shape (model.vocab_size 256 there, "
                          "50304 here;") and err.count("\n") == 1
    assert not (tmp_path / "shards").exists() and not (tmp_path / "run").exists()


def test_tml_help_lists_the_slurm_launcher(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert re.search(r"^\s+slurm\s+submit training to SLURM", capsys.readouterr().out, flags=re.MULTILINE)


def test_tml_version_is_the_installed_packages(capsys):
    try:
        installed = importlib.metadata.version("tml")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tml is not installed here (a source tree on sys.path)")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tml {installed}"


def test_tml_prepare_names_itself_as_run(capsys, tmp_path):
    assert main(["prepare", "--config", str(tmp_path / "absent.yaml")]) != 0
    assert "tml prepare: error:" in capsys.readouterr().err


def test_eval_rope_yarn_factor_reads_the_trained_weights_with_yarn_for_a_longer_context(trained_run, tmp_path, capsys):
    """YaRN without fine-tuning: the loss of the same weights built with model.rope_yarn_* at the model's block."""
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT * 2)
    state, config = load_model_weights(trained_run)
    block, longer = config.model.block_size, 4 * config.model.block_size
    results = {}
    for factor in (None, 4):
        option = [] if factor is None else ["--rope-yarn-factor", str(factor)]
        assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--context", str(longer),
                     "--json", *option]) == 0
        results[factor] = json.loads(capsys.readouterr().out)
    assert (results[None]["rope_yarn_factor"], results[4]["rope_yarn_factor"]) == (1.0, 4.0)
    tokens = get_tokenizer().encode_ordinary(TEXT * 2)
    expected = {}
    for factor, yarn in ((None, {}), (4, dict(rope_yarn_factor=4.0, rope_yarn_original_block_size=block))):
        model = Transformer(debug_model_config(vocab_size=GPT2_PADDED_VOCAB, **yarn))
        model.load_state_dict(state)
        model.config = debug_model_config(vocab_size=GPT2_PADDED_VOCAB, block_size=longer)  # the window eval reads
        expected[factor] = text_loss(model.eval(), tokens, torch.device("cpu"), context=longer)[0]
    # Two training steps leave the model near uniform, so YaRN moves its loss only in the sixth digit: same process,
    # same kernels, so the numbers match to the last bits.
    assert expected[4] != expected[None]
    assert {factor: result["loss"] for factor, result in results.items()} == pytest.approx(expected, rel=1e-12)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--rope-yarn-factor", "4"]) == 0
    assert "| YaRN x4 |" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file), "--rope-yarn-factor", "0.5"]) == 1
    assert "--rope-yarn-factor 0.5: model.rope_yarn_factor=0.5: must be >= 1" in capsys.readouterr().err
