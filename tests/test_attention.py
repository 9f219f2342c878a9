"""model.attention_backend: probes that really run each kernel (on the CPU cuDNN's cannot, which is the
fallback case), the choice and its refusals."""

import pytest
import torch

from egrpo import attention
from egrpo.errors import ConfigError

CPU = torch.device("cpu")
SHAPE = (1, 2, 24, 16)  # batch, heads, tokens, head width


def test_a_probe_times_a_kernel_that_runs_and_names_the_error_of_one_that_cannot():
    assert isinstance(attention.probe("math", SHAPE, torch.float32, CPU), float)
    assert isinstance(attention.probe("cudnn", SHAPE, torch.float32, CPU), str)  # no cuDNN attention on a CPU


def test_the_fastest_kernel_that_ran_is_chosen_and_a_failing_one_is_skipped():
    name, results = attention.fastest(("cudnn", "math"), SHAPE, torch.float32, CPU)
    assert name == "math" and isinstance(results["cudnn"], str) and isinstance(results["math"], float)
    with pytest.raises(ConfigError, match="no attention kernel ran at 2 heads x 24 tokens x 16"):
        attention.fastest(("cudnn",), SHAPE, torch.float32, CPU)


def test_choices_and_refusals():
    assert attention.choose("auto", SHAPE, torch.float32, CPU, deterministic=False)[0] is None
    assert attention.choose("math", SHAPE, torch.float32, CPU, deterministic=True)[0] == "math"
    with pytest.raises(ConfigError, match=r"model.attention_backend=cudnn cannot run at 2 heads x 24 tokens"):
        attention.choose("cudnn", SHAPE, torch.float32, CPU, deterministic=False)
    with pytest.raises(ConfigError, match="only flash or math attention has a deterministic backward"):
        attention.choose("efficient", SHAPE, torch.float32, CPU, deterministic=True)
    with pytest.raises(ConfigError, match="must be one of auto, cudnn, flash, efficient, math, got 'fast'"):
        attention.choose("fast", SHAPE, torch.float32, CPU, deterministic=False)


def test_the_chosen_kernel_is_the_only_one_the_transformer_may_use():
    q = k = v = torch.randn(SHAPE)
    with attention.kernel("math"):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert torch.equal(expected, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with attention.kernel("cudnn"), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # nothing else falls in on the CPU
