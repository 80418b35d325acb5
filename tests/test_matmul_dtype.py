"""The choice of the linear layers' multiplication dtype."""

import pytest
import torch

from mpiserve.engine.engine_config import EngineConfig
from mpiserve.errors import InvalidRequestError
from mpiserve.model.linear_weight import linear
from mpiserve.model.matmul_dtype import choose_matmul_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_float32_models_and_gpus_multiply_in_their_own_dtype():
    assert choose_matmul_dtype(torch.float32, CPU, "auto") == torch.float32
    assert choose_matmul_dtype(torch.bfloat16, CUDA, "auto") == torch.bfloat16


def test_auto_on_cpu_picks_one_of_the_two_and_a_setting_is_obeyed():
    assert choose_matmul_dtype(torch.bfloat16, CPU, "auto") in (torch.bfloat16, torch.float32)
    assert choose_matmul_dtype(torch.bfloat16, CPU, "bfloat16") == torch.bfloat16
    assert choose_matmul_dtype(torch.float16, CPU, "float32") == torch.float32


def test_widened_weights_give_the_half_product_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g).bfloat16()
    w = torch.randn(32, 64, generator=g).bfloat16()
    native, widened = linear(x, w), linear(x, w.float())
    assert widened.dtype == torch.bfloat16
    # both accumulate in float32 and round once; only the order of the sums differs
    assert torch.allclose(native.float(), widened.float(), rtol=2 ** -7, atol=1e-2)


def test_unknown_setting_is_refused():
    with pytest.raises(InvalidRequestError, match="matmul_dtype"):
        EngineConfig(matmul_dtype="int8")
