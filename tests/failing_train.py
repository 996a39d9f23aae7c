"""A training run under torchrun whose rank 1 raises at step 3 (tests/test_checkpoint_scale.py)."""

import sys

from mugv.config import load_config
from mugv.training import trainer as trainer_module
from mugv.training.config import TrainConfig


def main() -> int:
    original = trainer_module.Trainer.train_step

    def train_step(self, batches):
        if self.dist.rank == 1 and self.step == 3:
            raise RuntimeError("injected failure in step 3")
        return original(self, batches)

    trainer_module.Trainer.train_step = train_step
    return trainer_module.train(load_config(TrainConfig, None, sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
