"""Shared pieces of the trainer tests: a tiny synthetic dataset and run config, and workers that
run the real Trainer on gloo ranks."""

from __future__ import annotations

import os

import torch

from mugv.data.synthetic import write_synthetic_dataset

SHAPES = {(1, 4, 4): 4, (2, 4, 6): 4}  # latent (T, H, W) -> samples: images and 2-frame clips


def dataset(root: str, shapes=None) -> str:
    path = os.path.join(root, "ds")
    if not os.path.isdir(path):
        write_synthetic_dataset(path, shapes or SHAPES, text_dim=32, text_len=8)
    return path


def overrides(run_dir: str, data: str, steps: int, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", f"data.paths=[{data}]", "data.num_workers=0", "data.token_budget=100",
        "model.caption_channels=32", f"train.steps={steps}", "logging.interval=1",
        "logging.tensorboard=false", "checkpoint.interval=0", "ema.decay=0.9", "optim.lr=1e-3",
        *extra,
    ]


def release_params(trainer) -> dict[str, torch.Tensor]:
    """The trainer's current weights in the release layout (collective over TP; PP ranks hold parts)."""
    from tests.megatron_parity import to_release

    return to_release(trainer.model, "data", False, trainer.dit.num_heads)


def train_worker(rank, world, ovr: list[str], kill_on_save_step: int | None = None):
    from mugv.checkpoint import checkpointer as checkpointing
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    if kill_on_save_step is not None:  # die after the shards of that save are written, before publishing
        original = checkpointing.write_json_atomic

        def dying(path, obj):
            if path.endswith(checkpointing.COMPLETE) and obj.get("step") == kill_on_save_step:
                os._exit(17)
            return original(path, obj)

        checkpointing.write_json_atomic = dying
    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.run()
    return dict(history=trainer.history, logged=trainer.logged, params=release_params(trainer), step=trainer.step)


def load_worker(rank, world, ovr: list[str]):
    """Build at this layout, resume from the run's latest checkpoint, return weights; then train."""
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.resume()
    loaded = release_params(trainer)
    start = trainer.step
    trainer.run()
    return dict(loaded=loaded, start=start, history=trainer.history, step=trainer.step)


def base_checkpoint(root: str, seed: int = 3) -> str:
    """A weights-only checkpoint of a random tiny MUGDiT (the trainer's model: mugdit_tiny with 32
    text channels), as `mugv convert from-hf` writes it: the frozen base of LoRA runs."""
    from mugv.convert import from_hf
    from mugv.models import MUGDiT, MUGDiTConfig
    from mugv.models.mugdit import PRESETS

    out = os.path.join(root, "base_ckpt")
    if not os.path.isdir(out):
        torch.manual_seed(seed)
        model = MUGDiT(MUGDiTConfig(**{**PRESETS["mugdit_tiny"], "caption_channels": 32}))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        dit = os.path.join(root, "base_dit.pt")
        model.export_release(dit)
        from_hf(dit, out)
    return out


def lora_overrides(base: str, *extra: str) -> list[str]:
    return ["lora.rank=4", "lora.alpha=8", f"train.init_from={base}", *extra]


def processes_of(run_dir: str, below: bool = False) -> list[int]:
    """Live processes whose command line names the run directory `run_dir` (launcher, agent,
    ranks), or with `below` any run directory under it."""
    want = f"run_dir={run_dir}".encode() + (b"" if below else b"\0")
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if want in f.read() + b"\0":
                        out.append(int(pid))
            except OSError:
                pass
    return out


def assert_resume_is_exact(root: str, data: str, steps: int, *extra: str) -> str:
    """Train `steps` steps on 2 ranks in one go and, in run directory root/b, half of them, then
    resume to `steps`: the losses and final weights are bit-identical. Returns root/b."""
    from tests.dist_harness import run_distributed

    resumed = os.path.join(root, "b")
    full = run_distributed(train_worker, 2, overrides(os.path.join(root, "a"), data, steps, *extra), timeout=300)
    half = run_distributed(train_worker, 2, overrides(resumed, data, steps // 2, *extra), timeout=300)
    rest = run_distributed(train_worker, 2, overrides(resumed, data, steps, *extra), timeout=300)
    assert half[0]["history"] + rest[0]["history"] == full[0]["history"]
    for k, v in full[0]["params"].items():
        assert torch.equal(rest[0]["params"][k], v), k
    return resumed
