import math

import pytest
import torch

from tests.conftest import debug_model_config
from tml.data.packed import PackedDataset
from tml.model import Transformer
from tml.train.config import TrainConfig
from tml.train.evaluate import evaluate, perplexity, val_window_indices
from tml.train.fabric import build_fabric


def test_window_indices_are_spread_evenly_and_fixed():
    assert val_window_indices(100, 4) == [0, 25, 50, 75]
    assert val_window_indices(100, 4) == val_window_indices(100, 4)
    assert val_window_indices(3, 10) == [0, 1, 2]
    with pytest.raises(ValueError, match="no windows"):
        val_window_indices(0, 4)


def test_perplexity_is_exp_of_the_loss():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6) == math.inf


def test_val_loss_is_the_token_mean_over_the_fixed_windows_and_ppl_its_exp(tiny_shards):
    torch.manual_seed(0)
    model = Transformer(debug_model_config())
    fabric = build_fabric(TrainConfig(accelerator="cpu", precision="32-true"))
    dataset = PackedDataset(tiny_shards, "val", 32, 32)
    result = evaluate(fabric, fabric.setup(model), dataset, batch_size=3, val_batches=2)

    windows = val_window_indices(len(dataset), 6)
    x = torch.stack([dataset[i][0] for i in windows])
    y = torch.stack([dataset[i][1] for i in windows])
    with torch.no_grad():
        _, expected = model.eval()(x, y)
    assert result.windows == 6
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    again = evaluate(fabric, fabric.setup(model), dataset, batch_size=3, val_batches=2)
    assert again.loss == result.loss  # deterministic: same windows, same order


def test_every_batch_is_whole_so_a_compiled_model_sees_one_shape_and_the_padding_weighs_nothing(tiny_shards):
    torch.manual_seed(0)
    model = Transformer(debug_model_config())
    fabric = build_fabric(TrainConfig(accelerator="cpu", precision="32-true"))
    dataset = PackedDataset(tiny_shards, "val", 32, 32)
    batch_size = 4 if len(dataset) % 4 else 5
    assert len(dataset) % batch_size  # all windows are asked for, and the last batch is not full
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        result = evaluate(fabric, fabric.setup(model), dataset, batch_size, val_batches=len(dataset))
    finally:
        hook.remove()
    assert result.windows == len(dataset)
    assert set(shapes) == {(batch_size, 32)} and len(shapes) == -(-len(dataset) // batch_size)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.stack([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        _, expected = model.eval()(x, y)
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)
