"""Small helpers with no dependency on the rest of mugv."""

from mugv.utils.logging import get_logger

__all__ = ["get_logger"]
