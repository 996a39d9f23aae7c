"""TransformerConfig for the Megatron MUGDiT: Megatron's parallel/precision fields plus the DiT's own.

Only fields a DiT uses are added; LLM-only fields of TransformerConfig keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from mugv.models.megatron.recompute import cheap
from mugv.models.mugdit import MUGDiTConfig

BACKENDS = ("local", "te")


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def gelu_tanh(x):
    """The MLP activation; under selective recompute its output is rebuilt from its input."""
    return cheap(_gelu, x)


CP_ATTENTION = ("a2a", "allgather")


@dataclass
class MUGDiTTransformerConfig(TransformerConfig):
    in_channels: int = 24
    out_channels: int = 48
    caption_channels: int = 4096
    frequency_embedding_size: int = 256
    rope_theta: float = 10000.0
    rope_max_hw: int = 384
    rope_max_t: int = 480
    # "local": Megatron Column/RowParallelLinear + torch SDPA core; "te": Transformer Engine linears
    backend: str = "local"
    # context-parallel self-attention for the SDPA core: all-to-all over heads (Ulysses) or all-gather KV
    cp_attention: str = "a2a"
    # backend "te" only: the self-attention core is Transformer Engine's DotProductAttention
    # (cuDNN/flash kernels, TE's own context parallelism) instead of the project's SDPA core
    te_attention: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.cp_attention not in CP_ATTENTION:
            raise ValueError(f"cp_attention must be one of {CP_ATTENTION}, got {self.cp_attention!r}")
        if self.te_attention and self.backend != "te":
            raise ValueError("te_attention needs backend 'te' (Transformer Engine)")
        if self.fp8 and self.backend != "te":
            raise ValueError(f"fp8={self.fp8!r} needs backend 'te' (Transformer Engine linears)")
        if self.kv_channels % 6:
            raise ValueError(f"head dim {self.kv_channels} must be a multiple of 6 (3D RoPE)")
        tp, cp = self.tensor_model_parallel_size, self.context_parallel_size
        if self.num_attention_heads % tp:
            raise ValueError(f"num_heads {self.num_attention_heads} is not divisible by tensor parallel size {tp}")
        if cp > 1 and self.cp_attention == "a2a" and (self.num_attention_heads // tp) % cp:
            raise ValueError(
                f"Ulysses context parallelism needs heads per TP rank ({self.num_attention_heads // tp}) "
                f"divisible by the context parallel size {cp}; use cp_attention='allgather'"
            )

    @property
    def dit(self) -> MUGDiTConfig:
        return MUGDiTConfig(
            hidden_size=self.hidden_size,
            depth=self.num_layers,
            num_heads=self.num_attention_heads,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            caption_channels=self.caption_channels,
            mlp_ratio=self.ffn_hidden_size // self.hidden_size,
            frequency_embedding_size=self.frequency_embedding_size,
            norm_eps=self.layernorm_epsilon,
            rope_theta=self.rope_theta,
            rope_max_hw=self.rope_max_hw,
            rope_max_t=self.rope_max_t,
        )


def megatron_config(dit: MUGDiTConfig, **parallel) -> MUGDiTTransformerConfig:
    """The Megatron config of a MUGDiT architecture plus parallel/precision settings
    (tensor_model_parallel_size, sequence_parallel, pipeline_model_parallel_size,
    virtual_pipeline_model_parallel_size, context_parallel_size, bf16, recompute_granularity, ...)."""
    return MUGDiTTransformerConfig(
        num_layers=dit.depth,
        hidden_size=dit.hidden_size,
        num_attention_heads=dit.num_heads,
        kv_channels=dit.head_dim,
        ffn_hidden_size=dit.mlp_ratio * dit.hidden_size,
        layernorm_epsilon=dit.norm_eps,
        add_bias_linear=True,
        activation_func=gelu_tanh,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # no MoE; this only satisfies TransformerConfig's check against variable_seq_lengths
        moe_token_dispatcher_type="alltoall",
        in_channels=dit.in_channels,
        out_channels=dit.out_channels,
        caption_channels=dit.caption_channels,
        frequency_embedding_size=dit.frequency_embedding_size,
        rope_theta=dit.rope_theta,
        rope_max_hw=dit.rope_max_hw,
        rope_max_t=dit.rope_max_t,
        # the loss function returns (sum of per-sample losses, sample count): the step's loss is the
        # mean over all its samples (mugv.training.step.sample_mean_loss, mugv.parallel.grads)
        calculate_per_token_loss=True,
        **{**_derived_defaults(parallel, dit.depth), **parallel},
    )


def grad_accumulation_fusion_available() -> bool:
    """Whether Megatron's linears can accumulate weight gradients straight into DDP's fp32
    main_grad in one GEMM (apex's kernel on GPU, mugv.parallel.cpu_compat's addmm_ on CPU).
    Set `gradient_accumulation_fusion` only on a model that trains inside Megatron DDP."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def _derived_defaults(parallel: dict, depth: int) -> dict:
    out = {}
    if parallel.get("virtual_pipeline_model_parallel_size"):
        # interleaved pipelines exchange with unbatched, overlapped p2p (Megatron-LM's choice with
        # virtual stages; batched p2p mixed up activations and gradients under gloo)
        out.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if parallel.get("recompute_granularity") == "full" and parallel.get("recompute_num_layers") is None:
        # "block": the first recompute_num_layers layers of each pipeline chunk; default all of them
        chunks = (parallel.get("pipeline_model_parallel_size") or 1) * (
            parallel.get("virtual_pipeline_model_parallel_size") or 1
        )
        out.update(recompute_num_layers=depth // chunks)
    if parallel.get("recompute_granularity") == "full":
        out.update(recompute_method="block")
    return out
