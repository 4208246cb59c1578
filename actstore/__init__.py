"""actstore: every self-attention activation of a latent diffusion model, as a data product.

``import actstore`` stays light (no torch): the reader is imported on first use.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1

__all__ = ["open_store", "__version__", "SCHEMA_VERSION"]


def __getattr__(name: str):
    if name == "open_store":
        from actstore.store.view import open_store
        return open_store
    raise AttributeError(name)
