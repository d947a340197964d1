"""FusionVAE: a deep hierarchical conditional VAE fusing K noisy / occluded views into samples
of the clean image (Duffhauss et al., ECCV 2022)."""
