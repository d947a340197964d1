"""LightningDataModules for the Fusion datasets.

Every loader yields a float32 tensor ``[B, K_max + 1, C, H, W]`` in [0, 1]: slots
``0..K_max-1`` are the corrupted views, the last slot is the clean target.
"""
