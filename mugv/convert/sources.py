"""Where MUGDiT weights come from: release `dit.pt`, HF directories, Megatron checkpoints.

Path rules (used by `mugv convert` and `mugv sample`):
  * a file                      -> a release `dit.pt` (flat torch.save dict, release layout)
  * a directory with config.json and safetensors -> an HF directory (MUGDiT.save_pretrained / to-hf)
  * anything else -> a Megatron checkpoint, a checkpoints root or a run directory, found by the
    one locator (mugv.checkpoint.resolve)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch

from mugv.models.mugdit import CONFIG_NAME, MUGDiT, MUGDiTConfig, load_pretrained_config, read_config_json
from mugv.utils.checkpoint_io import SAFE_INDEX, SAFE_SINGLE, check_finite, load_release_state_dict


def is_hf_dir(path: str) -> bool:
    has_weights = any(os.path.isfile(os.path.join(path, f)) for f in (SAFE_SINGLE, SAFE_INDEX))
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and has_weights


def parse_config_arg(value: str) -> MUGDiTConfig:
    """A preset name (e.g. mugdit_10b) or a JSON file of MUGDiTConfig fields (an HF config.json
    with model_type "mugdit" is accepted too)."""
    if os.path.isfile(value):
        return read_config_json(value)
    return MUGDiTConfig.from_preset(value)


def infer_config(shapes: dict[str, tuple[int, ...]], name: str) -> MUGDiTConfig:
    """Read the architecture off release-layout tensor shapes (norm eps and RoPE settings are
    not stored in the weights and keep their defaults)."""
    try:
        C = shapes["start_token"][0]
        head_dim = shapes["blocks.0.attn.q_norm.weight"][0]
        depth = sum(1 for k in shapes if k.startswith("blocks.") and k.endswith(".scale_shift_table"))
        return MUGDiTConfig(
            hidden_size=C,
            depth=depth,
            num_heads=C // head_dim,
            in_channels=shapes["x_embedder.proj.weight"][1],
            out_channels=shapes["final_layer.linear.weight"][0] // 4,
            caption_channels=shapes["y_embedder.y_proj.fc1.weight"][1],
            mlp_ratio=shapes["blocks.0.mlp.fc1.weight"][0] // C,
            frequency_embedding_size=shapes["t_embedder.mlp.0.weight"][1],
        )
    except KeyError as err:
        raise ValueError(
            f"{name}: cannot infer the MUGDiT config, key {err} is missing; pass --config"
        ) from None


def expected_shapes(config: MUGDiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MUGDiT(config).state_dict().items()}


def check_release_shapes(shapes: dict[str, tuple[int, ...]], config: MUGDiTConfig, name: str) -> None:
    """Exactly the release keys for `config`, with the release shapes."""
    want = expected_shapes(config)
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match the MUGDiT config {config}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for k, shape in want.items():
        if tuple(shapes[k]) != shape:
            raise ValueError(
                f"{name}: {k} has shape {list(shapes[k])}, expected {list(shape)} for this config"
            )


class ReleaseSource:
    """Release-layout tensors of a `dit.pt` or an HF directory, read one at a time.

    dit.pt is memory-mapped (torch.load mmap=True), so get() touches only the bytes of one tensor;
    HF shards are opened with safetensors and each tensor is read on request.
    """

    def __init__(self, path: str, config: MUGDiTConfig | None = None):
        self.path = path
        self._get: Callable[[str], torch.Tensor]
        if os.path.isfile(path):
            tensors = load_release_state_dict(path)
            self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            self._get = tensors.__getitem__
            self.config = config or infer_config(self.shapes, path)
        elif os.path.isdir(path) and is_hf_dir(path):
            self.shapes, files = _safetensors_shapes(path)
            self._get = lambda k: _read_safetensor(files[k], k)
            self.config = load_pretrained_config(path)
            if config is not None and config != self.config:
                raise ValueError(f"--config {config} disagrees with {path}/{CONFIG_NAME}: {self.config}")
        else:
            raise FileNotFoundError(
                f"{path} is neither a release dit.pt file nor an HF directory ({CONFIG_NAME} + safetensors)"
            )
        check_release_shapes(self.shapes, self.config, path)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        """The tensor (ValueError naming it if it holds NaN / Inf)."""
        return check_finite(self._get(key), key, self.path)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.shapes:
            yield k, self.get(k)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return [SAFE_SINGLE]


def _safetensors_shapes(directory: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    shapes, files = {}, {}
    for fname in _safetensors_files(directory):
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: shard {fname} listed in the index is missing")
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
                files[k] = path
    return shapes, files


def _read_safetensor(path: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)
