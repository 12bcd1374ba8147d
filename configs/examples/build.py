"""Writes the example manifests next to this file (run: python configs/examples/build.py).

Inputs are synthetic, generated here and embedded as PNG bytes, so every example is
self-contained. The committed .parquet files are this script's output.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scene(width: int = 64, height: int = 64, hue: int = 0) -> Image.Image:
    """A sky-and-ground picture with a sun: something recognisable to img2img and the encoders."""
    y = np.linspace(0, 1, height)[:, None, None]
    sky = np.array([90 + hue, 150, 230]) * (1 - y) + np.array([30, 110 + hue // 2, 40]) * y
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    ImageDraw.Draw(image).ellipse([width * 0.6, height * 0.1, width * 0.85, height * 0.35], fill=(250, 220, 80))
    return image


def mask(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) disc in the middle, black (keep) elsewhere."""
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).ellipse([width * 0.25, height * 0.25, width * 0.75, height * 0.75], fill=255)
    return image


def depth(width: int = 64, height: int = 64) -> Image.Image:
    """A depth-like hint: a near sphere in front of a receding floor."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    floor = 255 * yy
    sphere = np.clip(255 * (1 - 4 * ((xx - 0.5) ** 2 + (yy - 0.45) ** 2)), 0, 255)
    return Image.fromarray(np.maximum(floor, sphere).astype(np.uint8)).convert("RGB")


def write(name: str, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), HERE / f"{name}.parquet")


def main() -> None:
    write("img2img", [
        {"id": f"img2img-{s}", "prompt": p, "task": "img2img", "image_bytes": png(scene(hue=20 * i)), "strength": s}
        for i, (p, s) in enumerate([("a watercolor landscape", 0.5), ("Пейзаж маслом", 0.75), ("水彩风景画", 0.9)])
    ])
    write("inpaint", [
        {"id": "inpaint-hat", "prompt": "a red balloon", "task": "inpaint", "image_bytes": png(scene()),
         "mask_bytes": png(mask())},
        {"id": "inpaint-wide", "prompt": "a small house", "task": "inpaint", "width": 128,
         "image_bytes": png(scene(128, 64)), "mask_bytes": png(mask(128, 64))},
    ])
    write("mix", [
        {"id": "mix-cat-scene", "prompt": "a cat in a landscape", "task": "mix",
         "mix": [{"text": "a cat", "weight": 0.5}, {"image_bytes": png(scene()), "weight": 0.5}]},
        {"id": "mix-two-texts", "prompt": "city and forest", "task": "mix",
         "mix": [{"text": "a city at night", "weight": 0.3}, {"text": "лес", "weight": 0.7}]},
    ])
    write("variation", [
        {"id": f"variation-{s}", "prompt": "the same scene at sunset", "task": "variation",
         "image_bytes": png(scene(hue=40)), "strength": s}
        for s in (0.3, 0.7)
    ])
    write("kandinsky21", [  # Kandinsky 2.1's decoder reads the prompt too (and the negative prompt)
        {"id": "k21-text", "prompt": "a red cat, 4k photo", "negative_prompt": "blurry"},
        {"id": "k21-multilingual", "prompt": "Кот на крыше, акварель", "width": 128},
        {"id": "k21-img2img", "prompt": "a watercolor landscape", "task": "img2img", "image_bytes": png(scene()),
         "strength": 0.6},
        {"id": "k21-mix", "prompt": "a cat in a landscape", "task": "mix",
         "mix": [{"text": "a cat", "weight": 0.6}, {"image_bytes": png(scene(hue=40)), "weight": 0.4}]},
    ])
    write("controlnet", [
        {"id": "controlnet-hint", "prompt": "a robot, 4k photo", "task": "controlnet", "hint_bytes": png(depth())},
        {"id": "controlnet-depth", "prompt": "a marble statue", "task": "controlnet", "image_bytes": png(scene())},
        {"id": "controlnet-img2img", "prompt": "a bronze statue", "task": "controlnet_img2img",
         "image_bytes": png(scene(hue=30)), "hint_bytes": png(depth()), "strength": 0.8},
    ])
    write("kandinsky3", [  # model.decoder: tiny-k3 (configs/examples/kandinsky3.yaml)
        {"id": "k3-cat", "prompt": "a red cat, 4k photo"},
        {"id": "k3-lighthouse", "prompt": "a lighthouse in a storm at night, oil painting", "negative_prompt": "blurry",
         "width": 128},
        {"id": "k3-bear", "prompt": "Медведь в лесу", "guidance_scale": 1.0},
        {"id": "k3-img2img", "prompt": "a watercolor landscape", "task": "img2img", "image_bytes": png(scene()),
         "strength": 0.75},
        {"id": "k3-img2img-wide", "prompt": "the same at sunset", "task": "img2img", "width": 128,
         "image_bytes": png(scene(128, 64, hue=40)), "strength": 0.5},
    ])

    write("kandinsky20", [  # model.decoder: tiny-k20 (configs/examples/kandinsky20.yaml); no prior, two text encoders
        {"id": "k20-cat", "prompt": "a red cat, 4k photo"},
        {"id": "k20-multilingual", "prompt": "Кот на крыше, акварель", "negative_prompt": "blurry", "width": 128},
        {"id": "k20-unguided", "prompt": "山水画", "guidance_scale": 1.0},
        {"id": "k20-img2img", "prompt": "a watercolor landscape", "task": "img2img", "image_bytes": png(scene()),
         "strength": 0.5},
    ])


if __name__ == "__main__":
    main()
