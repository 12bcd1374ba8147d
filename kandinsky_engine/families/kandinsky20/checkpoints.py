"""Reading the original Kandinsky 2.0 files without executing pickled code.

The released weights are pickles: `Kandinsky-2-0.pt` and `-inpainting.pt` (plain state dicts, float16 and float32
storages), `text_encoder1/` and `text_encoder2/pytorch_model.bin` (state dicts), and `vae.ckpt`, a PyTorch
Lightning checkpoint whose pickle also holds the trainer's state (epoch, optimizer and callback states) and
names Lightning's classes. Everything goes through torch's weights-only unpickler, which builds tensors and
plain containers only and refuses any other global. For the Lightning checkpoint, the callback classes that
Lightning pickles as dictionary keys (LIGHTNING_KEYS) are admitted as inert markers: a class named there
becomes `LightningClass`, which holds nothing and cannot be called, so the pickle cannot run its code either.
Anything else stops the conversion with the file and the refused name.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import tempfile
from pathlib import Path

# Lightning classes a training checkpoint names as keys of its "callbacks" dict (older Lightning versions key the
# callback states by the callback's class).
LIGHTNING_KEYS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
)


class LightningClass:
    """Stands for a Lightning class named in a checkpoint: an inert placeholder, never instantiated (the
    weights-only unpickler refuses to call it: it is admitted as a global, not as a constructor)."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("a Lightning class in the checkpoint was to be called; only its name is admitted")


class UnsafeCheckpoint(ValueError):
    """A file the converter will not unpickle; the message names the file and what it refused."""


def load_pickle(path: str | Path, lightning: bool = False) -> dict:
    """The object of a torch pickle, through `torch.load(weights_only=True)` (memory-mapped where the format
    allows); `lightning`: also admit LIGHTNING_KEYS as inert markers."""
    import torch

    markers = [(type(name.rsplit(".", 1)[1], (LightningClass,), {}), name) for name in LIGHTNING_KEYS] if lightning else []
    guard = torch.serialization.safe_globals(markers) if markers else contextlib.nullcontext()
    try:
        with guard:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long; its one useful line is what it refused ("Unsupported global: GLOBAL x.y").
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if line.startswith("Unsupported")), None) or next(
            (line.split("error:", 1)[1].strip() or "?" for line in lines if "error:" in line), type(exc).__name__)
        raise UnsafeCheckpoint(f"{path}: refused to unpickle ({refused}); the converter admits tensors and plain "
                               "containers only" + (", and Lightning's callback class names" if lightning else "")) from None


def state_dict(path: str | Path) -> dict:
    """A plain state dict file ({name: tensor}); anything else is refused."""
    sd = load_pickle(path)
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise UnsafeCheckpoint(f"{path}: not a state dict (a {type(sd).__name__} of tensors by name)")
    return sd


def lightning_state_dict(path: str | Path) -> dict:
    """The `state_dict` of a Lightning checkpoint (its other entries are read, through the same restrictions,
    and dropped)."""
    ckpt = load_pickle(path, lightning=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UnsafeCheckpoint(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt["state_dict"]


@contextlib.contextmanager
def local_copy(src: str, names: tuple[str, ...], storage_options: dict | None = None):
    """A local folder with the original files: `src` itself if local, else a temporary copy of `names` (files or
    folders under src: what the converter reads) from object storage or any fsspec URL, removed afterwards."""
    from ...model_cache import is_remote
    from ...storage import url_to_fs

    if not is_remote(src):
        yield Path(src.removeprefix("file://")).expanduser()
        return
    fs, root = url_to_fs(src, storage_options)
    tmp = Path(tempfile.mkdtemp(prefix="kandinsky20-original-"))
    try:
        for path in fs.find(root):
            rel = path[len(root.rstrip("/")) + 1:]
            if rel and rel.split("/")[0] in names:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(tmp / rel))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

