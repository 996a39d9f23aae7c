"""Flow-DPO on a toy preference, end to end on a CPU: does DPO learn what the pairs prefer?

    python tools/dpo_toy.py --out runs/dpo_toy        # prints the numbers; rerun to resume

1. data     the demo's moving shapes (mugv.demo.shapes), captioned WITHOUT their colour ("a circle
            moving right on a black background"), in the demo's four colours; the demo's PCA
            autoencoder fitted on them; a tiny random T5; `run_prep` -> an SFT dataset of clips.
            Preference pairs through `run_prep(pairs=...)` (the `mugv prep --pairs` path): one
            caption, shape, size, offset and motion, the chosen clip red, the rejected clip one of
            the other colours; a training set and a held-out set of other clips.
2. sft      rectified flow (train.objective=flow) on the colour-less clips: the model draws the
            captioned shape and motion in any of the four colours.
3. dpo      train.objective=flow_dpo from the SFT EMA weights (which are also the reference),
            --dpo-steps steps on the training pairs.
4. measure  held-out reward accuracy: per held-out pair and noise draw, whether the implicit reward
            prefers the chosen clip (z > 0; ties 1/2), for the SFT weights (the policy is then the
            reference: every z is 0, accuracy exactly 0.5) and for the DPO weights; and samples of
            colour-less captions from the SFT and the DPO model with the same noise, scored by the
            demo's colour measure (mugv.demo.score: nearest palette colour of the foreground):
            the share drawn red.

Everything runs through the library (the Trainer in one gloo process per stage, spawned).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHOSEN = "red"
SIZE, FRAMES, FPS = 64, 9, 8.0
MODEL = ("model.preset=mugdit_tiny", "model.hidden_size=96", "model.depth=2", "model.num_heads=2")


def colourless(spec) -> str:
    return f"a {spec.shape} moving {spec.direction} on a {spec.background} background"


def write_media(out: str, n_sft: int, n_pairs: int, n_heldout: int, seed: int) -> dict[str, str]:
    """Clips and the captions / pairs files: {"sft": csv, "pairs": csv, "heldout": csv}."""
    from mugv.demo.shapes import COLOURS, JITTER_O, JITTER_R, random_clips, render
    from mugv.utils.video import write_video

    done = {name: os.path.join(out, f"{name}.csv") for name in ("sft", "pairs", "heldout")}
    if all(os.path.exists(f) for f in done.values()):  # a rerun
        return done
    os.makedirs(os.path.join(out, "clips"), exist_ok=True)
    specs = random_clips(n_sft + n_pairs + n_heldout, seed, JITTER_R, JITTER_O)
    others = [c for c in COLOURS if c != CHOSEN]
    rng = np.random.default_rng(seed + 1)

    def clip(name, spec):
        path = os.path.join("clips", f"{name}.mp4")
        write_video(os.path.join(out, path), render(spec, FRAMES, SIZE), fps=FPS)
        return path

    files = {}
    rows = [(clip(f"sft{i:04d}", s), colourless(s)) for i, s in enumerate(specs[:n_sft])]
    files["sft"] = _csv(os.path.join(out, "sft.csv"), ["path", "caption"], rows)
    for name, part in (("pairs", specs[n_sft : n_sft + n_pairs]), ("heldout", specs[n_sft + n_pairs :])):
        rows = []
        for i, s in enumerate(part):
            good = dataclasses.replace(s, colour=CHOSEN)
            bad = dataclasses.replace(s, colour=others[rng.integers(len(others))])
            rows.append((colourless(s), clip(f"{name}{i:04d}_c", good), clip(f"{name}{i:04d}_r", bad)))
        files[name] = _csv(os.path.join(out, f"{name}.csv"), ["caption", "chosen", "rejected"], rows)
    return files


def _csv(path: str, header: list[str], rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def prep(out: str, files: dict[str, str], seed: int) -> dict[str, str]:
    """Autoencoder + tiny T5 + run_prep of the three files -> {"sft", "pairs", "heldout", "ae", "t5"}."""
    from mugv.data.buckets import BucketTableConfig
    from mugv.data.prep import PrepConfig, run_prep
    from mugv.demo.data import DemoDataConfig, load_prep_pixels
    from mugv.text import T5TextEncoder, make_tiny_t5
    from mugv.vae.pca import PCAAutoencoder

    data = DemoDataConfig(frames=FRAMES, size=SIZE, fps=FPS, seed=seed)
    ae_path = os.path.join(out, "ae", "pca_ae.safetensors")
    if os.path.exists(ae_path):  # a rerun: the datasets were encoded with this one
        ae = PCAAutoencoder.load(ae_path)
    else:
        ae = PCAAutoencoder.fit(load_prep_pixels(files["sft"], data)[0], seed=seed)
        ae.save(ae_path)
    paths = {"ae": ae_path, "t5": make_tiny_t5(os.path.join(out, "t5"), d_model=data.t5_dim, seed=seed)}
    text = T5TextEncoder(paths["t5"], max_length=data.text_length, device="cpu")
    buckets = BucketTableConfig(sizes=[f"{SIZE}x{SIZE}"], num_frames=[FRAMES])
    for name, file in files.items():
        kind = {"captions": file} if name == "sft" else {"pairs": file}
        cfg = PrepConfig(output=os.path.join(out, "data", name), buckets=buckets, fps=FPS, text_dtype="float32", **kind)
        cfg.validate()
        summary = run_prep(cfg, ae, text, rank=0, world_size=1)
        if summary.failures:
            raise RuntimeError(f"prep of {file} failed: {summary.format()}")
        paths[name] = cfg.output
    return paths


def _train(rank, world, overrides: list[str]):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer
    from mugv.utils.logging import configure_logging

    configure_logging()  # the metric lines of the run
    trainer = Trainer(load_config(TrainConfig, None, overrides))
    trainer.run()
    return [v for v in trainer.logged if v]


def train(run_dir: str, data: str, steps: int, *extra: str) -> list[dict]:
    """One stage in one spawned gloo process (16 clips = 8 pairs a step); its logged metrics. A rerun
    resumes from the stage's last checkpoint (a finished stage logs nothing)."""
    from mugv.parallel.launch import spawn

    overrides = [
        f"run_dir={run_dir}", f"data.paths=[{data}]", "data.num_workers=0", "data.text_len=64",
        "data.token_budget=550", f"train.steps={steps}", "train.shift_ratio=1.0", "logging.tensorboard=false",
        "logging.interval=50", "checkpoint.interval=100", "checkpoint.keep_last=1", *MODEL, *extra,
    ]
    return spawn(_train, 1, overrides, threads=torch.get_num_threads())[0]


def heldout_accuracy(policy, reference, heldout: str, beta: float, draws: int) -> float:
    """Mean reward accuracy over held-out pairs x `draws` noise draws (timesteps and noise)."""
    from mugv.data import DataConfig, LatentLoader
    from mugv.training.dpo import FlowDPOObjective, reward_accuracy, reward_margins

    loader = LatentLoader(DataConfig(paths=[heldout], num_workers=0, token_budget=4000, text_len=64))
    batches = [b for b, _ in zip(loader, range(loader.epoch_batches), strict=False)]
    acc = []
    for k in range(draws):
        objective = FlowDPOObjective(10_000 + k, 0.0, None, shift_ratio=1.0, beta=beta)
        acc += [reward_accuracy(reward_margins(policy, reference, b, objective)) for b in batches]
    return float(torch.cat(acc).mean())


def red_share(model, t5: str, ae_path: str, n: int, seed: int) -> tuple[float, dict[str, int]]:
    """Sample n colour-less captions (seed fixed) and count the colours drawn."""
    from mugv.demo.score import score_clip
    from mugv.demo.shapes import DIRECTIONS, SHAPES, ShapeClip
    from mugv.sampling import sample_latents
    from mugv.text import T5TextEncoder
    from mugv.utils.video import to_uint8_frames
    from mugv.vae.pca import PCAAutoencoder

    specs = [ShapeClip(SHAPES[i % 2], CHOSEN, "black", list(DIRECTIONS)[(i // 2) % 4], 0.2, 0.5) for i in range(n)]
    ae = PCAAutoencoder.load(ae_path)
    text = T5TextEncoder(t5, max_length=64, device="cpu")
    latents = sample_latents(model, text, [colourless(s) for s in specs], ae.latent_shape(FRAMES, SIZE, SIZE),
                             negative_prompt="", steps=20, guidance=4.0, seed=seed, fps=FPS, shift_ratio=1.0,
                             prompt_suffix="")
    counts: dict[str, int] = {}
    for spec, clip in zip(specs, ae.decode(latents).clamp(-1, 1), strict=True):
        seen = score_clip(np.asarray(to_uint8_frames(clip)), spec).seen_colour or "none"
        counts[seen] = counts.get(seen, 0) + 1
    return counts.get(CHOSEN, 0) / n, counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dpo_toy")
    p.add_argument("--sft-clips", type=int, default=256)
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--dpo-steps", type=int, default=100)
    p.add_argument("--beta", type=float, default=500.0)
    p.add_argument("--dpo-lr", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=4, help="noise draws per held-out pair")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from mugv.sampling import load_model

    t0 = time.monotonic()
    files = write_media(os.path.join(args.out, "media"), args.sft_clips, args.pairs, args.heldout, args.seed)
    paths = prep(args.out, files, args.seed)
    print(f"data: {args.sft_clips} SFT clips, {args.pairs} training pairs, {args.heldout} held-out pairs "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    sft_dir, dpo_dir = os.path.join(args.out, "sft"), os.path.join(args.out, "dpo")
    t0 = time.monotonic()
    logs = train(sft_dir, paths["sft"], args.sft_steps, "optim.lr=1e-3", "ema.decay=0.99", "train.text_dropout=0.1")
    if logs:
        print(f"sft: {args.sft_steps} steps, flow loss {logs[0]['loss/all']:.3f} -> {logs[-1]['loss/all']:.3f} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    t0 = time.monotonic()
    logs = train(dpo_dir, paths["pairs"], args.dpo_steps, "train.objective=flow_dpo", f"dpo.beta={args.beta}",
                 f"optim.lr={args.dpo_lr}", f"train.init_from={sft_dir}", "train.init_use_ema=true", "ema.decay=0",
                 "train.text_dropout=0", "logging.interval=10")
    if logs:
        print(f"dpo: {args.dpo_steps} steps, loss {logs[0]['loss/all']:.3f} -> {logs[-1]['loss/all']:.3f}, training "
              f"reward accuracy {logs[0]['dpo/reward_accuracy']:.3f} -> {logs[-1]['dpo/reward_accuracy']:.3f} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)

    sft = load_model(sft_dir, ema=True)  # the reference: the weights DPO started from
    dpo = load_model(dpo_dir)
    before = heldout_accuracy(sft, sft, paths["heldout"], args.beta, args.draws)
    after = heldout_accuracy(dpo, sft, paths["heldout"], args.beta, args.draws)
    print(f"held-out reward accuracy ({args.heldout} pairs x {args.draws} draws): before DPO {before:.3f}, "
          f"after {args.dpo_steps} DPO steps {after:.3f}")
    share_sft, counts_sft = red_share(sft, paths["t5"], paths["ae"], args.samples, args.seed)
    share_dpo, counts_dpo = red_share(dpo, paths["t5"], paths["ae"], args.samples, args.seed)
    print(f"samples drawn {CHOSEN} ({args.samples} colour-less captions, same noise): before DPO {share_sft:.3f} "
          f"{counts_sft}, after {share_dpo:.3f} {counts_dpo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
