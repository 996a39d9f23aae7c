"""mugv's loggers, and the one place that configures logging (called by the CLI entry only).

Library modules only take a logger: `log = get_logger(__name__)` attaches nothing, so importing
mugv has no side effects and a program embedding it keeps its own logging set-up (records
propagate to the root logger as usual). `configure_logging()`, called once by `mugv`'s main
(and so in every process torchrun starts), gives the "mugv" logger one handler -- rank 0 at INFO,
other ranks only warnings and errors -- and filters the known third-party warnings that say
nothing actionable about a mugv run. `progress()` is the progress bar of long loops: tqdm on a
terminal, nothing otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

_ROOT = "mugv"
T = TypeVar("T")

# (message regex, category): warnings Megatron-Core / torch emit on every process that are
# expected in a mugv run -- optional GPU extras absent, deprecations inside Megatron's own calls
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),  # Megatron's own default cuda_graph_scope
    ("`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning),  # dist_checkpointing's load
    # Megatron's DDP reads .grad of its bucket views (non-leaf tensors) on purpose
    ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning),
)
# GPU-only advice, meaningless without CUDA
CPU_ONLY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("When using sequence parallelism it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
)  # fmt: skip


def get_logger(name: str | None = None) -> logging.Logger:
    """The "mugv" logger or one below it (`get_logger(__name__)`, `get_logger("train")`)."""
    if not name or name == _ROOT:
        return logging.getLogger(_ROOT)
    return logging.getLogger(name if name.startswith(_ROOT + ".") else f"{_ROOT}.{name}")


class _RankFilter(logging.Filter):
    """Drops records below WARNING on ranks other than 0 (unless MUGV_LOG_ALL_RANKS=1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        record.rank = rank
        if rank == 0 or os.environ.get("MUGV_LOG_ALL_RANKS") == "1":
            return True
        return record.levelno >= logging.WARNING


def configure_logging(level: str | None = None, cuda: bool | None = None) -> None:
    """Set up mugv's console logging and warning filters (idempotent). `level` defaults to
    $MUGV_LOG_LEVEL or INFO; `cuda` (default: whether CUDA is available) keeps GPU advice."""
    root = logging.getLogger(_ROOT)
    if not any(getattr(h, "_mugv", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s r%(rank)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter())
        handler._mugv = True
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level or os.environ.get("MUGV_LOG_LEVEL", "INFO"))
    if not sys.stderr.isatty():  # Hugging Face's own bars (transformers reads this at import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    for message, category in KNOWN_WARNINGS + (() if cuda else CPU_ONLY_WARNINGS):
        warnings.filterwarnings("ignore", message=message, category=category)


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """`items`, with a tqdm bar on stderr when it is a terminal (and tqdm is installed)."""
    if not sys.stderr.isatty():
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
