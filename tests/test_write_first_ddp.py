"""WriteFirstDDP (mugv.parallel.ddp): on CPU the linear weights' part of the gradient buffer is not
zeroed each step; the step's first weight-gradient product is written instead. Checked against
Megatron's DDP on the same weights and inputs, step by step: every main_grad equal, a weight
unused in a step ends the step with a zero gradient, more micro-batches accumulate; at DP 1 and
DP 2 with overlapped (bucketed) reduction."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.dist_harness import run_distributed

H = 16


def _build(config, seed: int):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule

    class Toy(MegatronModule):
        """Two linears (weights written first) and a gain and the biases (zeroed as before)."""

        def __init__(self):
            super().__init__(config)
            init = torch.nn.init.zeros_
            self.a = ColumnParallelLinear(H, H, config=config, init_method=init, bias=True, gather_output=True)
            self.b = RowParallelLinear(H, H, config=config, init_method=init, bias=True, input_is_parallel=False,
                                       skip_bias_add=False)
            self.gain = torch.nn.Parameter(torch.ones(H))
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in (self.a.weight, self.a.bias, self.b.weight, self.b.bias):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)

        def forward(self, x, use_b: bool):
            h = self.a(x)[0] * self.gain
            return h + self.b(torch.tanh(x))[0] if use_b else h

    return Toy()


# (use_b, micro-batches) per step: both linears, then `b` unused, then two micro-batches. With
# overlapped reduction Megatron needs every parameter's gradient in every step: `b` always runs.
STEPS = [(True, 1), (False, 1), (True, 2), (False, 2)]
OVERLAP_STEPS = [(True, 1), (True, 2), (True, 1)]


def _worker(rank, world_size, overlap):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from mugv.parallel import init_distributed
    from mugv.parallel.cpu_compat import UNWRITTEN
    from mugv.parallel.ddp import WriteFirstDDP

    init_distributed(tp=1)
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, gradient_accumulation_fusion=True)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=overlap, bucket_size=40 if overlap else None)
    ref = DistributedDataParallel(config, ddp_config, _build(config, 0))
    new = WriteFirstDDP(config, ddp_config, _build(config, 0))
    weights = [new.module.a.weight, new.module.b.weight]
    assert [id(g) for g in new.write_first] and {id(g) for g in new.write_first} == {id(w.main_grad) for w in weights}
    zeroed = sum(r.numel() for r in new._zero_ranges)
    total = sum(b.grad_data.numel() for b in new.buffers)
    assert zeroed == total - sum(w.numel() for w in weights)

    g = torch.Generator().manual_seed(100 + rank)
    report = []
    for step, (use_b, microbatches) in enumerate(OVERLAP_STEPS if overlap else STEPS):
        xs = [torch.randn(5, 1, H, generator=g) for _ in range(microbatches)]
        for model in (ref, new):
            model.zero_grad_buffer()
        kept = [w.main_grad.abs().sum().item() for w in weights]  # last step's values, not zeroed
        flagged = [getattr(w.main_grad, UNWRITTEN) for w in weights]
        for model in (ref, new):
            for i, x in enumerate(xs):
                with model.no_sync() if i < len(xs) - 1 else contextlib.nullcontext():  # sync on the last
                    model(x, use_b).square().sum().backward()
            model.finish_grad_sync()
        unwritten_after = [getattr(w.main_grad, UNWRITTEN) for w in weights]
        equal = all(
            torch.equal(p_ref.main_grad, p_new.main_grad)
            for p_ref, p_new in zip(ref.module.parameters(), new.module.parameters(), strict=True)
        )
        report.append({
            "step": step, "equal": equal, "kept": kept, "flagged": flagged, "unwritten_after": unwritten_after,
            "b_grad_zero": bool((new.module.b.weight.main_grad == 0).all()),
            "grads_nonzero": all(bool(p.main_grad.abs().sum() > 0) for p in new.module.a.parameters()),
        })
    return report


@pytest.mark.parametrize("world_size,overlap", [(1, False), (2, False), (2, True)], ids=["dp1", "dp2", "dp2_overlap"])
def test_write_first_ddp_equals_megatron_ddp(world_size, overlap):
    for report in run_distributed(_worker, world_size, overlap):
        for r in report:
            assert r["equal"], r
            assert r["flagged"] == [True, True], r  # zero_grad_buffer marked both weights
            assert r["unwritten_after"] == [False, False], r  # written, or zeroed by the sync
            assert r["grads_nonzero"], r
            if r["step"] > 0:
                assert r["kept"][0] > 0, r  # the weight's part of the buffer was not zeroed
        assert [r["b_grad_zero"] for r in report] == [not use_b for use_b, _ in (OVERLAP_STEPS if overlap else STEPS)]
