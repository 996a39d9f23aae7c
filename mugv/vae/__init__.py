"""The MUG-V video VAE (release `vae.pt` layout, SPEC section 5)."""

from mugv.vae.video_vae import VideoVAE, VideoVAEConfig, latent_frames, pixel_frames

__all__ = ["VideoVAE", "VideoVAEConfig", "latent_frames", "pixel_frames"]
