import math
import re

import pytest
import torch

from tests.conftest import debug_model_config
from tests.train.conftest import tiny_run_config
from tml.cli import main, text_loss
from tml.data.tokenizer import get_tokenizer
from tml.model import Transformer
from tml.model.config import GPT2_PADDED_VOCAB
from tml.train.checkpoint import load_model_weights
from tml.train.loop import train

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


def test_generate_refuses_a_prompt_longer_than_the_block(trained_run, capsys):
    code = main(["generate", "--checkpoint", str(trained_run), "--prompt", TEXT, "--max-new-tokens", "5"])
    assert code == 1 and "block_size" in capsys.readouterr().err


def test_eval_prints_perplexity_equal_to_exp_of_the_token_mean_loss(trained_run, tmp_path, capsys):
    text_file = tmp_path / "sample.txt"
    text_file.write_text(TEXT)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(text_file)]) == 0
    out = capsys.readouterr().out
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


def test_export_writes_a_plain_fp32_state_dict(trained_run, tmp_path):
    output = tmp_path / "weights.pt"
    assert main(["export", "--checkpoint", str(trained_run / "checkpoints" / "last"), "--output", str(output)]) == 0
    exported = torch.load(output, weights_only=True)
    state, _ = load_model_weights(trained_run / "checkpoints" / "last")
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_a_corrupted_checkpoint_is_refused_naming_the_file(trained_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "checkpoints" / "last", broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(broken), "--data", __file__]) == 1
    assert "model.pt" in capsys.readouterr().err
