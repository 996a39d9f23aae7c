"""Fault injection for tests and tools/fault_drill.py: put this directory on PYTHONPATH and set

    MUGV_FAULT="<what>:rank=<r>:step=<s>[:attempt=<a>][:seconds=<t>]"   (several: separated by ";")

and the training processes of an unmodified `mugv train` run misbehave at that step: `kill`
(SIGKILL to itself), `sleep` (<t> seconds inside the step, before its forward pass), `exit`
(os._exit(1)); `killsave` (SIGKILL once the checkpoint of that step is written, before it is
published), `killprune` (SIGKILL while pruning, after a marker was deleted, at the save of that
step). `step` is the number of updates done before the step; `attempt` (default 0) is
torchrun's restart count, so a fault can hit the first attempt only. Python imports
`sitecustomize` at start-up; without MUGV_FAULT (and outside a training rank) this does nothing.
"""

import os
import sys

_SPEC = os.environ.get("MUGV_FAULT", "")


def _faults():
    out = []
    for item in filter(None, _SPEC.split(";")):
        what, *fields = item.split(":")
        kv = dict(f.split("=", 1) for f in fields)
        out.append((what, int(kv["rank"]), int(kv["step"]), int(kv.get("attempt", 0)), float(kv.get("seconds", 0))))
    return out


def _hit(rank, step, what):
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for kind, r, s, a, seconds in _faults():
        if kind == what and rank == r and step == s and attempt == a:
            print(f"[fault] rank {rank} step {step} attempt {attempt}: {what}", file=sys.stderr, flush=True)
            return seconds if seconds else True
    return None


def _patch_trainer(module):
    import signal
    import time

    original = module.Trainer.train_step

    def train_step(self, batches):
        if _hit(self.dist.rank, self.step, "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if seconds := _hit(self.dist.rank, self.step, "sleep"):
            time.sleep(seconds)
        if _hit(self.dist.rank, self.step, "exit"):
            os._exit(1)
        return original(self, batches)

    module.Trainer.train_step = train_step


def _patch_checkpointer(module):
    import signal

    import torch.distributed as dist

    publish, remove = module.Checkpointer._publish, module.remove_checkpoint

    def _publish(self, step, tmp, final, own):
        if _hit(dist.get_rank(), step, "killsave"):
            os.kill(os.getpid(), signal.SIGKILL)
        self._step = step
        return publish(self, step, tmp, final, own)

    def remove_checkpoint(path):
        if os.path.exists(os.path.join(path, "complete.json")):
            os.remove(os.path.join(path, "complete.json"))
        if _hit(dist.get_rank(), getattr(module.Checkpointer, "_fault_step", -1), "killprune") is None:
            return remove(path)
        os.kill(os.getpid(), signal.SIGKILL)

    def prune(self):
        module.Checkpointer._fault_step = self._step
        return original_prune(self)

    original_prune = module.Checkpointer._prune
    module.Checkpointer._publish, module.Checkpointer._prune = _publish, prune
    module.remove_checkpoint = remove_checkpoint


_PATCHES = {"mugv.training.trainer": _patch_trainer, "mugv.checkpoint.checkpointer": _patch_checkpointer}


class _Finder:
    """Patches the modules of _PATCHES right after they are imported."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _PATCHES[name](module)

            spec.loader.exec_module = exec_module
        return spec


if _SPEC and "RANK" in os.environ:
    sys.meta_path.insert(0, _Finder())
