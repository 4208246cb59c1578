"""An object store's refusals, said once, in one sentence each: what was refused, where, and
what to change.

Two moments meet them. Opening a store builds its filesystem (:func:`filesystem`: an
option it refuses is named, with where options come from) and makes one request to its
bucket (:func:`preflight`), so a wrong endpoint, a missing bucket or refused credentials
cost seconds and name the bucket. A store that can be read but not written (read-only
credentials) passes that request and is refused at the command's first write: the command
line turns that refusal into its one line with :func:`refusal` (``flows.cli_report``). A
refused request changes nothing in the bucket, so nothing stored is altered either way.

fsspec's object-store filesystems raise a refusal as a ``PermissionError`` without an errno
(a local disk's carries ``EACCES``), caused by the service's own error, whose code says
which credential is wrong. A ``HEAD`` request's refusal carries no code (its response has no
body), so a refused first request is asked again as a listing, whose answer does. No
message repeats a credential: the service's codes and messages never hold one.
"""

from __future__ import annotations

import inspect
import os

import fsspec

from actstore.errors import ActstoreError

# The first request to an object store fails fast: a wrong endpoint or missing bucket
# should cost seconds, not a minute of retries; later requests keep the default retries.
PREFLIGHT = {"s3": {"config_kwargs": {"connect_timeout": 3, "read_timeout": 10,
                                      "retries": {"max_attempts": 1}}}}
# Per kind of object store: where its credentials come from, and the read and the write
# permissions to ask a bucket's owner for (named as that provider's console names them).
ACCESS = {
    "s3": ("AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or --storage-options",
           "s3:ListBucket, s3:GetObject", "s3:PutObject, s3:DeleteObject"),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS or 'gcloud auth application-default login', or "
           "--storage-options", "storage.objects.list, storage.objects.get",
           "storage.objects.create, storage.objects.delete"),
    "az": ("AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or 'az login', or "
           "--storage-options", "the Storage Blob Data Reader role",
           "the Storage Blob Data Contributor role"),
}
ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az"}
# The service's code -> what is wrong with the credentials and which setting holds it.
CREDENTIAL_CODES = {
    "SignatureDoesNotMatch": "the secret key does not match the access key id "
                             "(SignatureDoesNotMatch); check AWS_SECRET_ACCESS_KEY (or the "
                             "profile's aws_secret_access_key, or the 'secret' of "
                             "--storage-options)",
    "InvalidAccessKeyId": "the object store knows no such access key id (InvalidAccessKeyId); "
                          "check AWS_ACCESS_KEY_ID (or AWS_PROFILE, or the 'key' of "
                          "--storage-options) and that AWS_ENDPOINT_URL is this store's "
                          "endpoint",
    "InvalidToken": "the session token is not valid (InvalidToken); renew the temporary "
                    "credentials (AWS_SESSION_TOKEN, aws sso login)",
    "ExpiredToken": "the session token has expired (ExpiredToken); renew the temporary "
                    "credentials (AWS_SESSION_TOKEN, aws sso login)",
}
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs")
OBJECT_STORE_URLS = tuple(f"{p}://" for p in OBJECT_STORES)
WRITES = ("Put", "Delete", "Copy", "Create", "Upload", "Complete", "Abort")


def refusal(exc: BaseException) -> tuple[str, str | None, str | None] | None:
    """``(message, code, operation)`` of the first object-store refusal in ``exc``'s chain
    (a ``PermissionError`` without an errno), or None. ``code`` and ``operation`` are
    the service's (``AccessDenied``, ``PutObject``), when the service's error came along: a
    worker process's error arrives without it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PermissionError) and exc.errno is None:
            cause = exc.__cause__
            code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
            return str(exc), code, getattr(cause, "operation_name", None)
        exc = exc.__cause__ or exc.__context__
    return None


def describe_refusal(exc: BaseException, uri: str, bucket: str | None = None) -> str | None:
    """One sentence for an object store's refusal in ``exc`` while using store ``uri``
    (None if there is none): a wrong credential names its setting, a refused read or write
    the permission to ask for. A refusal without the service's code (a worker process's) is
    taken for one only on an object store: elsewhere a bare ``PermissionError`` is
    something else's."""
    found = refusal(exc)
    if found is None or (found[1] is None and not uri.startswith(OBJECT_STORE_URLS)):
        return None
    message, code, operation = found
    if code in CREDENTIAL_CODES:
        return CREDENTIAL_CODES[code]
    where = f"bucket {bucket!r}" if bucket else "it"
    who, reads, writes = _access(uri)
    write = f"ask the bucket's owner for write access ({writes}) or use other credentials ({who})"
    if operation is None:
        return (f"the object store refused a request with these credentials ({code or message}"
                f"); a command that writes needs write access: {write}")
    if not operation.startswith(WRITES):
        return (f"these credentials may not read {where} ({operation}: {code or message}); ask "
                f"the bucket's owner for read access ({reads}) or use other credentials ({who})")
    return f"these credentials may not write to {where} ({operation}: {code or message}); {write}"


def _kind(protocol: str) -> str:
    """The kind of object store a protocol names (``s3a`` is S3)."""
    return ALIASES.get(protocol, protocol)


def _access(uri: str) -> tuple[str, str, str]:
    """``ACCESS``'s entry for ``uri``'s kind of object store (S3's when it names none)."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "s3"
    return ACCESS.get(_kind(protocol), ACCESS["s3"])


def preflight(uri: str, protocol: str, root: str, options: dict) -> None:
    """One request to the bucket, its failure turned into a one-line error."""
    bucket = root.split("/", 1)[0]
    fs = filesystem(uri, protocol, {**_preflight_options(protocol, options),
                                    "skip_instance_cache": True})[0]
    try:
        fs.info(bucket)
        return
    except FileNotFoundError:
        problem = (f"bucket {bucket!r} does not exist (or is not visible with these "
                   "credentials); create it first: actstore never creates buckets")
    except PermissionError as exc:
        problem = _refused_first(fs, uri, root, bucket, exc)
        if problem is None:
            return
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors, named below
        name = type(exc).__name__
        if "Credentials" in name:
            problem = ("no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "(or AWS_PROFILE) or pass storage_options")
        elif "EndpointResolution" in name:   # a scheme other than http(s)
            problem = _bad_endpoint(*endpoint(fs, protocol, options))
        elif "Connect" in name or "Endpoint" in name or isinstance(exc, OSError):
            url, source = endpoint(fs, protocol, options)
            problem = (f"can't reach the object store at {url or 'its default endpoint'} "
                       f"({name}); check the endpoint ({source}) and the network")
        else:
            problem = option_problem(protocol, options, exc) or \
                f"can't use the object store: {name}: {str(exc)[:160]}"
    raise ActstoreError(f"store {uri}: {problem}")


def _bad_endpoint(url: str | None, source: str) -> str:
    """An endpoint botocore would not send to: without a scheme it refuses it as it builds
    the client ('Invalid endpoint'); with one other than http or https (a typo, ``htp://``,
    or ``ftp://``) it builds it and every request fails to resolve it, which read as an
    unreachable endpoint."""
    if not url:
        return (f"the endpoint is not a URL; write it with its scheme (http://HOST:PORT) in "
                f"{source}")
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is not None and scheme.lower() not in ("http", "https"):
        return (f"the endpoint {url!r} has the scheme {scheme + '://'!r}, and an object "
                f"store's endpoint is http:// or https://; fix it in {source}")
    if scheme is None and not url.lower().startswith(("http:", "https:")):
        return (f"the endpoint {url!r} is not a URL; write it with its scheme, e.g. "
                f"http://{url.strip()}, in {source}")
    return (f"the endpoint {url!r} is not a URL; write it as http://HOST:PORT or "
            f"https://HOST in {source}")


def _preflight_options(protocol: str, options: dict) -> dict:
    """``options`` with ``PREFLIGHT``'s settings merged into the user's same-named ones (a
    ``config_kwargs`` given for the store, such as an addressing style, holds for its first
    request too; before, PREFLIGHT's replaced it, and a wrong one passed that request). A
    value that is no dict is left as given, for the request to refuse and name."""
    given = {**fsspec.config.conf.get(protocol, {}), **options}
    merged = dict(options)
    for key, ours in PREFLIGHT.get(protocol, {}).items():
        theirs = given.get(key)
        merged[key] = {**theirs, **ours} if isinstance(theirs, dict) else \
            ours if theirs is None else theirs
    return merged


def filesystem(uri: str, protocol: str, options: dict
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    """Store ``uri``'s fsspec filesystem and root; an option its constructor or client
    refuses (or one of the wrong kind for a setting whose default says its kind: ``anon:
    "maybe"`` would have been taken as true) is one line naming it, before any request."""
    given = {**fsspec.config.conf.get(protocol, {}), **options}
    problem = _wrong_kind(protocol, fsspec.get_filesystem_class(protocol), given)
    if problem is None:
        fs = None
        try:
            fs, root = fsspec.core.url_to_fs(uri, **options)
            getattr(fs, "connect", lambda: None)()   # s3fs makes its client: no request
            return fs, root
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            if fs is not None and "Invalid endpoint" in str(exc):   # botocore's, no scheme
                raise ActstoreError(f"store {uri}: "
                                    f"{_bad_endpoint(*endpoint(fs, protocol, options))}"
                                    ) from None
            problem = option_problem(protocol, options, exc) or \
                f"can't open this location ({type(exc).__name__}: {str(exc)[:160]})"
    raise ActstoreError(f"store {uri}: {problem}")


KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _wrong_kind(protocol: str, cls: type, given: dict) -> str | None:
    """An option whose value is not of its default's kind (a JSON string for a flag, a
    number given as a string). Values are never shown: an option may hold a secret."""
    params = _parameters(cls)
    for key, value in given.items():
        default = params[key].default if key in params else None
        want = type(default) if type(default) in KINDS else None
        if want is None or value is None or type(value) is want or (
                want is float and type(value) is int):
            continue
        return (f"storage option {key!r} is {_a(value)}, and {protocol}:// takes "
                f"{KINDS[want]} for it (from {_given_in(protocol)}); fix its value")
    return None


def option_problem(protocol: str, options: dict, exc: BaseException) -> str | None:
    """The option that made ``protocol``'s filesystem fail as it was built or connected,
    in a sentence, or None: a keyword it does not take (named in the error), one it needs
    and was not given, or the one option whose value, put back to its default, lets it
    build and connect. The value is never shown: an option may hold a secret."""
    text = str(exc)
    if isinstance(exc, TypeError) and "unexpected keyword argument" in text:
        option = text.rsplit("argument", 1)[1].strip()
        hint = ("an endpoint is 'endpoint_url' (or client_kwargs' 'endpoint_url')"
                if "endpoint" in option and _kind(protocol) == "s3" else
                "see its filesystem's options" + (" (s3fs: key, secret, token, "
                "endpoint_url, client_kwargs, ...)" if _kind(protocol) == "s3" else ""))
        return (f"storage option {option} is not one {protocol}:// takes (from "
                f"{_given_in(protocol)}); {hint}")
    if isinstance(exc, TypeError) and "missing" in text and "required" in text:
        needed = text.split("argument", 1)[1].lstrip("s:").strip()
        return (f"{protocol}:// needs the storage option{'s' if ' and ' in needed else ''} "
                f"{needed} (give {'them' if ' and ' in needed else 'it'} in "
                f"{_given_in(protocol)})")
    if not isinstance(exc, (TypeError, ValueError, KeyError, AttributeError)):
        return None
    given = {**fsspec.config.conf.get(protocol, {}), **options}
    params = _parameters(fsspec.get_filesystem_class(protocol))
    if _builds(protocol, options):   # the failure was a request's, not the options'
        return None
    for key in [k for k in given if k in params]:
        if not _builds(protocol, {**options, key: params[key].default}):
            continue
        return (f"storage option {key!r} ({_a(given[key])}) is refused by {protocol}:// "
                f"({type(exc).__name__}: {text[:120]}); fix its value (from "
                f"{_given_in(protocol)})")
    return None


def _builds(protocol: str, options: dict) -> bool:
    """Whether ``protocol``'s filesystem builds and connects with ``options``: no request
    is made (s3fs makes its client in ``connect``)."""
    try:
        fs = fsspec.filesystem(protocol, **{**options, "skip_instance_cache": True})
        getattr(fs, "connect", lambda: None)()
    except Exception:  # noqa: BLE001 - any failure is a refusal of these options
        return False
    return True


def _parameters(cls: type) -> dict:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _a(value: object) -> str:
    """The kind of a JSON value, with its article, for a message."""
    kind = {**KINDS, bool: "a true/false value", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
    return kind if kind.startswith("a") else f"a {kind}"


def _given_in(protocol: str) -> str:
    """Where a store's options are given, as messages name them (the command line's
    --storage-options only for an object store: it refuses them for any other)."""
    flag = "--storage-options, " if protocol in OBJECT_STORES else ""
    return f"{flag}FSSPEC_{protocol.upper()} or storage_options"


def endpoint(fs: fsspec.AbstractFileSystem, protocol: str,
             options: dict) -> tuple[str | None, str]:
    """The endpoint a request went to (None when not set anywhere actstore sees: the
    provider's default or an AWS config profile) and the setting it came from, for a
    message: a typo (``locahost``, a port) shows in the URL, and an endpoint given in
    --storage-options is not fixed in AWS_ENDPOINT_URL, which the message named whatever
    its source."""
    env = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if _kind(protocol) == "s3" else ()
    url = getattr(fs, "endpoint_url", None) or \
        (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    given = {**fsspec.config.conf.get(protocol, {}), **options}
    if url and url in (given.get("endpoint_url"),
                       (given.get("client_kwargs") or {}).get("endpoint_url")):
        return url, _given_in(protocol)
    for var in env:
        if os.environ.get(var):
            return url or os.environ[var], var
    if env:
        return url, f"{env[-1]}, or endpoint_url in the AWS config profile (AWS_PROFILE)"
    return url, _given_in(protocol)


def _refused_first(fs, uri: str, root: str, bucket: str, exc: PermissionError) -> str | None:
    """The bucket's ``HEAD`` was refused: the store's listing says why (a wrong secret, an
    unknown key, no permission), where the ``HEAD``'s bodiless 403 could not. None when the
    listing is allowed (a new store's prefix lists as not found): credentials scoped to a
    prefix (AWS: ``s3:ListBucket`` under an ``s3:prefix`` condition) may not HEAD the bucket
    and still use the store."""
    try:
        fs.ls(root, detail=False)
        return None
    except FileNotFoundError:
        return None
    except PermissionError as again:
        exc = again
    except Exception:  # noqa: BLE001 - the first refusal is what is reported
        pass
    said = describe_refusal(exc, uri, bucket)
    if said is None or refusal(exc)[1] in (None, "403"):
        return (f"access to bucket {bucket!r} is denied with these credentials; check them "
                f"({_access(uri)[0]}) or ask the bucket's owner for access")
    return said
