"""Filesystems, retries, atomic commits and the per-node model cache.

Every read and write goes through a `pyarrow.fs.FileSystem` built from the config (never from
the environment of whichever process runs it), so replicas on other nodes reach the same
endpoint as the driver: local -> `LocalFileSystem`, `s3://` -> `S3FileSystem`, other fsspec
schemes -> `PyFileSystem`. Paths are the filesystem's own (an fsspec store's as its
`_strip_protocol` spells them: `/dir/key` for memory://, which `pipeline.run` refuses).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
import dataclasses
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it, and the URI it came from (for messages)."""

    fs: pafs.FileSystem
    path: str
    uri: str
    scheme: str
    retries: int = 3  # times a failed call on it is retried (config.io_retries)

    def join(self, *parts: str) -> "Location":
        return self.at("/".join([self.path.rstrip("/"), *parts]), "/".join([self.uri.rstrip("/"), *parts]))

    def at(self, path: str, uri: str) -> "Location":
        """Another path on the same filesystem, with the same retry policy."""
        return dataclasses.replace(self, path=path, uri=uri)

    @property
    def parent(self) -> "Location":
        return self.at(self.path.rsplit("/", 1)[0], self.uri.rsplit("/", 1)[0])

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"


def _secret(value) -> str | None:
    """A credential's text (the config holds pydantic SecretStr)."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def filesystem_for(scheme: str, config) -> pafs.FileSystem:
    """The filesystem of a (non-local) URI scheme, from the config's storage settings."""
    if scheme in ("s3", "s3a"):
        kwargs = dict(region=config.s3_region or "us-east-1",
                      access_key=_secret(config.s3_access_key_id), secret_key=_secret(config.s3_secret_access_key),
                      session_token=_secret(config.s3_session_token),
                      # quick SDK retries of throttling / 5xx; `retry` adds slower ones
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                      connect_timeout=10, request_timeout=60)
        if config.s3_endpoint:
            endpoint = urlparse(config.s3_endpoint if "://" in config.s3_endpoint
                                else f"https://{config.s3_endpoint}")
            kwargs.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    return pafs.PyFileSystem(_LiteralHandler(_fsspec(scheme)))


class _LiteralHandler(pafs.FSSpecHandler):
    """pyarrow's fsspec handler, but a path is always a path: fsspec's `copy` and `rm` expand glob
    characters (`a[1].parquet`), which copied a temp file into a directory or deleted another file."""

    def copy_file(self, src, dest):
        self.fs.cp_file(src, dest)

    def delete_file(self, path):
        if not self.fs.isfile(path):
            raise FileNotFoundError(path)
        self.fs.rm_file(path)

    def delete_dir(self, path):
        if not self.fs.exists(path):
            raise FileNotFoundError(path)
        for name in sorted(self.fs.find(path), reverse=True):  # find takes the path literally
            self.fs.rm_file(name)
        try:
            self.fs.rmdir(path)
        except (OSError, NotImplementedError):  # object stores have no directories to remove
            pass


def _fsspec(scheme: str):
    """The fsspec filesystem for a scheme, or a ValueError saying which package to install."""
    import fsspec

    try:
        return fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise ValueError(f"no filesystem for {scheme}://: {e} (install its fsspec package, "
                         f"e.g. gcsfs for gs://, adlfs for abfs://)") from None


def resolve(uri: str, config) -> Location:
    """URI or local path -> Location on an explicitly configured filesystem."""
    uri = os.fspath(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # len 1: a Windows drive
        path = uri
        if parsed.scheme == "file" and uri.startswith("file://"):  # the rest as it is: '#', '?' are path
            host, _, rest = uri[len("file://"):].partition("/")
            if host not in ("", "localhost"):
                raise ValueError(f"{uri}: a file:// URL names a path on this machine: file:///abs/path")
            path = "/" + rest
        elif parsed.scheme == "file":  # file:/abs/path
            path = uri[len("file:"):]
        path = os.path.abspath(os.path.expanduser(path))
        return Location(pafs.LocalFileSystem(), path, path, "file", config.io_retries)
    scheme = parsed.scheme
    if scheme in ("s3", "s3a"):
        path = uri.split("://", 1)[1].rstrip("/")  # keys may hold '#' and '?'
    else:  # the path as the fsspec filesystem spells it (memory://a/b is "/a/b", gs://b/k is "b/k")
        path = _fsspec(scheme)._strip_protocol(uri).rstrip("/") or "/"
    return Location(filesystem_for(scheme, config), path, uri.rstrip("/"), scheme, config.io_retries)


def inside(uri: str, directory_uri: str) -> bool:
    """Whether `uri` is `directory_uri` or below it."""
    d = directory_uri.rstrip("/")
    return uri == d or uri.startswith(d + "/")


def place(loc: Location) -> str:
    """Where a location really is, for comparing: symlinks resolved, s3a:// spelled s3://."""
    if loc.is_local:
        return "file://" + os.path.realpath(loc.path)
    scheme = "s3" if loc.scheme == "s3a" else loc.scheme
    return f"{scheme}://{loc.path.rstrip('/')}"


def glob_regex(pattern: str) -> re.Pattern:
    """A path glob as a regex, as shells read it (fsspec's): `*` and `?` stay within a component,
    `**/` matches zero or more directories, `[...]` is a character class."""
    from fsspec.utils import glob_translate

    return re.compile(glob_translate(pattern))


class StorageError(OSError):
    """A storage call that still failed after its retries; the message names the URI."""


def retry(fn, what: str, retries: int = 3, base_delay: float = 0.5):
    """fn(), its `transient` errors retried `retries` times with jittered exponential backoff
    (0.5 s, 1 s, 2 s, ... x 0.5-1.5); the last re-raised as StorageError with `what` (the URI) first."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as e:
            if not transient(e):
                raise
            if attempt == retries:
                raise StorageError(f"{what}: {e} (gave up after {retries + 1} attempts)") from e
            delay = base_delay * 2 ** attempt * (0.5 + random.random())
            log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)


@contextlib.contextmanager
def naming(what: str):
    """An OSError from the block re-raised with `what` ('read s3://b/k') first, FileNotFoundError /
    PermissionError kept as such; errors already named pass through."""
    try:
        yield
    except OSError as e:
        if getattr(e, "named", False) or isinstance(e, StorageError):
            raise
        cls = type(e) if type(e) in (FileNotFoundError, PermissionError) else OSError
        err = cls(f"{what}: {e}")
        err.named = True
        raise err from e


def transient(error: BaseException) -> bool:
    """Worth redoing: a storage error not retried yet, and not a missing file, a refused permission
    or a path through a file (or to a directory)."""
    return isinstance(error, OSError) and not isinstance(
        error, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, StorageError))


def exists(loc: Location) -> bool:
    return retry(lambda: loc.fs.get_file_info(loc.path), f"stat {loc.uri}", loc.retries).type == pafs.FileType.File


def temp_sibling(final: Location) -> Location:
    """A temp name in `<dir>/_tmp/` on the same filesystem (hidden from Parquet readers)."""
    return final.parent.join("_tmp", f"_{final.path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:12]}.tmp")


def ensure_dir(loc: Location) -> None:
    if loc.is_local:
        os.makedirs(loc.path, exist_ok=True)
    elif loc.scheme not in ("s3", "s3a"):  # object stores have no directories to create
        retry(lambda: loc.fs.create_dir(loc.path, recursive=True), f"mkdir {loc.uri}", loc.retries)


def commit(tmp: Location, final: Location) -> None:
    """Make a fully written temp file visible under its final name, atomically: a local rename,
    else the store's copy (server-side on object stores: complete or absent), then delete the
    temp. Where copies are not atomic (ftp://, sftp://) a partial file may show briefly, never
    taken as committed (Parquet needs its footer's row count, JSONL its sidecar naming its size)."""
    if tmp.is_local:
        os.replace(tmp.path, final.path)
        return
    retry(lambda: tmp.fs.copy_file(tmp.path, final.path), f"commit {final.uri}", final.retries)
    if tmp.fs.get_file_info(final.path).type != pafs.FileType.File:  # a store that put it elsewhere
        raise StorageError(f"commit {final.uri}: the copy did not create that file")
    try:
        tmp.fs.delete_file(tmp.path)
    except OSError as e:  # a leftover temp object is harmless: it is hidden and never read
        log.warning("could not delete temp object %s: %s", tmp.uri, e)


def write_bytes_atomic(final: Location, data: bytes) -> None:
    tmp = temp_sibling(final)
    ensure_dir(tmp.parent)

    def _write():
        with tmp.fs.open_output_stream(tmp.path) as f:
            f.write(data)

    retry(_write, f"write {tmp.uri}", tmp.retries)
    commit(tmp, final)


def read_file(loc: Location, fn, what: str = "read"):
    """`fn(the open random-access file)`, retried (the file reopened each time) as `retry` does."""
    def _call():
        with loc.fs.open_input_file(loc.path) as f:
            return fn(f)

    return retry(_call, f"{what} {loc.uri}", loc.retries)


def read_bytes(loc: Location) -> bytes:
    """The stored bytes (no decompression guessed from the name), retried."""
    return read_file(loc, lambda f: f.read())


@contextlib.contextmanager
def local_copy(loc: Location, names):
    """A local directory with the files `names` of `loc`: a local one as is, else those that exist
    copied into a temp directory for the block."""
    if loc.is_local:
        yield loc.path
        return
    with tempfile.TemporaryDirectory(prefix="persimmon-tokenizer-") as tmp:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                data = read_bytes(loc.join(name))
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
        yield tmp


# ---- model directory: local as is, hub snapshot, remote downloaded once per node -------------
MODEL_FILES_SUFFIXES = (".json", ".safetensors", ".model", ".bin", ".txt")


def model_location(model: str, config) -> Location:
    """Where the checkpoint is read: a hub id's snapshot in this node's HF cache (fetched at the
    commit the driver pinned: `pipeline.hub`), anything else as `resolve`."""
    from .hub import hub_model, snapshot

    if config.model_dir:  # the driver's decision (pipeline.hub.pin)
        return resolve(config.model_dir, config)
    hub = hub_model(model, config.model_commit)
    if hub is None:
        return resolve(model, config)
    return Location(pafs.LocalFileSystem(), snapshot(hub, model), hub.uri, "file", config.io_retries)


def local_model_dir(model_uri: str, config) -> str:
    """A local directory holding the checkpoint: a local one or hub snapshot as is, a remote one
    downloaded into `<model_cache_dir>/<sha1(uri, identity)[:16]>` under a file lock (replicas on
    a node download once); a `.complete` marker written last: a half-finished download is redone."""
    loc = model_location(model_uri, config)
    if loc.is_local:
        return loc.path
    from filelock import FileLock

    cache_root = os.path.expanduser(config.model_cache_dir)
    os.makedirs(cache_root, exist_ok=True)
    # one copy per model *identity* (set by the driver: config, tokenizer, weight headers), so
    # weights changed in place on the store are fetched again instead of served stale
    key = hashlib.sha1(f"{loc.uri}\0{config.model_identity or ''}".encode()).hexdigest()[:16]
    target = os.path.join(cache_root, key)
    marker = os.path.join(target, ".complete")
    with FileLock(os.path.join(cache_root, f"{key}.lock")):
        if os.path.exists(marker):
            return target
        partial = f"{target}.partial-{os.getpid()}"
        os.makedirs(partial, exist_ok=True)
        infos = retry(lambda: loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False)),
                      f"list model {loc.uri}", loc.retries)
        files = [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(MODEL_FILES_SUFFIXES)]
        if not files:
            raise FileNotFoundError(f"model {loc.uri} holds no checkpoint files")
        for info in files:
            retry(lambda info=info: pafs.copy_files(info.path, os.path.join(partial, info.base_name),
                                                    source_filesystem=loc.fs, chunk_size=64 << 20),
                  f"download {loc.uri}/{info.base_name}", loc.retries)
        if os.path.exists(target):  # stale incomplete copy from a killed run
            shutil.rmtree(target)
        os.replace(partial, target)
        with open(marker, "w") as f:
            f.write(loc.uri + "\n")
        log.info("downloaded model %s to %s", loc.uri, target)
        return target
