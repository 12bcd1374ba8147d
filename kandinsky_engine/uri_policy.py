"""The input policy: which URIs a manifest may make the job read (`input.allowed_uri_prefixes`).

A manifest is untrusted input, and its `image_uri`, `mask_uri`, `hint_uri` and mix `image_uri`
cells are read with the job's own credentials; an image read that way can come back out through
img2img. So a manifest may read only below its own storage location (the folder of a file
manifest, the folder itself, or the part of a glob before its first wildcard) and below the
prefixes the job lists explicitly. Everything else is refused: other buckets, local files,
http(s) endpoints, chained URLs (`simplecache::s3://...`) and other schemes (`memory://`, `zip://`).

A URI and a prefix are compared in one canonical form (see `canonical`), segment by segment, so
`s3://b/in` allows `s3://b/in/x.png` but not `s3://b/input-secret/x.png`. Local paths are compared
after resolving symlinks, and `..` segments are refused outright, so neither can step out of an
allowed folder. The check needs no I/O beyond `os.path.realpath`: validation runs it on the
driver, and fetching runs it again on the worker that reads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import fsspec

from .storage import redact_url

RULE = "input.allowed_uri_prefixes"
LOCAL_PROTOCOLS = (None, "file", "local")  # fsspec's names for the local filesystem (None: a plain path)
GLOB = re.compile(r"[*?\[]")
# Characters on which URL parsers disagree, refused in URLs so that what we check is what is read:
# `http://a\@b/` is host b to urllib but host a to a WHATWG parser (aiohttp's yarl), which also
# drops tabs and newlines anywhere, so `/img/.\t./x` would become `/img/../x` after our check.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_AMBIGUOUS_HOST = re.compile(r"[\\\s]")


class UriRefused(ValueError):
    """The input policy refuses a URI; str(err) names the rule, the URI (redacted) and why."""


def canonical(uri: str) -> str:
    """The form in which URIs and prefixes are compared.

    Local paths (plain, `file://`, `local://`) become `file://` + their realpath: symlinks are
    resolved, so a link inside an allowed folder to /etc/passwd is /etc/passwd. URLs become
    `scheme://host[:port]/path`, lower-case scheme and host, without userinfo, query or fragment.
    Chained URLs (`a::b`) stay as given: they match only a prefix that names the same chain.
    """
    if "::" in uri:
        return uri
    if (path := _local_path(uri)) is not None:
        return "file://" + os.path.realpath(path)
    if _CONTROL.search(uri):
        raise ValueError("it has a control character")
    parts = urlsplit(uri)
    if _AMBIGUOUS_HOST.search(parts.netloc):
        raise ValueError("its host part has a backslash or a space")
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}{parts.path}"


def _local_path(uri: str) -> str | None:
    """The path of a local URI (plain, file://, local://); None for any other scheme."""
    protocol, path = fsspec.core.split_protocol(uri)
    return path if protocol in LOCAL_PROTOCOLS else None


def _under(target: str, prefix: str) -> bool:
    """On a segment boundary: `s3://b/in` holds `s3://b/in` and `s3://b/in/x`, not `s3://b/input`."""
    return target == prefix.rstrip("/") or target.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _shown(prefix: str) -> str:
    return redact_url(prefix.removeprefix("file://") if prefix.startswith("file:///") else prefix)


def manifest_location(manifest: str, listed_file: str) -> str:
    """The storage location of a manifest: the folder of a file, the folder itself, or the part of a
    glob before its first wildcard (cut back to a folder). `listed_file` is one file listed from it,
    which tells a file (it is the manifest) from a folder (the file lies below it)."""
    where, listed = canonical(manifest), canonical(listed_file)
    if listed == where:
        folder = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
        return folder + "/" if folder.endswith("://") or not folder else folder  # "/m.parquet" lies in "/"
    if _under(listed, where):
        return manifest
    match = GLOB.search(manifest)
    return manifest[: manifest.rfind("/", 0, match.start()) + 1] if match else manifest


@dataclass(frozen=True)
class UriPolicy:
    """The prefixes a job's manifest may read below, in canonical form (`canonical`)."""

    prefixes: tuple[str, ...]

    @classmethod
    def for_manifest(cls, manifest: str, listed_file: str, allowed: list[str] | tuple[str, ...] = ()) -> UriPolicy:
        """The manifest's own location plus the explicitly allowed prefixes."""
        return cls(tuple(dict.fromkeys(canonical(p) for p in (manifest_location(manifest, listed_file), *allowed))))

    def check(self, uri: str) -> str:
        """The path to read for `uri` (a local path resolved to its realpath, a URL as given), or
        UriRefused naming the rule."""
        shown = redact_url(uri)
        if ".." in re.split(r"[/\\]", unquote(uri)):
            raise UriRefused(f"refused by {RULE}: {shown} has a '..' segment")
        try:
            target = canonical(uri)
        except ValueError as exc:  # urllib's own (a bad IPv6 host...) or ours
            raise UriRefused(f"refused by {RULE}: {shown} is not a URL we can check: {exc}") from None
        if not any(_under(target, prefix) for prefix in self.prefixes):
            if target.startswith("file:///") and target[len("file://"):] != os.path.abspath(_local_path(uri)):
                shown += f" (a link to {_shown(target)})"
            raise UriRefused(f"refused by {RULE}: {shown} is outside [{', '.join(map(_shown, self.prefixes))}]")
        return target.removeprefix("file://") if target.startswith("file:///") else uri
