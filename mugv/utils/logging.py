"""The one logger of mugv. Rank 0 logs at INFO; other ranks only warnings and errors."""

import logging
import os
import sys

_LOGGER_NAME = "mugv"


class _RankFilter(logging.Filter):
    """Drops records below WARNING on ranks other than 0 (unless MUGV_LOG_ALL_RANKS=1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        record.rank = rank
        if rank == 0 or os.environ.get("MUGV_LOG_ALL_RANKS") == "1":
            return True
        return record.levelno >= logging.WARNING


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the mugv logger (or a child of it); the handler is attached on first use."""
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s r%(rank)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("MUGV_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root if name is None else root.getChild(name)
