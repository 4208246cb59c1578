"""Where a store lives: a URI resolved once to its zarr stores (one for writes, one for
reads) and fsspec filesystem, with the options (endpoint, credentials) the user gave for it.

Object-store credentials and endpoints come from the environment (``AWS_*``,
``FSSPEC_S3`` JSON, ``FSSPEC_S3_ENDPOINT_URL``), from :func:`set_storage_options` (one
store, this process) or :func:`set_protocol_options` (the command line's
``--storage-options``: this process and its workers); they are held in memory only and
never written into a store. Reads and writes go through :mod:`actstore.store.io`."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from actstore.errors import ActstoreError
from actstore.store.access import OBJECT_STORES, filesystem, preflight

# No listing cache: a long-lived reader must see completion records written after it opened.
NO_LISTING_CACHE = {"use_listings_cache": False}

_OPTIONS: dict[str, dict] = {}
_LOCATIONS: dict[str, Location] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Location:
    """A store URI resolved once: its zarr store (for every write) and fsspec filesystem."""

    uri: str
    protocol: str
    fs: fsspec.AbstractFileSystem
    root: str
    store: Store   # writes
    reader: Store  # reads: a local reader never creates the folder it looks for

    def full(self, path: str = "") -> str:
        return f"{self.root.rstrip('/')}/{path}".rstrip("/") if path else self.root


def set_storage_options(prefix: str, options: dict) -> None:
    """fsspec options (endpoint, credentials, ...) for every store whose URI starts with
    ``prefix``; kept in this process's memory only."""
    with _LOCK:
        _OPTIONS[prefix] = dict(options)
        for uri in [u for u in _LOCATIONS if u.startswith(prefix)]:
            del _LOCATIONS[uri]


def set_protocol_options(protocol: str, options: dict) -> None:
    """fsspec options for every ``protocol`` store this process opens and every process it
    starts (a local Dask cluster's workers, a region worker): fsspec's own configuration,
    in memory and in this process's environment (``FSSPEC_<PROTOCOL>``), never on disk."""
    merged = {**fsspec.config.conf.get(protocol, {}), **options}
    with _LOCK:
        fsspec.config.conf[protocol] = merged
        os.environ[f"FSSPEC_{protocol.upper()}"] = json.dumps(merged)
        for uri in [u for u in _LOCATIONS if protocol_of(u) == protocol]:
            del _LOCATIONS[uri]


def _options_for(uri: str) -> dict:
    best = max((p for p in _OPTIONS if uri.startswith(p)), key=len, default=None)
    return dict(_OPTIONS[best]) if best is not None else {}


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def as_uri(uri: str | os.PathLike[str]) -> str:
    """A store location as text, refusing what names none: ``open_emergence(3)`` said
    'store 3: does not exist', as if a folder named 3 were missing."""
    if isinstance(uri, (str, os.PathLike)):
        return os.fspath(uri)
    raise ActstoreError(f"store {uri!r}: a store location is a path or URL, not a "
                        f"{type(uri).__name__}; pass it as a string (e.g. 'runs/toy.zarr', "
                        "'s3://bucket/p.zarr') or a pathlib.Path")


def canonical(uri: str) -> str:
    """One name for one store, whatever the process's folder: a local path made absolute
    (``~``, ``..`` and trailing slashes resolved), a URL without its trailing slashes. What
    a relative path names changes with the folder (a notebook's ``%cd``), so the resolved
    locations are kept under this name, and a reader's provenance records it."""
    uri = as_uri(uri)
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    protocol, rest = uri.split("://", 1)
    return f"{protocol}://{rest.rstrip('/')}" if rest.strip("/") else uri


def location(uri: str) -> Location:
    """The resolved store for ``uri`` (cached per URI and options; a local path per
    absolute path: kept per string, ``store.zarr`` opened after a ``chdir`` read the first
    folder's store)."""
    uri = as_uri(uri)
    cached = uri if "://" in uri else canonical(uri)   # URLs: the options' prefixes
    with _LOCK:
        if cached in _LOCATIONS:
            return _LOCATIONS[cached]
    protocol = protocol_of(uri)
    if protocol in OBJECT_STORES:
        check_object_url(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise ActstoreError(f"store {uri}: can't open this kind of location ({exc}); use a "
                            "local path or an fsspec URL such as s3://bucket/path "
                            "(pip install 'actstore[s3]')") from None
    if protocol == "file":
        fs, root = fsspec.core.url_to_fs(uri)
        store: Store = LocalStore(root)
        reader: Store = LocalStore(root, read_only=True)
    else:
        options = {**(NO_LISTING_CACHE if protocol in OBJECT_STORES else {}),
                   **_options_for(uri)}
        fs, root = filesystem(uri, protocol, options)   # a refused option: one line
        store = FsspecStore.from_url(uri, storage_options=options) if fs.async_impl \
            else FsspecStore(_async(fs), path=root)
        reader = _reader(uri, protocol, options) or store
    if protocol in OBJECT_STORES:
        preflight(uri, protocol, root, options)
    loc = Location(uri, protocol, fs, root, store, reader)
    with _LOCK:
        _LOCATIONS[cached] = loc
    return loc


def check_object_url(uri: str) -> None:
    """An object-store URL names a bucket and, inside it, a key without empty parts: the
    service keeps ``a//b`` and ``a/b`` as different keys, so ``s3://bkt//p.zarr`` made a
    store no reader found (its summary said 'no model variant yet'), and ``s3://`` or
    ``s3:///p.zarr`` failed in botocore's parameter check, exit 1. Trailing slashes are
    fsspec's to drop and pass."""
    protocol, rest = uri.split("://", 1)
    bucket, _, key = rest.split("?", 1)[0].rstrip("/").partition("/")  # a query may hold '//'
    if not bucket:
        raise ActstoreError(f"store {uri}: no bucket in the URL; write {protocol}://BUCKET/"
                            "PATH (e.g. s3://my-bucket/runs/p.zarr)")
    if "" in key.split("/") and key:
        fixed = f"{protocol}://{bucket}/" + "/".join(p for p in key.split("/") if p)
        raise ActstoreError(f"store {uri}: the key has an empty part ('//'), which the object "
                            f"store keeps as another key than the one meant; write {fixed}")


def enclosing_group(uri: str, key: str) -> str | None:
    """The URI of the nearest folder above ``uri`` whose Zarr group has the attribute
    ``key`` (an actstore store's root), or None. A new store made inside another wrote a
    group into that store's tree (``materialize --store s3://b/p.zarr/sub.zarr`` was
    accepted, 2026-12-07). One small read per level; a level that cannot be read (a
    prefix the credentials may not see) is taken for none."""
    loc = location(uri)
    # on disk, the folders it is physically in: fsspec keeps '..' and '//' in a local root
    # ('../new.zarr' from inside a store named that store)
    root = os.path.realpath(loc.root) if loc.protocol == "file" else loc.root
    parts = root.rstrip("/").split("/")
    for n in range(len(parts) - 1, 0, -1):   # every folder above, the bucket's or disk's top too
        folder = "/".join(parts[:n]) or "/"
        try:
            doc = json.loads(loc.fs.cat_file(f"{folder.rstrip('/')}/zarr.json"))
        except Exception:  # noqa: BLE001 - missing, refused or not JSON: not a store
            continue
        if isinstance(doc, dict) and key in (doc.get("attributes") or {}):
            return f"{loc.protocol}://{folder}" if loc.protocol != "file" else folder
    return None


# s3fs (since 2026.2) reads a whole object in 50 MB ranges over ``max_concurrency`` (10)
# connections, and to choose, asks for its size first: a HEAD before every GET, doubling
# the requests of every metadata document and small chunk a reader fetches (s3fs issue
# #1027; gcsfs went back to one request for the same reason). One connection per object
# is one GET; reads still run concurrently across objects (one dask task per shard, and
# zarr's own gather of a shard's chunks). Writes keep s3fs's defaults.
ONE_GET = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}


def _reader(uri: str, protocol: str, options: dict) -> Store | None:
    """The store reads go through where it differs from the writer's (see ONE_GET); an
    option the user set wins."""
    extra = {k: v for k, v in ONE_GET.get(protocol, {}).items()
             if k not in options and k not in fsspec.config.conf.get(protocol, {})}
    if not extra:
        return None
    return FsspecStore.from_url(uri, storage_options={**options, **extra}, read_only=True)


def _async(fs):
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs, asynchronous=True)
