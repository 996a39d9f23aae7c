"""Megatron DDP whose linear weights' gradients are written by the step's first product, not
zeroed and then added to (CPU).

Megatron's DDP zeroes its whole fp32 gradient buffer at the start of every step, and the
linears (with gradient_accumulation_fusion) then add their weight gradients into it. On CPU,
where mugv.parallel.cpu_compat provides that accumulation, the zeroing is a pass over 4 bytes
per parameter that costs ~1.5% of a small model's step (tools/bench_step.py). WriteFirstDDP
zeroes only the rest of the buffer (biases, norms, embedders: whatever DDP's hooks add to) and
marks each linear weight's main_grad UNWRITTEN; the accumulation assigns the first product of
the step and adds the later ones (more micro-batches, a weight used twice). A weight that got
no gradient in the step is zeroed before anything reads the buffer: the gradient sync (start /
finish_grad_sync, which mugv.parallel.grads.finalize_grads calls first) clears what is still
marked.

Only where the accumulation is the CPU shim's: with apex or Transformer Engine kernels (GPU),
or without gradient_accumulation_fusion, it is Megatron's DDP unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from mugv.parallel.cpu_compat import UNWRITTEN, cpu_shims_installed


class WriteFirstDDP(DistributedDataParallel):
    def __init__(self, config, ddp_config, module, **kwargs):
        super().__init__(config=config, ddp_config=ddp_config, module=module, **kwargs)
        self.write_first: list[torch.Tensor] = []  # main_grads the wgrad GEMM writes
        self._zero_ranges: list[torch.Tensor] = []  # the rest of the buffers, in runs
        if not (cpu_shims_installed() and config.gradient_accumulation_fusion):
            return
        weights = {
            m.weight for m in module.modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.weight.requires_grad
        }
        for buffer in self.buffers + self.expert_parallel_buffers:
            taken = sorted(buffer.param_index_map[p][:2] for p in buffer.param_index_map if p in weights)
            start = 0
            for begin, end in [*taken, (buffer.grad_data.numel(), None)]:
                if begin > start:
                    self._zero_ranges.append(buffer.grad_data[start:begin])
                start = end if end is not None else start
            self.write_first += [p.main_grad for p in buffer.param_index_map if p in weights]

    def zero_grad_buffer(self):
        if not self.write_first:
            return super().zero_grad_buffer()
        for param in self.params_with_grad:
            param.grad_added_to_main_grad = False
        for grad in self._zero_ranges:
            grad.zero_()
        for grad in self.write_first:
            setattr(grad, UNWRITTEN, True)
        for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
            bucket_group.reset()

    def _zero_unwritten(self) -> None:
        for grad in self.write_first:
            if getattr(grad, UNWRITTEN, False):
                grad.zero_()
                setattr(grad, UNWRITTEN, False)

    def start_grad_sync(self, *args, **kwargs):
        self._zero_unwritten()
        return super().start_grad_sync(*args, **kwargs)

    def finish_grad_sync(self, *args, **kwargs):
        self._zero_unwritten()
        return super().finish_grad_sync(*args, **kwargs)
