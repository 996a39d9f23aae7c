"""Megatron-Core on CPU + gloo through mugv.parallel: TP, DP (DDP + distributed optimizer),
pipeline schedules and dist_checkpointing resharding, each checked against a plain
single-process run of the same toy network.

Toy network: L residual blocks h <- h + fc2(gelu(fc1(h))), fc1 = ColumnParallelLinear(H, 2H),
fc2 = RowParallelLinear(2H, H), on [s, b, H] activations; loss = mean squared error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_harness import run_distributed

H, S = 8, 3  # hidden size, sequence length
ADAM = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-3)  # eps ~ |grad| so updates depend on magnitudes


# ---------------------------------------------------------------------------------------------
# Reference: full weights and the plain single-process model
# ---------------------------------------------------------------------------------------------


def full_weights(num_layers: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    return [dict(w1=r(2 * H, H), b1=r(2 * H), w2=r(H, 2 * H), b2=r(H)) for _ in range(num_layers)]


def make_batch(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, n, H, generator=g), torch.randn(S, n, H, generator=g)  # x, target [s, b, H]


def ref_forward(params: list[dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for p in params:
        x = x + F.linear(F.gelu(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"])
    return x


def ref_grads(num_layers: int, x, target, microbatches: int = 1):
    """Loss (mean over microbatches of the per-microbatch MSE) and its gradients."""
    params = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in full_weights(num_layers)]
    losses = [F.mse_loss(ref_forward(params, xm), tm) for xm, tm in zip(x.chunk(microbatches, 1), target.chunk(microbatches, 1))]
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), [{k: v.grad for k, v in p.items()} for p in params]


def ref_adam(num_layers: int, batches, **adam) -> list[dict[str, torch.Tensor]]:
    params = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in full_weights(num_layers)]
    opt = torch.optim.Adam([v for p in params for v in p.values()], **adam)
    for x, target in batches:
        opt.zero_grad()
        F.mse_loss(ref_forward(params, x), target).backward()
        opt.step()
    return [{k: v.detach() for k, v in p.items()} for p in params]


# ---------------------------------------------------------------------------------------------
# The Megatron toy model (built inside worker processes)
# ---------------------------------------------------------------------------------------------


def transformer_config(**kw):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, pipeline_dtype=torch.float32, **kw)


def build_toy(config, layer_ids: list[int], pre_process: bool = True, post_process: bool = True):
    """MegatronModule holding the blocks `layer_ids`, loaded with this TP rank's shard of full_weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    weights = full_weights(max(layer_ids) + 1)
    init = lambda w: torch.nn.init.zeros_(w)

    class Block(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.fc1 = ColumnParallelLinear(H, 2 * H, config=config, init_method=init, bias=True)
            self.fc2 = RowParallelLinear(2 * H, H, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False)
            with torch.no_grad():
                self.fc1.weight.copy_(w["w1"].chunk(tp, 0)[tp_rank])
                self.fc1.bias.copy_(w["b1"].chunk(tp, 0)[tp_rank])
                self.fc2.weight.copy_(w["w2"].chunk(tp, 1)[tp_rank])
                self.fc2.bias.copy_(w["b2"])

        def forward(self, h):
            return h + self.fc2(F.gelu(self.fc1(h)[0]))[0]

    class Toy(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.pre_process, self.post_process = pre_process, post_process
            self.layer_ids = layer_ids
            self.blocks = torch.nn.ModuleList(Block(weights[i]) for i in layer_ids)
            self.input_tensor = None

        def set_input_tensor(self, t):
            self.input_tensor = t[0] if isinstance(t, (list, tuple)) else t

        def forward(self, x):
            h = x if self.pre_process else self.input_tensor
            for block in self.blocks:
                h = block(h)
            return h

    return Toy()


def gather_full(model, ps_module) -> list[dict[str, torch.Tensor]]:
    """Full (TP-gathered) weights or grads of every block, from `model` via ps_module.get."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim)

    out = []
    for block in model.blocks:
        get = lambda p: ps_module(p).detach().clone()
        out.append(dict(w1=gather(get(block.fc1.weight), 0), b1=gather(get(block.fc1.bias), 0),
                        w2=gather(get(block.fc2.weight), 1), b2=get(block.fc2.bias)))
    return out


def assert_close_list(got, want, atol=1e-6, rtol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        for k in w:
            torch.testing.assert_close(g[k], w[k], atol=atol, rtol=rtol, msg=lambda m: f"layer {i} {k}: {m}")


# ---------------------------------------------------------------------------------------------
# (a) tensor parallel
# ---------------------------------------------------------------------------------------------


def _tp_worker(rank, world_size):
    from mugv.parallel import init_distributed

    init_distributed(tp=2)
    model = build_toy(transformer_config(), [0, 1])
    x, target = make_batch(4)
    out = model(x)
    loss = F.mse_loss(out, target)
    loss.backward()
    return out.detach(), gather_full(model, lambda p: p.grad)


def test_tensor_parallel_matches_single_process():
    x, target = make_batch(4)
    want_out = ref_forward(full_weights(2), x)
    _, want_grads = ref_grads(2, x, target)
    for out, grads in run_distributed(_tp_worker, 2):
        torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
        assert_close_list(grads, want_grads)
