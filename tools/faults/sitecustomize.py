"""Fault injection for tests and tools/fault_drill.py: put this directory on PYTHONPATH and set

    MUGV_FAULT="<what>:rank=<r>:step=<s>[:attempt=<a>][:seconds=<t>]"   (several: separated by ";")

and the training processes of an unmodified `mugv train` run misbehave at that step: `kill`
(SIGKILL to itself), `sleep` (<t> seconds inside the step, before its forward pass), `exit`
(os._exit(1)). `step` is the number of updates done before the step; `attempt` (default 0) is
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


def _patch(module):
    import signal
    import time

    original = module.Trainer.train_step
    faults = _faults()

    def train_step(self, batches):
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        for what, rank, step, when, seconds in faults:
            if self.dist.rank == rank and self.step == step and attempt == when:
                print(f"[fault] rank {rank} step {step} attempt {attempt}: {what}", file=sys.stderr, flush=True)
                if what == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif what == "sleep":
                    time.sleep(seconds)
                elif what == "exit":
                    os._exit(1)
        return original(self, batches)

    module.Trainer.train_step = train_step


class _Finder:
    """Patches mugv.training.trainer right after it is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "mugv.training.trainer":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            spec.loader.exec_module = exec_module
        return spec


if _SPEC and "RANK" in os.environ:
    sys.meta_path.insert(0, _Finder())
