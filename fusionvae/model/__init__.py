"""The model's maths: layers and cells, distributions, view aggregation, latent groups, the network
(``NetworkConfig``), the objective, regularisers and image sampling. Plain PyTorch: no Lightning, no
Hydra. Imports only ``fusionvae.errors`` / ``fusionvae.settings`` below it."""
