"""The Zarr v3 store: creation of the root and model variants, readers' checks (block writes:
:mod:`.blockwriter`).

Layout and commit protocol: ``docs/store-format.md``; paths and keys: :mod:`.layout`.
The image axis is cut into blocks of ``block_size`` images; a block is the unit of work and
of storage: one shard holds one block × all steps of one layer, so every write covers whole
shards (no read-modify-write) and workers filling disjoint blocks never touch the same
object. A block is visible to readers only once its completion record exists; the root and
a variant only once their marker attribute exists (written last, one PUT each).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
import zarr

import actstore
from actstore.errors import ActstoreError, InputError
from actstore.store import claims, commit, io
from actstore.store.blockwriter import BlockWriter, block_arrays  # noqa: F401  (st.BlockWriter)
from actstore.store import layout as lay
from actstore.store.claims import diff  # noqa: F401  (settings differences, st.diff)
from actstore.store.codecs import codec_chain
from actstore.store.locations import enclosing_group
from actstore.store.layout import (ACTIVATION, MODEL_KEY, ROOT_KEY, layer_path,  # noqa: F401
                                   model_path)

DEFAULT_BLOCK_SIZE = 4
# Inner chunks of at least 4 MiB: zarr spends about 1 ms of CPU per chunk written, which cost
# SD-sized layers a third of the write throughput at 1 MiB chunks (side by side, / numpy.save:
# 1 MiB 0.27, 4 MiB 0.33, whole shards 0.42, no zarr 0.44; see benchmarks/README.md). A
# reader of one image × one step then fetches at most 2 images of the biggest layers.
TARGET_CHUNK_BYTES = 4 << 20
# Chunk keys "c.0.3.0.0.0" (flat, one directory per array) instead of zarr's default
# nested "c/0/3/0/0/0": a new block otherwise creates a directory per key level, and on
# ext4 those mkdirs cost more system time than writing the chunk's bytes.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
# Top-level names a store of ours may hold while its root marker is not yet written.
OWN_NAMES = {lay.IMAGES, lay.MODELS, lay.LABELS, lay.PROBES, lay.INTERVENTIONS,
             lay.EMERGENCE, claims.CLAIMS, io.META}
READABLE_SCHEMAS = (1, 2)


def read_root_attrs(uri: str) -> dict:
    """The store's identity, or a one-line error if ``uri`` is not a complete actstore store.

    The root document is asked for first: a store that has one exists, and the look at
    whether anything is there at all (three requests to an object store) is only needed to
    say why there is none."""
    return root_of(uri, io.node_attrs(uri, ""))


def root_of(uri: str, attrs: dict | None) -> dict:
    """:func:`read_root_attrs` of attributes fetched (None: no root) beside a record's."""
    if attrs is None and not io.store_nonempty(uri):
        then = _catalog_name(str(uri))
        raise ActstoreError(f"store {uri}: does not exist{then}")
    if attrs is None:
        if _only_own_names(uri):
            raise ActstoreError(f"store {uri}: is being created, or its creation was "
                                "interrupted (no image table committed yet); wait for the "
                                "writer, or rerun the same `actstore materialize` to finish it")
        raise ActstoreError(f"store {uri}: exists but is not an actstore store (no Zarr v3 "
                            "group there); choose a new --store path")
    if ROOT_KEY not in attrs:
        raise ActstoreError(f"store {uri}: is a Zarr group but not an actstore store (no "
                            f"'{ROOT_KEY}' attribute); choose a new --store path")
    root = attrs[ROOT_KEY]
    if root.get("schema_version") not in READABLE_SCHEMAS:
        raise ActstoreError(f"store {uri}: has store schema {root.get('schema_version')}, this "
                            f"actstore {actstore.__version__} reads schemas "
                            f"{', '.join(map(str, READABLE_SCHEMAS))}; upgrade actstore")
    return root


def _catalog_name(uri: str) -> str:
    """How to go on, said to a reader given a catalog's store name: the commands read the
    catalog, the Python readers take locations, and `open_store("toy")` after `actstore
    materialize --store toy` was told to create the store it had just made. The catalog
    looked in is the one the commands read without --catalog; a store made with another
    may be elsewhere, so the line names that file, and its location only if a store is there."""
    from actstore.catalog import find_catalog, resolve_store

    plain = "; create it with `actstore materialize`"
    if "/" in uri or "://" in uri:
        return plain
    try:
        catalog = find_catalog()
        if catalog is None or uri not in catalog.stores:
            return plain     # the commands' own line: they resolved the name already
        read = f"{catalog.path}, the catalog the commands read without --catalog"
        where = resolve_store(catalog, uri)["uri"]
        if io.node_attrs(where, "") is None:
            return (f" here, nor at {where}, its location in {read}; open the location the "
                    "catalog it was made with gives it")
        return f" here; '{uri}' is a store name of {read}: open its location, {where}"
    except ActstoreError:    # a catalog that does not load: no hint, the plain line
        return plain


def _only_own_names(uri: str) -> bool:
    names = io.list_dir(uri, "")
    return bool(names) and all(n in OWN_NAMES or n.endswith(".partial") for n in names)


def listed(uri: str, paths: list[str]) -> list[dict | None]:
    """The attributes at ``paths`` (a listing's) read with the store's root in one round: a
    mistyped path says so, and a newer schema is refused (before 2026-12-06, only if empty)."""
    root, *attrs = io.nodes_attrs(uri, ["", *paths])
    root_of(uri, root)
    return attrs


def existing_root(uri: str) -> dict | None:
    """The root attributes of a complete store; None where a store can still be created
    (nothing there, an empty folder, or an interrupted creation of ours); an error for
    anything else."""
    if not io.store_nonempty(uri) or (io.node_attrs(uri, "") is None and _only_own_names(uri)):
        outer = enclosing_group(uri, ROOT_KEY)
        if outer is not None:
            raise ActstoreError(f"store {uri}: is inside the actstore store {outer}, whose tree "
                                "it would write into; choose a store path outside it")
        return None
    return read_root_attrs(uri)


def create_or_check_root(uri: str, prompts: pd.DataFrame, prompts_sha256: str,
                         block_size: int | None) -> dict:
    """Create the root and image table, or check an existing store holds the same table.

    The image table is written first, the root's marker attribute last (one PUT), so a
    store is visible only with its whole table. Every write is deterministic, so a rerun
    after a kill, or several workers starting at once, simply write the same bytes again.
    """
    attrs = existing_root(uri)
    io.sweep_partials(uri, "", recursive=False)
    io.sweep_partials(uri, lay.IMAGES)
    if attrs is None:
        identity = {"prompts_sha256": prompts_sha256,
                    "block_size": block_size or DEFAULT_BLOCK_SIZE}
        with claims.creating(uri, "", identity, lambda: _root_identity(uri), what="this store",
                             fix="the same prompt table and --block-size, or a new --store"
                             ) as existing:
            if existing is None:
                _create_root(uri, prompts, identity)
        attrs = read_root_attrs(uri)   # ours, or a creator's that beat us
    else:
        claims.sweep(uri, "")
    if attrs["prompts_sha256"] != prompts_sha256:
        raise ActstoreError(
            f"store {uri}: was created from a different prompt table ({attrs['n_images']} "
            "images, other ids/prompts/seeds/splits); use the same table or a new --store")
    if block_size is not None and block_size != attrs["block_size"]:
        raise InputError(f"store {uri}: has block size {attrs['block_size']}, not "
                         f"{block_size}; drop --block-size or use a new --store")
    return attrs


def _root_identity(uri: str) -> dict | None:
    attrs = (io.node_attrs(uri, "") or {}).get(ROOT_KEY)
    return None if attrs is None else {k: attrs[k] for k in ("prompts_sha256", "block_size")}


def _create_root(uri: str, prompts: pd.DataFrame, identity: dict) -> None:
    attrs = {"schema_version": actstore.SCHEMA_VERSION, "n_images": len(prompts),
             "block_size": identity["block_size"],
             "prompts_sha256": identity["prompts_sha256"], "created": commit.utc_now()}
    n = len(prompts)
    split = prompts["split"] if "split" in prompts else pd.Series(["train"] * n)
    columns = {"image_id": (prompts["image_id"].astype(str).to_numpy(), str),
               "prompt": (prompts["prompt"].astype(str).to_numpy(), str),
               "seed": (prompts["seed"].to_numpy(np.int64), "int64"),
               "split": (split.astype(str).to_numpy(), str)}
    for name, (values, dtype) in columns.items():
        create_array(uri, lay.image_column(name), shape=(n,), chunks=(max(n, 1),),
                     dtype=dtype, dims=["image"], values=values)
    io.put_group(uri, lay.IMAGES)
    io.put_group(uri, "", {ROOT_KEY: attrs})   # the marker, last


def block_layout(shape: tuple[int, ...], block: int, itemsize: int, lead: int,
                 target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[tuple, tuple | None]:
    """(inner chunk, shard) for an array whose ``lead`` first axes are image (and step).

    The shard is the unit of writing: one block of images × all steps, so a block write
    never reads-modifies-writes anything. Inner chunks are what a reader fetches: one image
    × one step, grown over images then steps until ``target_bytes``, since per-chunk
    overhead dominates below a few megabytes (SD's 64×64×320 layers: 2 images × 1 step).
    When a chunk fills its shard, sharding is dropped (shard None).
    """
    shard = (block,) + tuple(shape[1:])
    chunk = [1] * lead + list(shape[lead:])
    cell = itemsize * int(np.prod(shape[lead:]))
    for axis in range(lead):
        while chunk[axis] < shard[axis] and cell * int(np.prod(chunk[:lead])) < target_bytes:
            chunk[axis] = next(d for d in range(chunk[axis] + 1, shard[axis] + 1)
                               if shard[axis] % d == 0)
    chunk = tuple(chunk)
    return chunk, (None if chunk == shard else shard)


def create_array(uri: str, path: str, *, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: npt.DTypeLike, dims: Sequence[str],
                 shards: tuple[int, ...] | None = None,
                 codec: str | None = None, attrs: dict | None = None,
                 values: np.ndarray | None = None) -> zarr.Array:
    """Write an array's metadata (never its parents', never its chunks) and open it; with
    ``values``, its values too (a small coordinate or table column).

    Rewriting the same metadata is harmless, so a creation is redone whole by a rerun
    instead of trusting whatever a killed run left. Existing chunks are kept: a worker
    that re-creates an array never deletes another worker's blocks."""
    chain = codec_chain(codec) if codec else {}
    arr = io.put_array(uri, path, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                       dimension_names=dims, fill_value=0 if dtype != str else "",
                       chunk_key_encoding=CHUNK_KEY_ENCODING, attributes=attrs or {},
                       **chain)
    if values is not None:
        io.guard()   # zarr writes the chunks, not io: a creator checks its claim here too
        arr[:] = values
    return arr


def check_or_create_model(uri: str, variant: str, *, fingerprint: dict, provenance: dict,
                          layers: list, n_steps: int, image_hw: tuple[int, int],
                          step_coords: dict[str, np.ndarray], codec: str, store_dtype: str,
                          keep_uncond: bool = False) -> None:
    """Make a model variant's arrays, or refuse if the variant exists with another config.

    Contents first (step coordinates with their values, array and group metadata), the
    variant's marker attribute last; a variant without it is redone whole by the next run.
    """
    read_root_attrs(uri)
    io.sweep_partials(uri, lay.MODELS, recursive=False)
    io.sweep_partials(uri, model_path(variant))
    existing = _model_fingerprint(uri, variant)
    if existing is None:
        with claims.creating(uri, model_path(variant), fingerprint,
                             lambda: _model_fingerprint(uri, variant), what=f"model '{variant}'",
                             fix="the same model and settings, or a new --store") as existing:
            if existing is None:
                _create_model(uri, variant, fingerprint, provenance, layers, n_steps,
                              image_hw, step_coords, codec, store_dtype, keep_uncond)
        existing = _model_fingerprint(uri, variant)   # ours, or a creator's that beat us
    else:
        claims.sweep(uri, model_path(variant))
    refuse_other_config(uri, variant, existing, fingerprint)


def refuse_other_config(uri: str, variant: str, stored: dict, wanted: dict) -> None:
    """The one line refusing a run whose fingerprint differs from its stored variant's:
    said by the run that loaded the model (the whole fingerprint), and by the command before
    it starts one (the parts read without the weights)."""
    diffs = diff(stored, wanted)
    if diffs:
        more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ActstoreError(f"store {uri}: model '{variant}' was made with another model or "
                            f"config ({'; '.join(diffs[:3])}{more}); use a new --store")


def _model_fingerprint(uri: str, variant: str) -> dict | None:
    marker = (io.node_attrs(uri, model_path(variant)) or {}).get(MODEL_KEY)
    return None if marker is None else marker["fingerprint"]


def _create_model(uri, variant, fingerprint, provenance, layers, n_steps, image_hw,
                  step_coords, codec, store_dtype, keep_uncond) -> None:
    n, block = _root_shape(uri)
    base = model_path(variant)
    h, w = image_hw
    for name, values in step_coords.items():
        create_array(uri, f"{base}/{name}", shape=(n_steps,), chunks=(n_steps,),
                     dtype="float32", dims=["step"], values=values)
    image_arrays = {"final_image": ((n, h, w, 3), ["image", "y", "x", "rgb"], 1),
                    "x0_image": ((n, n_steps, h, w, 3), ["image", "step", "y", "x", "rgb"], 2)}
    for name, (shape, dims, lead) in image_arrays.items():
        chunks, shards = block_layout(shape, block, 1, lead)
        create_array(uri, f"{base}/{name}", shape=shape, chunks=chunks, shards=shards,
                     dtype="uint8", dims=dims, codec=codec)
    create_layer_arrays(uri, variant, layers, n=n, n_steps=n_steps, block=block, codec=codec,
                        store_dtype=store_dtype, keep_uncond=keep_uncond)
    io.put_group(uri, lay.blocks_path(base))
    io.put_group(uri, lay.MODELS)
    # The marker, last: a variant without it is not yet usable.
    io.put_group(uri, base, {MODEL_KEY: {"fingerprint": fingerprint, **provenance}})


def create_layer_arrays(uri: str, variant: str, points: list, *, n: int, n_steps: int,
                        block: int, codec: str, store_dtype: str,
                        keep_uncond: bool = False) -> None:
    """``layers/<name>/activation`` (and ``activation_uncond``) of each capture point with
    the point's attributes (name, kind, module path, shape), then the groups above them
    (``<kind>/`` names nest one group deeper), innermost first."""
    itemsize = np.dtype(store_dtype).itemsize
    groups = {}
    for info in points:
        shape = (n, n_steps, info.height, info.width, info.channels)
        chunks, shards = block_layout(shape, block, itemsize, 2)
        names = [ACTIVATION] + ([lay.ACTIVATION_UNCOND] if keep_uncond and info.cfg else [])
        for name in names:
            create_array(uri, layer_path(variant, info.name, name), shape=shape, chunks=chunks,
                         shards=shards, dtype=store_dtype,
                         dims=["image", "step", "y", "x", "channel"],
                         codec=codec, attrs=info.attrs())
        group = lay.layer_group(variant, info.name)
        for path in [group] + lay.parents(group)[::-1]:
            groups.setdefault(path, None)
            if path == f"{model_path(variant)}/{lay.LAYERS}":
                break
    for path in groups:
        io.put_group(uri, path)


def _root_shape(uri: str) -> tuple[int, int]:
    root = read_root_attrs(uri)
    return root["n_images"], root["block_size"]


def blocks_of(n_images: int, block_size: int, start: int = 0,
              stop: int | None = None) -> list[tuple[int, int]]:
    """The (start, stop) image blocks of a region; regions must align with blocks."""
    stop = n_images if stop is None else stop
    return [(a, min(a + block_size, n_images)) for a in range(start, stop, block_size)]


def completed_blocks(uri: str, variant: str) -> set[tuple[int, int]]:
    return commit.completed_blocks_at(uri, model_path(variant))


completed_blocks_at = commit.completed_blocks_at


def model_array(uri: str, variant: str, name: str) -> zarr.Array:
    """A variant's image array (``final_image``, ``x0_image``) for reading."""
    return io.open_array(uri, f"{model_path(variant)}/{name}")


def model_variants(uri: str) -> list[str]:
    """Variants whose creation is complete (their marker exists)."""
    return list(io.marked_children(uri, lay.MODELS, model_path, MODEL_KEY))


def unknown_variant(uri: str, variant: str, have: list[str] | None = None,
                    fix: str = "materialize it first") -> ActstoreError:
    """The rule for a model variant a reader names (``--models``, ``--model-variant``,
    ``open_store(model=...)``): one of the store's complete variants, ``have`` (default:
    :func:`model_variants`); this is the one line refusing any other name."""
    have = model_variants(uri) if have is None else have
    return ActstoreError(f"store {uri}: has no model {variant!r} (has: "
                         f"{', '.join(have) or 'none'}); {fix}")


def check_variants(uri: str, variants: Iterable[str], have: list[str] | None = None,
                   fix: str = "materialize it first") -> None:
    """Refuse the first of ``variants`` that is not one of ``have`` (:func:`unknown_variant`)."""
    have = model_variants(uri) if have is None else have
    for v in variants:
        if v not in have:
            raise unknown_variant(uri, v, have, fix)


def model_attrs(uri: str, variant: str) -> dict:
    """A complete variant's marker (fingerprint and provenance), read from its node alone.

    The name is a path segment: ``""`` or ``../labels`` reached the models or labels group
    (and were said to be 'being created'), ``trained/../randomized`` the control under
    another name. So a marker counts only if it names this variant, and a variant without
    one is being created only if it is an entry of ``models/``; any other name is refused
    by :func:`unknown_variant`, the rule the command line's ``--models`` follows."""
    marker = (io.node_attrs(uri, model_path(variant)) or {}).get(MODEL_KEY)
    if marker is not None and marker["fingerprint"].get("variant", variant) == variant:
        return marker
    if marker is None and variant in io.list_dir(uri, lay.MODELS) \
            and io.list_dir(uri, model_path(variant)):
        raise ActstoreError(f"store {uri}: model '{variant}' is being created, or its "
                            "creation was interrupted; wait for the writer, or rerun the "
                            "same `actstore materialize` to finish it")
    raise unknown_variant(uri, variant)
