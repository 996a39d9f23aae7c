"""The reference model of preference optimisation (mugv.training.dpo), behind one small interface:

    ref = make_reference(mcfg, model)           # model: this rank's (DDP-wrapped) policy chunks
    out = ref.forward(chunk, inputs, hidden)    # no grad; chunk: the policy chunk being run
    ref.load(path, use_ema)                     # the weights of a checkpoint (train.init_from)

Two kinds:

  FrozenCopy   full-parameter DPO: a second set of this rank's chunks at the same layout (same
               TP/PP/CP sharding, same dtype), weights only: no gradients, no optimizer state,
               no EMA, no DDP buffers. It starts as a copy of the policy's initial weights and
               loads train.init_from when the run has one, also on resume, so the reference is
               always the weights the run started from (of a LoRA checkpoint: its merged
               weights, built per rank as the policy's start, mugv.checkpoint.merged). Its
               memory is shown by --dry-run.
  AdaptersOff  LoRA: the policy network itself with its adapters switched off
               (mugv.models.megatron.lora.adapters_disabled): no second copy. Started from a
               LoRA checkpoint (an SFT run), the policy's frozen base is that checkpoint's merged
               weights and its adapters are fresh, so the reference is the SFT model.

Under pipeline parallelism the reference runs through the same pipeline as the policy, in the
same forward step: each stage runs the reference chunk (no grad) next to the policy chunk, and
the two hidden states travel to the next stage as one tensor (policy, then reference, along the
sequence dim; see mugv.training.step). `hidden` is the reference's half of what this stage
received (None on the first stage).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import Float16Module

from mugv.checkpoint.keys import unwrap
from mugv.models.megatron import build_model_chunks


def _lora():
    """mugv.models.megatron.lora, where this build has it."""
    try:
        from mugv.models.megatron import lora
    except ImportError:
        return None
    return lora


class FrozenCopy:
    kind = "frozen copy"

    def __init__(self, mcfg, model: list, device: torch.device):
        chunks = [c.to(device) for c in build_model_chunks(mcfg)]
        if mcfg.bf16:
            chunks = [Float16Module(mcfg, c) for c in chunks]
        self.chunks = chunks
        self.by_stage = {unwrap(c).vp_stage: c for c in chunks}
        for c in chunks:
            c.requires_grad_(False)
        self.copy_from(model)

    @torch.no_grad()
    def copy_from(self, model: list) -> None:
        """This rank's weights of the policy chunks (same layout)."""
        for ref, policy in zip(self.chunks, model, strict=True):
            unwrap(ref).load_state_dict(unwrap(policy).state_dict(), strict=True)

    def load(self, path: str, use_ema: bool = False) -> None:
        """The weights of checkpoint `path` (a LoRA checkpoint's merged weights), this rank's share."""
        from mugv.checkpoint.merged import load_weights

        load_weights(path, self.chunks, use_ema)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for c in self.chunks for p in c.parameters())

    def forward(self, chunk, inputs: dict, hidden: torch.Tensor | None) -> torch.Tensor:
        ref = self.by_stage[unwrap(chunk).vp_stage]
        if hidden is not None:
            unwrap(ref).set_input_tensor(hidden)
        with torch.no_grad():
            return ref(**inputs)


class AdaptersOff:
    kind = "adapters off"
    param_bytes = 0

    def __init__(self, lora):
        self.lora = lora

    def load(self, path: str, use_ema: bool = False) -> None:
        """Nothing to load: the base weights are the policy's own frozen weights (those of `path`,
        merged if a LoRA checkpoint: mugv.training.lora.start_from)."""

    def forward(self, chunk, inputs: dict, hidden: torch.Tensor | None) -> torch.Tensor:
        if hidden is not None:
            unwrap(chunk).set_input_tensor(hidden)
        with torch.no_grad(), self.lora.adapters_disabled(chunk):
            return chunk(**inputs)


def make_reference(mcfg, model: list, device: torch.device):
    """AdaptersOff for a policy with LoRA adapters, else a FrozenCopy of the policy chunks."""
    lora = _lora()
    if lora is not None and any(lora.has_lora(m) for m in model):
        return AdaptersOff(lora)
    return FrozenCopy(mcfg, model, device)
