"""tml/text_eval.py: a model measured on a text file (the commands that use it are tested in tests/test_cli.py)."""

import math

import pytest

from tests.conftest import debug_model_config
from tml.data.tokenizer import get_tokenizer
from tml.model import Transformer
from tml.text_eval import bits_per_byte, cache_description, predicted_bytes, read_at_context, window_starts


def test_inspect_windows_spread_evenly_and_overlap_only_when_the_text_is_short():
    assert window_starts(100, 10, 4) == [0, 30, 60, 90]
    assert window_starts(100, 10, 1) == [0]
    assert window_starts(12, 10, 3) == [0, 1, 2]


def test_inspect_names_what_a_grouped_query_layer_caches():
    config = debug_model_config(attention="mha", n_kv_head=2)
    assert cache_description(config) == "keys and values of 2 kv heads x 16 dims, 64 wide"


def test_bits_per_byte_count_the_utf8_bytes_of_the_predicted_tokens():
    text = "Ünïcode — and words"
    tokens = get_tokenizer().encode_ordinary(text)
    assert predicted_bytes(text, tokens[0]) == len(get_tokenizer().decode_bytes(tokens[1:]))
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)  # a nat-loss of ln 2 per token, a byte a token


@pytest.mark.parametrize(("yarn", "context", "warned"), [
    ({}, 32, False), ({}, 33, True),  # the block it was trained at
    (dict(rope_yarn_factor=4.0, rope_yarn_original_block_size=32), 128, False),  # what YaRN extends it to
    (dict(rope_yarn_factor=4.0, rope_yarn_original_block_size=32), 129, True),
])
def test_reading_past_what_the_model_reads_is_said_and_yarn_extends_it(yarn, context, warned, capsys):
    model = Transformer(debug_model_config(block_size=32, **yarn))
    read_at_context(model, context, "eval")
    assert model.config.block_size == context
    assert ("positions past that are new to it" in capsys.readouterr().err) == warned
