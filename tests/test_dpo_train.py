"""Flow-DPO through the real Trainer on CPU + gloo: it learns a systematic preference (held-out
reward accuracy rises from 0.5 to >= 0.9), and a resumed run keeps the reference it started from."""

import torch

from mugv.data.synthetic import write_synthetic_pairs
from tests.dist_harness import run_distributed
from tests.trainer_utils import dataset, overrides, release_params, train_worker


def dpo_worker(rank, world, ovr):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.resume()
    start = release_params(trainer)
    trainer.run()
    return dict(start=start, end=release_params(trainer), history=trainer.history,
                logged=[v for v in trainer.logged if v])


@torch.no_grad()
def heldout_accuracy(policy_sd, reference_sd, heldout, draws=4):
    """Share of held-out pairs (x noise draws) where the policy lowered its flow error relative to
    the reference more on the chosen clip than on the rejected one (ties 1/2); computed here from
    flow_loss, not from the objective's own margin, so a sign error in the loss shows."""
    from mugv.data import DataConfig, LatentLoader
    from mugv.diffusion import flow_loss
    from mugv.models import MUGDiT
    from mugv.training.config import ModelConfig
    from mugv.training.dpo import FlowDPOObjective, reward_accuracy, reward_margins

    models = []
    for sd in (policy_sd, reference_sd):
        m = MUGDiT(ModelConfig(caption_channels=32).build()).eval()
        m.load_state_dict(sd, strict=True)
        models.append(m)
    loader = LatentLoader(DataConfig(paths=[heldout], num_workers=0, token_budget=10000))
    batch = next(iter(loader))
    assert len(batch) == 32  # all 16 held-out pairs
    acc = []
    for k in range(draws):
        objective = FlowDPOObjective(100 + k, 0.0, None)
        inputs, target = objective.noised_inputs(batch)  # per-pair draws
        policy, reference = (flow_loss(m(**inputs), target, batch.x_mask) for m in models)
        d = policy - reference  # [2P]
        acc.append((d[0::2] < d[1::2]).float() + 0.5 * (d[0::2] == d[1::2]).float())
        # the library's held-out measure (tools/dpo_toy.py) agrees
        assert torch.equal(reward_accuracy(reward_margins(*models, batch, objective)), acc[-1])
    return float(torch.cat(acc).mean())


def dpo_overrides(run, data, steps, *extra):
    return overrides(run, data, steps, "train.objective=flow_dpo", "dpo.beta=100", "ema.decay=0",
                     "train.text_dropout=0", *extra)


def test_dpo_raises_heldout_reward_accuracy(tmp_path):
    train, heldout = str(tmp_path / "pairs"), str(tmp_path / "heldout")
    write_synthetic_pairs(train, {(1, 4, 4): 32}, text_dim=32, text_len=8, offset=0.5, seed=0)
    write_synthetic_pairs(heldout, {(1, 4, 4): 16}, text_dim=32, text_len=8, offset=0.5, seed=1)
    (r,) = run_distributed(dpo_worker, 1, dpo_overrides(str(tmp_path / "run"), train, 30), timeout=300)
    assert abs(r["history"][0] - 0.6931472) < 1e-6  # step 1: the reference is the policy, loss log 2
    before = heldout_accuracy(r["start"], r["start"], heldout)
    after = heldout_accuracy(r["end"], r["start"], heldout)
    print(f"held-out reward accuracy {before:.3f} -> {after:.3f}; training {r['logged'][0]['dpo/reward_accuracy']:.3f}"
          f" -> {r['logged'][-1]['dpo/reward_accuracy']:.3f}")
    assert before == 0.5 and after >= 0.9, (before, after)


def test_resumed_dpo_keeps_its_reference(tmp_path):
    """DPO from train.init_from: stopped and resumed, it reproduces the uninterrupted run bit for
    bit, so the reference is again the init_from weights, not the resumed policy."""
    init = str(tmp_path / "init")
    run_distributed(train_worker, 1, overrides(init, dataset(str(tmp_path)), 2), timeout=300)
    pairs = str(tmp_path / "pairs")
    write_synthetic_pairs(pairs, {(1, 4, 4): 8, (2, 4, 6): 8}, text_dim=32, text_len=8)
    extra = (f"train.init_from={init}", "checkpoint.interval=3")
    (full,) = run_distributed(dpo_worker, 1, dpo_overrides(str(tmp_path / "a"), pairs, 6, *extra), timeout=300)
    (half,) = run_distributed(dpo_worker, 1, dpo_overrides(str(tmp_path / "b"), pairs, 3, *extra), timeout=300)
    (rest,) = run_distributed(dpo_worker, 1, dpo_overrides(str(tmp_path / "b"), pairs, 6, *extra), timeout=300)
    assert abs(full["history"][0] - 0.6931472) < 1e-6
    assert half["history"] + rest["history"] == full["history"]
    assert all(torch.equal(rest["end"][k], v) for k, v in full["end"].items())


def test_lora_dpo_starts_with_fresh_adapters_on_full_weights(tmp_path):
    """LoRA DPO: the reference is the network with its adapters off, so the run starts with fresh
    adapters (B = 0: step 1's loss is log 2) on full weights. (From a LoRA checkpoint: fresh
    adapters on its merged weights, tests/test_lora_merged_init.py.)"""
    data = dataset(str(tmp_path))
    init = str(tmp_path / "init")
    run_distributed(train_worker, 1, overrides(init, data, 2), timeout=300)
    pairs = str(tmp_path / "pairs")
    write_synthetic_pairs(pairs, {(1, 4, 4): 8}, text_dim=32, text_len=8)
    (r,) = run_distributed(dpo_worker, 1, dpo_overrides(str(tmp_path / "dpo"), pairs, 2, "lora.rank=4", "lora.alpha=4",
                                                        f"train.init_from={init}"), timeout=300)
    assert abs(r["history"][0] - 0.6931472) < 1e-6 and abs(r["history"][1] - 0.6931472) > 1e-6
