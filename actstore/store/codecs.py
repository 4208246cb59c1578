"""Named compression settings for activation arrays.

Names, not codec objects, travel through the CLI, the catalog and the store's provenance,
so a store says in plain words how it was compressed and a reader needs nothing but zarr.
Activations are float16 noise-like values: byte shuffle (high bytes together) is what makes
them compressible at all; zstd level 1 keeps writing faster than the disk.

Blosc's own block size matters more than the level here: by default Blosc cuts a chunk
into blocks of a few tens of KB, and zstd on such small blocks of noise-like float16 both
compresses worse and runs slower. 1 MiB Blosc blocks (``BLOSC_BLOCKSIZE``; stored chunks
are a few of them) measured on toy activations, one core: zstd-1 340 -> 560 MB/s,
compression 1.10x -> 1.28x (``benchmarks/bench_store_write.py``).
"""

from __future__ import annotations

from zarr.codecs import BloscCodec
from zarr.codecs.numcodecs import BitRound

from actstore.errors import ActstoreError

ZSTD_SHUFFLE = "zstd"
ZSTD5_SHUFFLE = "zstd5"
LZ4_SHUFFLE = "lz4"
ZSTD_BITROUND8 = "zstd-bitround8"  # lossy: keeps 8 of float16's 10 mantissa bits
UNCOMPRESSED = "none"
DEFAULT_CODEC = ZSTD_SHUFFLE


BLOSC_BLOCKSIZE = 1 << 20  # bytes


def _blosc(cname: str, clevel: int) -> BloscCodec:
    return BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle", blocksize=BLOSC_BLOCKSIZE)


def codec_chain(name: str) -> dict:
    """``filters`` and ``compressors`` for :func:`zarr.create_array` under codec ``name``."""
    chains = {
        ZSTD_SHUFFLE: lambda: {"filters": (), "compressors": (_blosc("zstd", 1),)},
        ZSTD5_SHUFFLE: lambda: {"filters": (), "compressors": (_blosc("zstd", 5),)},
        LZ4_SHUFFLE: lambda: {"filters": (), "compressors": (_blosc("lz4", 5),)},
        ZSTD_BITROUND8: lambda: {"filters": (_bitround(8),), "compressors": (_blosc("zstd", 1),)},
        UNCOMPRESSED: lambda: {"filters": (), "compressors": ()},
    }
    if name not in chains:
        raise ActstoreError(f"codec {name!r} is not known; choose one of {', '.join(chains)}")
    return chains[name]()


def _bitround(keepbits: int):
    """numcodecs' BitRound; zarr warns it is outside the v3 spec, which we accept knowingly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BitRound(keepbits=keepbits)


CODEC_NAMES = (ZSTD_SHUFFLE, ZSTD5_SHUFFLE, LZ4_SHUFFLE, ZSTD_BITROUND8, UNCOMPRESSED)
