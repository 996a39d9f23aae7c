"""T5 encoder wrapper: prompts -> (y [B, 1, L, C], mask [B, L]) as the release feeds MUGDiT.

Weights and tokenizer come from a local directory only (a Hugging Face `save_pretrained`
layout, e.g. the DeepFloyd/t5-v1_1-xxl files); nothing is downloaded.
"""

from __future__ import annotations

import os

import torch

from mugv.utils.logging import get_logger


class T5TextEncoder:
    """Tokenise (pad to `max_length`, truncate, EOS appended) and run a T5 encoder.

    `device` defaults to CUDA when available; `dtype` to bfloat16 on GPU, float32 on CPU.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        max_length: int = 300,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        from transformers import AutoTokenizer, T5EncoderModel

        self.model_dir = os.fspath(model_dir)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"T5 model directory not found: {self.model_dir}")
        if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            raise FileNotFoundError(
                f"{self.model_dir} has no config.json (expected a save_pretrained T5 directory)"
            )
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model = T5EncoderModel.from_pretrained(
                self.model_dir, local_files_only=True, dtype=self.dtype
            )
        except (OSError, ValueError) as err:
            raise OSError(f"cannot load a T5 encoder + tokenizer from {self.model_dir}: {err}") from err
        self.model = model.to(self.device).eval().requires_grad_(False)
        get_logger(__name__).info(
            "T5 encoder from %s: d_model %d, %s on %s",
            self.model_dir,
            self.hidden_size,
            self.dtype,
            self.device,
        )

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids [B, max_length] long, mask [B, max_length] bool)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"].bool()

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (y [B, 1, max_length, d_model] in `dtype`, mask [B, max_length] bool), on `device`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = [
            self.model(input_ids=i, attention_mask=m.long()).last_hidden_state
            for i, m in zip(ids.split(batch_size), mask.split(batch_size), strict=True)
        ]
        y = torch.cat(states)[:, None]  # [B, L, C] -> [B, 1, L, C]
        return y, mask
