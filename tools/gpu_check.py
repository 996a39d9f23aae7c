"""One-GPU check of the figures the CPU cannot give, one figure per line (<= 8 min on one GPU).

    python tools/gpu_check.py          # on a CUDA machine (Transformer Engine for the te lines)
    python tools/gpu_check.py --cpu    # reduced form on the CPU (CI): tiny model, same code paths

Lines:
  te-parity     `te` vs `local` layer, bf16, TP1: max relative error of outputs and input grads
  fp8-step      a `te` layer step under FP8 (hybrid): the loss, finite or not
  attention     the SDPA kernel that serves head dim 72 and its TFLOP/s (fwd)
  train-Nk      mugdit_1b (--cpu: mugdit_tiny) Megatron training step: tokens/s and MFU at ~8k and
                ~50k tokens per sample (--cpu: ~200), with the plan's activation estimate vs
                torch.cuda.max_memory_allocated
  checkpoint    save / load time of the model's weights (torch.save to a temp dir)
A line that cannot run here says why ("skipped: ...").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import make_batch  # noqa: E402


def say(name: str, text: str) -> None:
    print(f"{name:12s} {text}", flush=True)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _layer(backend: str, dit, dtype, **extra):
    from megatron.core.transformer.spec_utils import build_module

    from mugv.models.megatron import get_layer_spec, megatron_config

    cfg = megatron_config(dit, backend=backend, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                          pipeline_dtype=dtype, **extra)
    return build_module(get_layer_spec(backend), config=cfg, layer_number=1)


def _layer_inputs(dit, dev, dtype, T=2, Hp=8, Wp=8, B=1, L=16):
    from mugv.models.layout import TokenLayout
    from mugv.models.megatron.layer import DiTContext

    g = torch.Generator().manual_seed(0)
    lay = TokenLayout(T, Hp, Wp)
    C, D = dit.hidden_size, dit.head_dim
    h = torch.randn(lay.N, B, C, generator=g).to(dev, dtype).requires_grad_()
    fm = (torch.randn(T + 1, B, 6 * C, generator=g) * 0.1).to(dev, dtype)
    text = torch.randn(B * L, 1, C, generator=g).to(dev, dtype)
    rope = (torch.rand(lay.N, B, 1, D // 2, generator=g) * 6).to(dev)
    return h, DiTContext(lay, lay.N, rope, fm, text, [L] * B)


def te_parity(dit, dev) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return say("te-parity", "skipped: Transformer Engine not installed")
    if dev.type != "cuda":
        return say("te-parity", "skipped: Transformer Engine needs a GPU")
    local = _layer("local", dit, torch.bfloat16).to(dev)
    te = _layer("te", dit, torch.bfloat16).to(dev)
    te.load_state_dict(local.state_dict(), strict=False)
    res = []
    for layer in (local, te):
        h, ctx = _layer_inputs(dit, dev, torch.bfloat16)
        out = layer(h, ctx)
        out.float().square().mean().backward()
        res.append((out.float(), h.grad.float()))
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    say("te-parity", f"bf16 TP1: output rel err {rel(res[1][0], res[0][0]):.2e}, input grad rel err "
                     f"{rel(res[1][1], res[0][1]):.2e}")


def fp8_step(dit, dev) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return say("fp8-step", "skipped: Transformer Engine not installed")
    if dev.type != "cuda":
        return say("fp8-step", "skipped: FP8 needs a GPU")
    from megatron.core.fp8_utils import get_fp8_context

    layer = _layer("te", dit, torch.bfloat16, fp8="hybrid").to(dev)
    h, ctx = _layer_inputs(dit, dev, torch.bfloat16, Hp=16, Wp=16)
    with get_fp8_context(layer.config, 0):
        out = layer(h, ctx)
    loss = out.float().square().mean()
    loss.backward()
    say("fp8-step", f"loss {float(loss):.4f} ({'finite' if torch.isfinite(loss) else 'NOT finite'})")


def attention(dev, D: int = 72, heads: int = 16, n: int = 8192) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = n if dev.type == "cuda" else 512
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, n, D, device=dev, dtype=dtype) for _ in range(3))
    backends = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                if dev.type == "cuda" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    for b in backends:
        try:
            with sdpa_kernel([b]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                _sync(dev)
                reps = 10 if dev.type == "cuda" else 2
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                _sync(dev)
                dt = (time.perf_counter() - t0) / reps
        except RuntimeError:
            continue
        flops = 4 * n * n * D * heads
        return say("attention", f"head dim {D}: {b.name} serves it, {flops / dt / 1e12:.2f} TFLOP/s fwd "
                                f"({heads} heads x {n} tokens, {dtype})")
    say("attention", f"no SDPA kernel accepted head dim {D}")


def train(preset: str, sizes: list[tuple[int, int, int]], dev, cpu: bool) -> None:
    from mugv.checkpoint.keys import unwrap
    from mugv.models.flops import mugdit_flops_per_sample, peak_bf16_flops
    from mugv.training.build import build_megatron_config, build_model, build_optimizer
    from mugv.training.config import ModelConfig, TrainConfig
    from mugv.training.guards import NonFiniteGuard
    from mugv.training.objective import FlowObjective
    from mugv.training.plan import activation_bytes
    from mugv.training.schedule import LRSchedule
    from mugv.training.step import DiTForwardStep
    from mugv.training.trainer import Trainer

    for T, H, W in sizes:
        cfg = TrainConfig(model=ModelConfig(preset=preset))
        cfg.parallel.bf16 = not cpu
        cfg.parallel.recompute = "selective"
        cfg.train.text_dropout, cfg.ema.decay = 0.0, 0.0
        dit = cfg.model.build()
        mcfg = build_megatron_config(cfg, dit)
        model = build_model(cfg, mcfg, dev)
        optimizer = build_optimizer(cfg, mcfg, model)
        trainer = SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, mcfg=mcfg, ema=None, step=0,
                                  forward_step=DiTForwardStep(FlowObjective(0, 0.0, None)), schedule=LRSchedule(cfg.optim, 100),
                                  guard=NonFiniteGuard(100))
        batch = make_batch(dit, T, H, W, 64).to(dev)
        cfg.data.token_budget, cfg.data.max_batch_size, cfg.data.text_len = batch.num_tokens, 1, 64
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        Trainer.train_step(trainer, [batch])
        _sync(dev)
        steps = 3 if not cpu else 1
        t0 = time.perf_counter()
        for _ in range(steps):
            Trainer.train_step(trainer, [batch])
        _sync(dev)
        dt = (time.perf_counter() - t0) / steps
        flops = mugdit_flops_per_sample(dit, T, H, W, 64)
        peak = peak_bf16_flops() if dev.type == "cuda" else None
        mfu = f"MFU {flops / dt / peak:.1%}" if peak else "MFU n/a (no GPU peak)"
        mem = (f", max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
               if dev.type == "cuda" else "")
        say(f"train-{batch.num_tokens // 1000}k", f"{preset} {batch.num_tokens} tokens: {batch.num_tokens / dt:.0f} "
            f"tokens/s, {mfu}; plan activations {activation_bytes(cfg, dit) / 2**30:.2f} GiB{mem}")
        sd = {k: v.detach().cpu() for k, v in unwrap(model[0]).state_dict().items() if isinstance(v, torch.Tensor)}
        del model, optimizer, trainer
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.pt")
        t0 = time.perf_counter()
        torch.save(sd, path)
        t1 = time.perf_counter()
        torch.load(path, weights_only=True)
        t2 = time.perf_counter()
    mib = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
    say("checkpoint", f"{preset} weights {mib:.0f} MiB: save {t1 - t0:.2f} s, load {t2 - t1:.2f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="reduced form on the CPU (tiny model)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        p.error("no GPU: run with --cpu for the reduced form")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if args.cpu:
        torch.set_num_threads(1)
    from mugv.models import MUGDiTConfig
    from mugv.parallel.runtime import init_distributed

    dev = init_distributed(seed=0).device
    say("device", torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (reduced form)")
    dit = MUGDiTConfig(hidden_size=288 if args.cpu else 1152, depth=1, num_heads=4 if args.cpu else 16)
    te_parity(dit, dev)
    fp8_step(dit, dev)
    attention(dev)
    if args.cpu:
        train("mugdit_tiny", [(2, 16, 16)], dev, cpu=True)
    else:  # ~8k and ~50k tokens per sample
        train("mugdit_1b", [(5, 64, 100), (14, 90, 160)], dev, cpu=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
