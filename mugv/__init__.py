"""mugv: train MUG-V video diffusion transformers on Megatron-Core."""

__version__ = "0.1.0"
