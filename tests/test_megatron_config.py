"""Layouts that cannot work fail at configuration time with a message naming the problem."""

import pytest

from mugv.models import MUGDiTConfig
from mugv.models.megatron import get_layer_spec, megatron_config
from mugv.training.config import ParallelConfig

DIT = MUGDiTConfig(hidden_size=72, depth=4, num_heads=4, caption_channels=32)


def test_heads_must_split_over_tensor_parallel():
    with pytest.raises(ValueError, match="multiple of tensor_model_parallel_size|divisible"):
        megatron_config(DIT, tensor_model_parallel_size=3)


def test_ulysses_needs_heads_per_rank_divisible_by_cp():
    with pytest.raises(ValueError, match="Ulysses"):
        megatron_config(DIT, tensor_model_parallel_size=2, context_parallel_size=4, cp_attention="a2a")
    cfg = megatron_config(DIT, tensor_model_parallel_size=2, context_parallel_size=4, cp_attention="allgather")
    assert cfg.cp_attention == "allgather"


def test_unknown_backend_and_cp_mode():
    with pytest.raises(ValueError, match="backend"):
        megatron_config(DIT, backend="xla")
    with pytest.raises(ValueError, match="cp_attention"):
        megatron_config(DIT, cp_attention="ring")
    with pytest.raises(ValueError, match="unknown backend"):
        get_layer_spec("xla")


def test_te_backend_without_transformer_engine_is_a_clear_error():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Transformer Engine"):
            get_layer_spec("te")
    else:
        assert get_layer_spec("te") is not None


def test_parallel_config_validation():
    with pytest.raises(ValueError, match="recompute"):
        ParallelConfig(recompute="sometimes").validate()
    with pytest.raises(ValueError, match="vpp"):
        ParallelConfig(vpp=2, pp=1).validate()


def test_fp8_needs_transformer_engine_backend():
    with pytest.raises(ValueError, match="fp8"):
        megatron_config(DIT, fp8="hybrid")
    with pytest.raises(ValueError, match="fp8"):
        ParallelConfig(fp8="hybrid").validate()
