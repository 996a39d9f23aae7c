"""The DiT forward step's noise schedule: the SPEC shift from each sample's own size, or a fixed ratio."""

import torch

from mugv.data import DataConfig, LatentLoader
from mugv.data.synthetic import write_synthetic_dataset
from mugv.diffusion import shift_ratio, shift_sigma
from mugv.training.objective import FlowObjective


def test_timesteps_shift_by_sample_size_or_fixed_ratio(tmp_path):
    write_synthetic_dataset(str(tmp_path / "ds"), {(2, 4, 6): 4}, text_dim=8, text_len=4)
    loader = LatentLoader(DataConfig(paths=[str(tmp_path / "ds")], num_workers=0, token_budget=1000))
    batch = next(iter(loader))
    by_size, _ = FlowObjective(7, 0.0, None).noised_inputs(batch)
    unshifted, _ = FlowObjective(7, 0.0, None, shift_ratio=1.0).noised_inputs(batch)
    r = shift_ratio(batch.pixel_size[:, 0], batch.pixel_size[:, 1], 2)  # 32x48 px, 2 latent frames
    assert float(r[0]) < 1
    torch.testing.assert_close(by_size["timestep"], 1000 * shift_sigma(unshifted["timestep"] / 1000, r))
    again, _ = FlowObjective(7, 0.0, None).noised_inputs(batch)  # seeded by the micro-batch index
    torch.testing.assert_close(again["x"], by_size["x"], rtol=0, atol=0)
