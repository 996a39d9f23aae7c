"""Build the parallel model and its optimizer from a TrainConfig, in a fixed order:
Megatron config -> model chunks (this rank's pipeline stages; with lora.rank > 0 the LoRA layer
spec, base frozen) -> bf16 wrapper -> DDP -> gradient finalisation -> distributed optimizer.
DDP and the optimizer see only parameters that require grad: with LoRA, the adapters."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from mugv.models.megatron import build_model_chunks, get_layer_spec, megatron_config
from mugv.models.megatron.config import MUGDiTTransformerConfig, grad_accumulation_fusion_available
from mugv.models.megatron.lora import LoRASettings, prepare_lora
from mugv.models.mugdit import MUGDiTConfig
from mugv.parallel.ddp import WriteFirstDDP
from mugv.parallel.grads import finalize_grads
from mugv.training.config import TrainConfig


def build_megatron_config(cfg: TrainConfig, dit: MUGDiTConfig) -> MUGDiTTransformerConfig:
    p = cfg.parallel
    return megatron_config(
        dit,
        tensor_model_parallel_size=p.tp,
        sequence_parallel=p.sequence_parallel and p.tp > 1,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        cp_attention=p.cp_attention,
        backend=p.backend,
        bf16=p.bf16,
        fp8=p.fp8,
        params_dtype=torch.bfloat16 if p.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if p.bf16 else torch.float32,
        recompute_granularity=p.recompute,
        te_attention=p.te_attention,
        **({"recompute_num_layers": p.recompute_layers} if p.recompute == "full" and p.recompute_layers else {}),
        variable_seq_lengths=p.pp > 1,  # buckets: micro-batches of different sequence lengths
    )


def use_distributed_optimizer(cfg: TrainConfig) -> bool:
    """parallel.distributed_optimizer where it shards anything: with a single data(+context)-
    parallel rank it would only reduce-scatter and all-gather the whole buffer onto itself."""
    if not cfg.parallel.distributed_optimizer or not dist.is_initialized():
        return cfg.parallel.distributed_optimizer
    return dist.get_world_size(parallel_state.get_data_parallel_group(with_context_parallel=True)) > 1


def lora_settings(cfg: TrainConfig) -> LoRASettings | None:
    lo = cfg.lora
    return LoRASettings(lo.rank, lo.alpha, lo.dropout, tuple(lo.targets)) if lo.rank else None


def build_model(cfg: TrainConfig, mcfg: MUGDiTTransformerConfig, device: torch.device) -> list:
    """This rank's chunks, on device, bf16-wrapped if asked, in Megatron DDP (whose main_grad
    buffers the linears then accumulate weight gradients into directly, where supported; on CPU
    the step's first product is written, mugv.parallel.ddp)."""
    mcfg.gradient_accumulation_fusion = grad_accumulation_fusion_available()
    lora = lora_settings(cfg)
    spec = get_layer_spec(mcfg.backend, mcfg.te_attention, lora=lora) if lora else None
    chunks = [c.to(device) for c in build_model_chunks(mcfg, spec)]
    if lora:
        prepare_lora(chunks, cfg.train.seed)
    if mcfg.bf16:
        chunks = [Float16Module(mcfg, c) for c in chunks]
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        bucket_size=cfg.parallel.bucket_size,
    )
    model = [
        WriteFirstDDP(config=mcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
        for i, c in enumerate(chunks)
    ]
    mcfg.finalize_model_grads_func = finalize_grads
    if cfg.parallel.overlap_grad_reduce:
        mcfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        mcfg.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
    if cfg.parallel.overlap_param_gather:
        mcfg.param_sync_func = [m.start_param_sync for m in model] if len(model) > 1 else model[0].start_param_sync
    return model


def build_optimizer(cfg: TrainConfig, mcfg: MUGDiTTransformerConfig, model: list):
    o = cfg.optim
    ocfg = OptimizerConfig(
        optimizer="adam",
        decoupled_weight_decay=o.optimizer == "adamw",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=mcfg.bf16,
        params_dtype=mcfg.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
        overlap_param_gather_with_optimizer_step=False,
    )
    return get_megatron_optimizer(ocfg, model)
