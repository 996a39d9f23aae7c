"""Check a Megatron checkpoint against HF / release weights: run both models on one probe batch.

The reference is the plain MUGDiT (fp32) built from the HF directory or dit.pt; the Megatron
MUGDiT is built at the requested TP x PP x CP layout from the checkpoint (fp32) on tp*pp processes
(spawned here; the current process when tp*pp*cp == 1). The reference runs first and is freed before
the Megatron side starts, so the peak is one fp32 model per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mugv.checkpoint import read_model_config, resolve
from mugv.checkpoint.weights import weight_prefix
from mugv.convert.sources import ReleaseSource
from mugv.models.mugdit import MUGDiT, MUGDiTConfig
from mugv.parallel.launch import single_process_env, spawn
from mugv.utils.logging import get_logger

log = get_logger(__name__)


def probe_batch(
    config: MUGDiTConfig, seed: int = 0, B: int = 2, T: int = 2, H: int = 4, W: int = 6, L: int = 8
):
    """A fixed-seed batch that exercises text padding, an I2V frame, fps and frame indices."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1:, L // 2 :] = False
    x_mask = torch.ones(B, T, dtype=torch.bool)
    x_mask[-1, 0] = False
    return dict(
        x=torch.randn(B, config.in_channels, T, H, W, generator=g),
        timestep=torch.rand(B, generator=g) * 1000,
        y=torch.randn(B, 1, L, config.caption_channels, generator=g),
        mask=mask,
        x_mask=x_mask,
        fps=torch.linspace(30.0, 24.0, B),
        frame_indices=torch.arange(T + 2).repeat(B, 1),
    )


# ---------------------------------------------------------------------------------------------
# the Megatron side (runs inside an initialised distributed context)
# ---------------------------------------------------------------------------------------------


def load_megatron_chunks(
    ckpt_dir: str, ema: bool = False, device: torch.device | str = "cpu", cp_attention: str = "a2a"
):
    """This rank's Megatron MUGDiT chunks (fp32, eval) at the current parallel layout, loaded from
    a checkpoint. Returns (chunks, megatron config)."""
    from megatron.core import dist_checkpointing, parallel_state

    from mugv.checkpoint.keys import load_into_chunks, model_sharded_state_dict
    from mugv.models.megatron import build_model_chunks, megatron_config

    cfg = megatron_config(
        read_model_config(ckpt_dir),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        cp_attention=cp_attention,
        pipeline_dtype=torch.float32,
    )
    chunks = [c.to(device).eval() for c in build_model_chunks(cfg)]
    prefix = weight_prefix(ema)
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks, prefix), ckpt_dir)
    load_into_chunks(chunks, loaded, prefix)
    return chunks, cfg


@torch.no_grad()
def megatron_forward(chunks, cfg, batch: dict) -> torch.Tensor | None:
    """Forward one batch through the pipeline; the output [B, Cout, T, H, W] on the last stage,
    None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mugv.models.megatron import padded_sequence_length

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return chunks[0](**batch)
    outputs = []

    def forward_step(data_iterator, module):
        out = module(**next(data_iterator))

        def keep(output):
            outputs.append(output)
            return output.sum() * 0, {}

        return out, keep

    T, H, W = batch["x"].shape[2:]
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks[0], num_microbatches=1,
        seq_length=padded_sequence_length(cfg, T, H, W), micro_batch_size=batch["x"].shape[0], forward_only=True,
    )  # fmt: skip
    return outputs[0] if outputs else None


def _megatron_worker(rank: int, world: int, ckpt_dir: str, layout: dict, ema: bool, batch: dict):
    from mugv.parallel import destroy_distributed, init_distributed

    ctx = init_distributed(tp=layout["tp"], pp=layout["pp"], cp=layout["cp"])
    try:
        chunks, cfg = load_megatron_chunks(ckpt_dir, ema, ctx.device, layout["cp_attention"])
        out = megatron_forward(chunks, cfg, {k: v.to(ctx.device) for k, v in batch.items()})
        return None if out is None else out.cpu()
    finally:
        destroy_distributed()


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    max_abs: float
    max_rel: float  # max |megatron - reference| / max |reference|
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def format(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"verify: max abs diff {self.max_abs:.3e}, max rel diff {self.max_rel:.3e} "
                f"(tolerance {self.tolerance:.1e}): {verdict}")  # fmt: skip


def verify(
    hf: str,
    ckpt: str,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    cp_attention: str = "a2a",
    ema: bool = False,
    tolerance: float = 1e-4,
    seed: int = 0,
    launcher: Callable | None = None,
) -> VerifyResult:
    """Compare the Megatron checkpoint (at TP x PP x CP) with HF / release weights on a probe
    batch. `launcher(fn, world, *args)` runs the Megatron side (default: this process when
    tp*pp*cp == 1, else mugv.parallel.launch.spawn)."""
    ckpt_dir = resolve(ckpt)
    config = read_model_config(ckpt_dir)
    source = ReleaseSource(hf, config if os.path.isfile(hf) else None)
    if source.config != config:
        raise ValueError(f"{hf} has config {source.config}, but {ckpt_dir} has {config}")
    if config.depth % pp or config.num_heads % tp:
        raise ValueError(f"TP {tp} must divide {config.num_heads} heads and PP {pp} the depth {config.depth}")
    if cp_attention == "a2a" and (config.num_heads // tp) % cp:
        raise ValueError(f"CP {cp} must divide the {config.num_heads // tp} heads per TP rank (or use allgather)")
    batch = probe_batch(config, seed)
    ref_model = MUGDiT.from_state_dict(config, {k: v.float() for k, v in source.items()})
    with torch.no_grad():
        ref = ref_model.eval()(**batch)
    del ref_model
    log.info("verify: reference done; Megatron at TP %d x PP %d x CP %d from %s", tp, pp, cp, ckpt_dir)
    layout = dict(tp=tp, pp=pp, cp=cp, cp_attention=cp_attention)
    outs = [o for o in (launcher or _launch)(_megatron_worker, tp * pp * cp, ckpt_dir, layout, ema, batch)
            if o is not None]  # fmt: skip
    if not outs:
        raise RuntimeError("verify: no rank returned the model output")
    diff = (outs[-1].float() - ref).abs().max().item()
    return VerifyResult(diff, diff / max(ref.abs().max().item(), 1e-12), tolerance)


def _launch(fn: Callable, world: int, *args) -> list:
    """The Megatron side in this process (its own rendezvous) for one rank, else on spawned ranks."""
    if world == 1:
        with single_process_env():
            return [fn(0, 1, *args)]
    return spawn(fn, world, *args)
