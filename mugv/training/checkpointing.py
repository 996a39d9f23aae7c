"""Checkpoints of a training run with Megatron's dist_checkpointing.

Layout: <run_dir>/checkpoints/step_XXXXXXXX/ is one dist_checkpointing directory holding the
weights (`model.*`), the EMA (`ema.*`), the distributed optimizer (fully reshardable) and the
common state (step, LR schedule, data-loader position, resolved config), plus
`model_config.json`, `config.yaml` and `complete.json`. It is written as `step_X.tmp` and
renamed only once every rank has finished, then `latest` is rewritten atomically -- so a save
killed midway leaves the previous checkpoint as the latest complete one. Keys are
layout-independent (see mugv.models.megatron.checkpoint): a checkpoint loads at any
TP/PP/CP/DP. All randomness of training is derived from (seed, micro-batch index), so the
data position and step are all a resumed run needs to continue exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from mugv.models.megatron.checkpoint import load_into_chunks, model_sharded_state_dict
from mugv.parallel.optim_state import prime_optimizer_state
from mugv.training import model_space
from mugv.utils.checkpoint_io import write_json_atomic
from mugv.utils.logging import get_logger

log = get_logger("checkpoint")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The newest complete checkpoint under ckpt_root (the `latest` file, else a scan)."""
    pointer = os.path.join(ckpt_root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(ckpt_root, f.read().strip())
        if is_complete(path):
            return path
        log.warning(f"{pointer} names {path}, which is not a complete checkpoint; scanning")
    if not os.path.isdir(ckpt_root):
        return None
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(ckpt_root)
        if (m := _STEP_DIR.match(name)) and is_complete(os.path.join(ckpt_root, name))
    )
    return os.path.join(ckpt_root, steps[-1][1]) if steps else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, a run directory or a checkpoints directory -> a complete checkpoint."""
    if is_complete(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest_checkpoint(root)
        if found:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {path}")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Checkpointer:
    """Saves every `interval` steps. With async_save the shards are staged to host memory and
    written by a background process while training goes on; the checkpoint is published (renamed
    and made `latest`) when every rank has finished -- checked each step by `maybe_finalize`."""

    def __init__(self, root: str, interval: int, keep_last: int, model_config: dict, config_yaml: str,
                 async_save: bool = False):
        self.root, self.interval, self.keep_last = root, interval, keep_last
        self.model_config, self.config_yaml = model_config, config_yaml
        self.queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def maybe_finalize(self, blocking: bool = False) -> None:
        """Publish finished asynchronous saves (collective: call on every rank)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def maybe_save(self, step: int, model, optimizer, ema, common: dict, force: bool = False) -> str | None:
        """Save every `interval` steps (or when forced); returns the checkpoint path if saved."""
        if force or (self.interval > 0 and step % self.interval == 0):
            return self.save(step, model, optimizer, ema, common)
        return None

    def save(self, step: int, model, optimizer, ema, common: dict) -> str:
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        self.maybe_finalize(blocking=True)  # one save in flight at a time
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        model_sd = model_sharded_state_dict(model)
        state = dict(model_sd)
        if ema is not None:
            state.update(ema.sharded_state_dict(model_sd))
        state.update(optimizer_sharded_state_dict(optimizer, model_sd))
        state["common"] = {**common, "optimizer": optimizer_common_state(optimizer)}
        if self.queue is not None:
            request = dist_checkpointing.save(state, tmp, async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(step, tmp, final))
            self.queue.schedule_async_request(request)
            return final
        dist_checkpointing.save(state, tmp)
        self._publish(step, tmp, final)
        return final

    def _publish(self, step: int, tmp: str, final: str) -> None:
        """Once every rank's shards are on disk: metadata, rename into place, point `latest` at it."""
        _barrier()
        if _rank() == 0:
            write_json_atomic(os.path.join(tmp, "model_config.json"), self.model_config)
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
            write_json_atomic(os.path.join(tmp, COMPLETE), {"step": step})
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            with open(os.path.join(self.root, "latest.tmp"), "w") as f:
                f.write(step_dir_name(step))
            os.replace(os.path.join(self.root, "latest.tmp"), os.path.join(self.root, "latest"))
            self._prune()
            log.info(f"saved checkpoint {final}")
        _barrier()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        steps = sorted(n for n in os.listdir(self.root) if _STEP_DIR.match(n))
        for name in steps[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def load_checkpoint(path: str, model, optimizer=None, ema=None, use_ema_weights: bool = False) -> dict:
    """Load weights (or the EMA as weights), and optionally optimizer and EMA, at the current
    layout. Returns the checkpoint's common state."""
    model_sd = model_sharded_state_dict(model)
    params_by_entry = {entry: st.data for entry, st in model_sd.items()}
    template: dict = {}
    if use_ema_weights:
        template.update({"ema." + k.split(".", 1)[1]: _fp32_like(st, "ema.") for k, st in model_sd.items()})
    else:
        template.update(model_sd)
    if ema is not None:
        template.update(ema.sharded_state_dict(model_sd, is_loading=True))
    if optimizer is not None:
        template.update(optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True))
    template["common"] = None
    loaded = dist_checkpointing.load(template, path)
    if use_ema_weights:
        load_into_chunks(model, {k: v for k, v in loaded.items()}, prefix="ema.")
    else:
        load_into_chunks(model, loaded)
    if ema is not None:
        ema.load(loaded, params_by_entry)
    common = loaded.get("common") or {}
    if optimizer is not None:
        if "optimizer" not in common:
            raise KeyError(f"{path}: no optimizer state (a weights-only checkpoint); load without the optimizer")
        load_optimizer_state(optimizer, loaded, params_by_entry, common["optimizer"])
    return common


# -- optimizer state: fp32 main params and Adam moments in model space ----------------------------


def optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool = False) -> dict:
    prime_optimizer_state(optimizer)  # torch Adam creates its moments lazily
    slices = model_space.optimizer_slices(optimizer)
    out = {}
    for name in model_space.OPTIM_STATES:
        tensors = None if is_loading else model_space.gather(model_sd, slices, lambda s, n=name: s.state[n])
        out.update(model_space.sharded(model_sd, f"optim.{name}.", tensors))
    return out


def optimizer_common_state(optimizer) -> dict:
    """Adam's update count (the same for every parameter; skipped steps do not count)."""
    steps = [
        int(st["step"]) for opt in model_space._optimizers(optimizer)
        for st in getattr(opt, "optimizer", opt).state.values() if "step" in st
    ]
    return {"adam_step": max(steps, default=0)}


def load_optimizer_state(optimizer, loaded: dict, params_by_entry: dict, common: dict) -> None:
    prime_optimizer_state(optimizer)
    slices = model_space.optimizer_slices(optimizer)
    for name in model_space.OPTIM_STATES:
        model_space.scatter(loaded, f"optim.{name}.", params_by_entry, slices, lambda s, v, n=name: s.state[n].copy_(v))
    for opt in model_space._optimizers(optimizer):
        for st in getattr(opt, "optimizer", opt).state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(common["adam_step"]))  # one tensor per parameter
    for opt in model_space._optimizers(optimizer):
        if hasattr(opt, "_copy_main_params_to_model_params"):
            opt._copy_main_params_to_model_params()  # bf16 model weights from the loaded fp32 main copy


def _fp32_like(st, prefix: str):
    key = prefix + st.key.split(".", 1)[1]
    return replace(st, key=key, data=torch.empty(st.data.shape, dtype=torch.float32, device=st.data.device),
                   dtype=torch.float32)


def read_model_config(path: str) -> dict:
    with open(os.path.join(path, "model_config.json")) as f:
        return json.load(f)
