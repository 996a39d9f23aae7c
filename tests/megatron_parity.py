"""Run the Megatron MUGDiT at a parallel layout on N gloo ranks and bring back, in the release
layout, what the single-process reference is compared against: the (gathered) outputs, every
parameter's gradient after finalize, and every parameter after one optimizer step.

The loss is the training loss (mugv.training.step): the mean over all samples of the step of each
sample's masked flow loss. A micro-batch is a batch dict of tensors, or a packed one: a dict of
lists over groups of same-shape samples (the model's packed input), its target a list too; the
reference runs every sample of a packed micro-batch alone through the plain model.

With `Layout.lora` the layers get LoRA adapters (mugv.models.megatron.lora) and the base is
frozen: gradients and the optimizer cover the adapters only; the reference is the plain MUGDiT
with mugv.models.lora adapters (see `lora_reference_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.0)


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    sp: bool = False
    cp_attention: str = "a2a"
    distopt: bool = True
    overlap: bool = False
    microbatches: int = 1
    recompute: str | None = None
    bf16: bool = False
    lora: dict | None = None  # LoRASettings fields (rank, alpha, targets, ...)
    extra: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    dp: int = 1


def split_batch(batch: dict, parts: int) -> list[dict]:
    B = next(iter(batch.values())).shape[0]
    return [{k: v[i * B // parts : (i + 1) * B // parts] for k, v in batch.items()} for i in range(parts)]


def _densify(chunk, p, g: torch.Tensor, distopt: bool) -> torch.Tensor:
    """With the distributed optimizer a grad is valid only in this rank's DP shard: assemble it."""
    from megatron.core import parallel_state

    from mugv.parallel.grads import _dp_shard_mask

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if not distopt or dist.get_world_size(group) == 1:
        return g
    mask = _dp_shard_mask(chunk, p, dist.get_rank(group), dist.get_world_size(group))
    g = g.clone().view(-1).mul_(mask).view(g.shape)
    dist.all_reduce(g, group=group)
    return g


def to_release(ddp_chunks, what: str, distopt: bool, num_heads: int) -> dict[str, torch.Tensor]:
    """This rank's parameters (what='data') or gradients (what='grad') in the release layout,
    merged over tensor parallelism."""
    from megatron.core import parallel_state

    from mugv.checkpoint.keys import chunk_rows, unwrap
    from mugv.models.megatron.weight_map import merge

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    out = {}
    for ddp in ddp_chunks:
        chunk = unwrap(ddp)
        params = dict(chunk.named_parameters())
        for row in chunk_rows(chunk):
            p = params[row.megatron]
            if what == "grad" and not p.requires_grad:  # frozen (LoRA base): no gradient
                continue
            t = p.detach().clone() if what == "data" else _densify(ddp, p, p.main_grad.detach(), distopt)
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t.contiguous(), group=tp_group)
            out[row.release] = merge(shards, row.layout, num_heads)
    return out


def build_parallel(layout: Layout, dit_kwargs: dict, release_sd, variable_seq_lengths: bool = False):
    """(megatron config, DDP chunks, optimizer) of the release weights at `layout` on this rank."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from mugv.models import MUGDiTConfig
    from mugv.models.megatron import build_model_chunks, get_layer_spec, megatron_config
    from mugv.models.megatron.config import grad_accumulation_fusion_available
    from mugv.models.megatron.lora import LoRASettings, prepare_lora
    from mugv.models.megatron.weight_map import release_to_chunk
    from mugv.parallel.ddp import WriteFirstDDP
    from mugv.parallel.grads import finalize_grads
    from mugv.parallel.runtime import init_distributed

    init_distributed(tp=layout.tp, pp=layout.pp, cp=layout.cp, vpp=layout.vpp)
    dit = MUGDiTConfig(**dit_kwargs)
    cfg = megatron_config(
        dit,
        tensor_model_parallel_size=layout.tp,
        sequence_parallel=layout.sp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        cp_attention=layout.cp_attention,
        pipeline_dtype=torch.float32,
        recompute_granularity=layout.recompute,
        variable_seq_lengths=variable_seq_lengths,
        bf16=layout.bf16,
        params_dtype=torch.bfloat16 if layout.bf16 else torch.float32,
        gradient_accumulation_fusion=grad_accumulation_fusion_available(),  # as mugv.training.build
        **layout.extra,
    )
    if layout.bf16:
        cfg.pipeline_dtype = torch.bfloat16
    lora = LoRASettings(**layout.lora) if layout.lora else None
    chunks = build_model_chunks(cfg, get_layer_spec("local", lora=lora) if lora else None)
    if lora:
        prepare_lora(chunks, seed=0)  # freeze the base (the adapters' values come from release_sd)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for c in chunks:
        c.load_state_dict(release_to_chunk(release_sd, c, tp_rank, layout.tp, dit.num_heads), strict=True)
    if layout.bf16:
        chunks = [Float16Module(cfg, c) for c in chunks]
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=layout.distopt,
        overlap_grad_reduce=layout.overlap, bucket_size=20000,
    )
    model = [WriteFirstDDP(config=cfg, ddp_config=ddp_cfg, module=c) for c in chunks]  # as mugv.training.build
    cfg.finalize_model_grads_func = finalize_grads
    if layout.overlap:
        cfg.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=ADAM["lr"], adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1],
            adam_eps=ADAM["eps"], weight_decay=ADAM["weight_decay"], use_distributed_optimizer=layout.distopt,
            clip_grad=0.0, params_dtype=cfg.params_dtype, bf16=layout.bf16,
        ),
        model,
    )
    return cfg, model, opt


def parity_worker(rank, world, layout: Layout, dit_kwargs: dict, release_sd, batch, target, microbatches=None):
    """microbatches: explicit list of (batch, target) micro-batches (DP = 1), e.g. of different
    shapes; default: `batch` split over DP ranks and layout.microbatches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mugv.training.step import per_sample_loss, sample_mean_loss

    cfg, model, opt = build_parallel(layout, dit_kwargs, release_sd, microbatches is not None)
    dit = cfg.dit
    for m in model:
        m.zero_grad_buffer()
    opt.zero_grad()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    if microbatches is not None:  # explicit micro-batches: one list, or one list per DP rank
        mine = microbatches[dp_rank] if dp > 1 else microbatches
        mbs = [{**b, "target": t} for b, t in mine]
    else:
        local = split_batch({**batch, "target": target}, dp)[dp_rank]
        mbs = split_batch(local, layout.microbatches)
    outputs = []

    def forward_step(data_iterator, module):
        mb = next(data_iterator)
        inputs = {k: v for k, v in mb.items() if k != "target"}
        out = module(**inputs)

        def loss_func(output):
            outputs.append(output.detach() if torch.is_tensor(output) else [o.detach() for o in output])
            # every CP rank computes the full loss from the gathered output; each holds the gradient
            # of its own token slice, summed over DP x CP and divided by the step's sample count
            per_sample = per_sample_loss(output, mb["target"], inputs["x_mask"])
            return *sample_mean_loss(per_sample), {"per_sample": per_sample.detach()}

        return out, loss_func

    seq = max(sequence_length(cfg, mb["x"]) for mb in mbs)
    data = [iter(mbs) for _ in model] if len(model) > 1 else iter(mbs)
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=model if len(model) > 1 else model[0],
        num_microbatches=len(mbs), seq_length=seq,
        micro_batch_size=1 if isinstance(mbs[0]["x"], list) else mbs[0]["x"].shape[0], forward_only=False,
    )
    grads = to_release(model, "grad", layout.distopt, dit.num_heads)
    ok, grad_norm, _ = opt.step()
    assert ok, "optimizer step skipped"
    params = to_release(model, "data", layout.distopt, dit.num_heads)
    outputs = (torch.cat(outputs) if microbatches is None else outputs) if outputs else None
    return dict(outputs=outputs, dp_rank=dp_rank, grads=grads, params=params)


def sequence_length(cfg, x) -> int:
    from mugv.models.megatron import packed_sequence_length, padded_sequence_length

    if isinstance(x, list):
        return packed_sequence_length(cfg, [tuple(g.shape[2:]) for g in x for _ in range(g.shape[0])])
    return padded_sequence_length(cfg, *x.shape[2:])


def run_alone(model, batch: dict, target):
    """Every sample of a micro-batch through `model` on its own: (outputs shaped like the
    micro-batch's -- a tensor, or a list over packed groups --, per-sample losses [K])."""
    from mugv.diffusion import flow_loss

    packed = isinstance(batch["x"], list)
    groups = [{k: v[g] for k, v in batch.items()} for g in range(len(batch["x"]))] if packed else [batch]
    targets = target if packed else [target]
    outs, losses = [], []
    for b, t in zip(groups, targets):
        alone = [model(**{k: v[i : i + 1] for k, v in b.items()}) for i in range(b["x"].shape[0])]
        losses += [flow_loss(o, t[i : i + 1], b["x_mask"][i : i + 1]) for i, o in enumerate(alone)]
        outs.append(torch.cat(alone))
    return (outs if packed else outs[0]), torch.cat(losses)


def reference(model, batch, target, microbatches=None):
    """Single-process output, gradients and params after one Adam step (release layout), every
    sample run alone; the loss is the mean over all samples. `microbatches`: [(batch, target), ...]
    (or a list of those per DP rank), outputs returned per micro-batch."""
    if microbatches is None:
        out, losses = run_alone(model, batch, target)
    else:
        flat = [mb for mbs in microbatches for mb in mbs] if isinstance(microbatches[0], list) else microbatches
        runs = [run_alone(model, b, t) for b, t in flat]
        losses = torch.cat([r[1] for r in runs])
        detach = lambda o: o.detach() if torch.is_tensor(o) else [g.detach() for g in o]
        out = [detach(r[0]) for r in runs]
    losses.mean().backward()
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = {k: p.grad.detach().clone() for k, p in trained.items()}
    opt = torch.optim.Adam(trained.values(), **ADAM)
    opt.step()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return (out.detach() if microbatches is None else out), grads, params


def lora_reference_model(model, rank: int, alpha: float, targets=None, seed: int = 7):
    """`model` (a plain MUGDiT) with LoRA adapters on `targets` (default all), both factors random
    (B = 0 would make the adapters invisible in the output and A's gradient zero), base frozen."""
    from mugv.models.lora import add_lora
    from mugv.models.megatron.weight_map import LORA_TARGETS

    add_lora(model, rank, alpha, targets or tuple(LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model
