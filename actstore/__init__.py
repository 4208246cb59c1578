"""actstore: every self-attention activation of a latent diffusion model, as a data product."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
