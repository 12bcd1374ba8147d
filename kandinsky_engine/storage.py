"""Filesystems for every path of a job, through fsspec, with per-protocol options.

`storage_options` is keyed by protocol, as fsspec's own configuration is:
`{"s3": {"endpoint_url": ..., "key": ..., "secret": ...}}`. Options only reach the filesystem
of their protocol (a local manifest and an s3:// output can share one job). Credentials can
also come from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...),
which s3fs reads itself. Option values never appear in messages: `redact` removes them.

S3 gets retry defaults (see S3_RETRIES) unless the user chose their own. Every filesystem of a
job is built here (driver listing, Ray read tasks, input fetching, the writer), so all of them
retry alike. A refused request (403) is not retried by anyone; `access_checked` turns it into
one clear error naming the URL.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager

import fsspec

# botocore's retry policy for S3 (its client Config `retries`). Two layers retry S3 calls:
# - botocore, per HTTP request. "standard" mode retries 5xx answers (500/502/503/504), throttling
#   codes (SlowDown, ...) and connection errors (reset, closed, timeouts) with exponential backoff
#   and full jitter (rand * 2^n s, at most 20 s), behind a client-wide retry quota that stops
#   retry storms when the service is really down. "legacy" (botocore's default) stops after 5
#   attempts and has no quota. "adaptive" adds a client-side rate limiter that AWS documents as
#   experimental, and it only sees one process's traffic (each Ray worker has its own client),
#   so it cannot pace a cluster anyway.
# - s3fs, around each call: 5 attempts (a class attribute, not an option) on connection errors
#   and SlowDown that botocore gave up on. Nothing retries 4xx answers such as 403.
# 10 attempts wait at most 1+2+4+8+16+20*4 = 111 s between them (half that on average): they
# ride out a minute of trouble. At a 20% transient fault rate all 10 fail with p = 1e-7.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 10}
S3_PROTOCOLS = ("s3", "s3a")
# Object stores: a path starts with a bucket (or container), and a folder is only a key prefix.
OBJECT_STORES = (*S3_PROTOCOLS, "gs", "gcs", "abfs", "abfss", "az")

# `scheme://user:password@host/...`: the userinfo part of a URL (ftp, sftp, http, smb...). Up to
# the last `@` before the path, so that an unencoded `@` in a password is not left half shown.
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/?#\s]+@")
# Query parameters that carry a credential: presigned S3 and GCS URLs, Azure SAS (`sig`), tokened
# links. The value, up to the next parameter, is replaced; the name stays, to say what was there.
SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                 "x-goog-credential", "awsaccesskeyid", "sig", "signature", "token", "access_token",
                 "refresh_token", "id_token", "api_key", "apikey", "password", "key", "secret", "client_secret")
_SECRET_QUERY = re.compile(r"([?&;](?:" + "|".join(SECRET_PARAMS) + r")=)[^&#\s'\"]*", re.IGNORECASE)


def protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def options_for(url: str, storage_options: dict | None) -> dict:
    options = dict((storage_options or {}).get(protocol(url), {}))
    if protocol(url) in S3_PROTOCOLS:
        options = with_s3_retries(options)
    return options


def with_s3_retries(options: dict) -> dict:
    """`options` with S3_RETRIES merged into `config_kwargs.retries`: a user's own mode or attempt
    count (in the options, or in AWS_RETRY_MODE / AWS_MAX_ATTEMPTS) wins. Copies, never mutates:
    botocore rewrites the retries dict it is given."""
    config = dict(options.get("config_kwargs") or {})
    retries = dict(config.get("retries") or {})
    if "mode" not in retries and not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = S3_RETRIES["mode"]
    if not {"max_attempts", "total_max_attempts"} & retries.keys() and not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = S3_RETRIES["total_max_attempts"]
    if retries:
        config["retries"] = retries
    return {**options, "config_kwargs": config} if config else options


# Protocols whose fsspec backend is an extra of this package (pyproject.toml), not a dependency.
EXTRAS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    except ImportError as exc:  # fsspec's own text says only "Install gcsfs to access Google Storage"
        if protocol(url) not in EXTRAS:
            raise
        package, extra = EXTRAS[protocol(url)]
        raise RuntimeError(f"{redact_url(url)}: {protocol(url)}:// paths need {package}: pip install "
                           f"'kandinsky-engine[{extra}]' (the engine's image has it)") from exc


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return not fs_protocols(fs).isdisjoint(OBJECT_STORES)


# fsspec backends expand these in the paths given to rm, mv, copy and glob (s3fs does in every
# rm and mv): `s3://b/jobs/*` names every job. Output paths may not hold them (`refuse_glob`), and
# the engine's own deletes and moves below never expand anything.
GLOB_CHARS = re.compile(r"[*?\[\]]")


def refuse_glob(url: str, what: str = "output.path") -> None:
    """Raise ValueError if `url` has a glob character: a delete or move under it would touch
    other folders too (s3fs expands them)."""
    if (found := GLOB_CHARS.search(url)) is not None:
        raise ValueError(f"{what} {redact_url(url)} has the glob character {found[0]!r}: refused, because storage "
                         "tools (s3fs, gsutil, shells) expand * ? [ ] in paths, so a delete or move under it could "
                         "reach other folders; choose a path without them")


def remove_file(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete the one file `path`, exactly as named (no glob expansion); nothing if it is not there."""
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Delete the folder (or key prefix) `path` and everything below it, exactly as named: the
    files are listed with `find`, which never expands globs, and deleted by their names (S3: up
    to 1000 per DeleteObjects call). A file at `path` itself is deleted too. Returns the count."""
    path = path.rstrip("/")
    if is_local(fs):
        local = fs._strip_protocol(path)
        if os.path.isdir(local) and not os.path.islink(local):
            count = sum(len(files) for _, _, files in os.walk(local))
            shutil.rmtree(local)
            return count
        if not os.path.isfile(local):
            return 0
        remove_file(fs, path)
        return 1
    fs.invalidate_cache(path)
    try:
        names = sorted(fs.find(path))
    except FileNotFoundError:
        names = []
    if is_object_store(fs) and "s3" in fs_protocols(fs):
        for i in range(0, len(names), 1000):
            bucket = names[i].split("/", 1)[0]
            keys = [{"Key": name.split("/", 1)[1]} for name in names[i:i + 1000]]
            result = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            if result.get("Errors"):
                error = result["Errors"][0]
                raise OSError(f"could not delete {bucket}/{error.get('Key')}: {error.get('Code')} {error.get('Message')}")
    else:
        for name in names:
            remove_file(fs, name)
    fs.invalidate_cache()
    return len(names)


def move_file(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move one file, exactly as named: a rename on local disk (atomic, replaces `dst`; missing
    folders are made); on object stores a server-side copy, whose new object appears whole, then a
    delete of `src`."""
    if is_local(fs):
        dst = fs._strip_protocol(dst)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(fs._strip_protocol(src), dst)
        return
    fs.cp_file(src, dst)
    fs.rm_file(src)
    fs.invalidate_cache()


def copy_file(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Copy one file, exactly as named, so that `dst` appears whole or not at all: on local disk
    through a temporary name beside it and a rename; on object stores a server-side copy."""
    if is_local(fs):
        dst = fs._strip_protocol(dst)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.copy-{os.getpid()}"
        shutil.copyfile(fs._strip_protocol(src), tmp)
        os.replace(tmp, dst)
        return
    fs.cp_file(src, dst)
    fs.invalidate_cache()


def fs_protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"file", "local"} & fs_protocols(fs))


def is_http(fs: fsspec.AbstractFileSystem) -> bool:
    return bool({"http", "https"} & fs_protocols(fs))


def read_if_match(fs: fsspec.AbstractFileSystem, path: str, etag: str | None = None) -> bytes:
    """The bytes of the file at `path`, freshly read. On S3 with `etag`: only if the object still
    has that ETag (a conditional GetObject; a changed object raises an error whose cause is
    botocore's 412), so that what was described and what is read are one version."""
    if not ("s3" in fs_protocols(fs) and etag):
        fs.invalidate_cache(path)
        return fs.cat_file(path)
    from fsspec.asyn import sync

    bucket, _, key = fs._strip_protocol(path).partition("/")

    async def get() -> bytes:  # s3fs's own _cat_file has no If-Match
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key, IfMatch=etag)
        try:
            return await response["Body"].read()
        finally:
            response["Body"].close()

    return sync(fs.loop, get)


def ensure_dir(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Make the folder `path` where folders exist (local disk, ...). Nothing on object stores: a
    key needs no folder there, and s3fs's makedirs creates a missing bucket, so one typo in a
    bucket name would silently make a new bucket."""
    if not is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def secret_values(storage_options: dict | None) -> list[str]:
    """Every string option value long enough to be a credential, nested dicts included."""
    values, stack = [], [storage_options or {}]
    while stack:
        for value in stack.pop().values():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, str) and len(value) >= 4:
                values.append(value)
    return values


def redact_url(url: str) -> str:
    """`sftp://user:pass@host/m` -> `sftp://***@host/m`, `...?X-Amz-Signature=ab12` ->
    `...?X-Amz-Signature=***`: for URLs that are logged or recorded, alone or inside a message."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))


def redact(message: str, storage_options: dict | None) -> str:
    """Backends sometimes echo their arguments; keep option values and URL userinfo out of errors
    and logs."""
    message = redact_url(message)
    for value in secret_values(storage_options):
        message = message.replace(value, "***")
    return message


class StorageAccessError(PermissionError):
    """The storage refused access (HTTP 403, bad or expired credentials, local permissions)."""


def _request(exc: BaseException) -> str:
    """' (HTTP 403, ListObjectsV2)': status and operation of a refused request, where the backend
    kept them (s3fs chains botocore's ClientError); '' otherwise."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            operation = getattr(error, "operation_name", None)
            known = [x for x in (status and f"HTTP {status}", operation) if x]
            return f" ({', '.join(known)})" if known else ""
    return ""


@contextmanager
def access_checked(url: str, storage_options: dict | None, doing: str = "reading"):
    """Re-raise a PermissionError from the block as StorageAccessError naming `url` (no credentials).

    s3fs says only 'Access Denied' or 'Forbidden'; without the URL a job with a manifest, inputs
    and an output on three buckets leaves the user guessing which one is refused."""
    try:
        yield
    except StorageAccessError:
        raise
    except PermissionError as exc:
        hint = (f"; check the credentials (storage_options.{protocol(url)} or the environment) and the "
                f"permissions on it" if protocol(url) != "file" else "")
        raise StorageAccessError(f"access denied{_request(exc)} {doing} {redact_url(url)}: "
                                 f"{redact(str(exc), storage_options)}{hint}") from None
