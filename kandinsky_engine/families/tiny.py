"""The tiny offline models of every family, built once into the local cache.

Sources named 'tiny' or 'tiny-<variant>' (model.prior, model.decoder, model.depth) resolve to
`<cache>/tiny-v<N>/<part>` or `<part>-<variant>` (see models.locate_source, which the family
registry hands `ensure_tiny_model`: the ground floor never imports the families); each family's
builder (kandinsky_engine/families/<family>/tiny.py) writes its directories there with
`save_pretrained` (safetensors, diffusers layout), so jobs load them through the same
`from_pretrained` path as real weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "7"  # bump when a family's tiny architecture changes, so cached copies are rebuilt


def write_tiny_model(root: str | os.PathLike) -> Path:
    """Write every family's tiny model directories under `root`."""
    from . import FAMILIES

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _quiet():
        for family in FAMILIES.values():
            family.write_tiny(root)
    (root / "tiny.json").write_text(json.dumps({"tiny_version": TINY_VERSION}))
    return root


@contextlib.contextmanager
def _quiet():
    """Building is a detail of a first run: no "Writing model shards" bar per saved module, and no
    notice that the image processors fall back to their PIL backend (no torchvision here)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, level in zip((diffusers_logging, transformers_logging), levels):
            library.enable_progress_bar()
            library.set_verbosity(level)


def ensure_tiny_model(cache_dir: str | os.PathLike) -> Path:
    """Build the tiny model once into `cache_dir/tiny-v{N}` and return that directory.

    Safe against concurrent callers (several actors on one node): each builds into a private
    temporary directory and renames it into place; the loser of the race discards its copy.
    """
    target = Path(cache_dir).expanduser() / f"tiny-v{TINY_VERSION}"
    if (target / "tiny.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        write_tiny_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tiny.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
