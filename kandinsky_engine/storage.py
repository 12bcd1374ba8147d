"""Filesystems for every path of a job, through fsspec, with per-protocol options.

`storage_options` is keyed by protocol, as fsspec's own configuration is:
`{"s3": {"endpoint_url": ..., "key": ..., "secret": ...}}`. Options only reach the filesystem
of their protocol (a local manifest and an s3:// output can share one job). Credentials can
also come from the standard environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...),
which s3fs reads itself. Option values never appear in messages: `redact` removes them.
"""

from __future__ import annotations

import re

import fsspec

# `scheme://user:password@host/...`: the userinfo part of a URL (ftp, sftp, http, smb...).
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def options_for(url: str, storage_options: dict | None) -> dict:
    return dict((storage_options or {}).get(protocol(url), {}))


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **options_for(url, storage_options))


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
    """`sftp://user:pass@host/m` -> `sftp://***@host/m`: for URLs that are logged or recorded."""
    return _USERINFO.sub(r"\1***@", url)


def redact(message: str, storage_options: dict | None) -> str:
    """Backends sometimes echo their arguments; keep option values and URL userinfo out of errors
    and logs."""
    message = redact_url(message)
    for value in secret_values(storage_options):
        message = message.replace(value, "***")
    return message
