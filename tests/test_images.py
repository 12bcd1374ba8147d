"""Input images and masks: every mode decodes to 8-bit RGB / L, EXIF is applied, bad files fail clearly."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps

from kandinsky_engine.images import (
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    decode_image,
    decode_mask,
    fit_to_size,
    read_uri,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(im: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def row(mode: str, values: list) -> Image.Image:
    """A 1-pixel-high image holding `values` left to right."""
    im = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        im.putpixel((x, 0), value)
    return im


def palette_image() -> Image.Image:
    im = row("P", [0, 1, 2])
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    return im


def pgm16(values: list[int]) -> bytes:
    """A 16-bit PGM, which Pillow opens as mode 'I' (the 16-bit PNG of older Pillows did too)."""
    return f"P5\n{len(values)} 1\n65535\n".encode() + b"".join(v.to_bytes(2, "big") for v in values)


# (file mode as opened, encoded bytes, expected RGB of each pixel left to right)
MATRIX = {
    "1": ("1", encode(row("1", [0, 1])), [(0, 0, 0), (255, 255, 255)]),
    "L": ("L", encode(row("L", [0, 100, 255])), [(0, 0, 0), (100, 100, 100), (255, 255, 255)]),
    "L+tRNS": ("L", encode(row("L", [5, 100]), transparency=5), [BACKGROUND, (100, 100, 100)]),
    "LA": ("LA", encode(row("LA", [(200, 255), (0, 0), (0, 128)])), [(200, 200, 200), BACKGROUND, (127, 127, 127)]),
    "P": ("P", encode(palette_image()), [(10, 20, 30), (200, 100, 50), (0, 255, 0)]),
    "P+transparency": ("P", encode(palette_image(), transparency=1), [(10, 20, 30), BACKGROUND, (0, 255, 0)]),
    "P+tRNS-alpha": ("P", encode(palette_image(), transparency=b"\xff\x00\x80"), [(10, 20, 30), BACKGROUND, (127, 255, 127)]),
    "RGB": ("RGB", encode(row("RGB", [(1, 2, 3), (250, 128, 0)])), [(1, 2, 3), (250, 128, 0)]),
    "RGB+tRNS": ("RGB", encode(row("RGB", [(1, 2, 3), (4, 5, 6)]), transparency=(4, 5, 6)), [(1, 2, 3), BACKGROUND]),
    "RGBA": ("RGBA", encode(row("RGBA", [(10, 20, 30, 255), (10, 20, 30, 0), (0, 0, 0, 128)])),
             [(10, 20, 30), BACKGROUND, (127, 127, 127)]),
    "CMYK": ("CMYK", encode(row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), "TIFF"),
             [(255, 255, 255), (0, 255, 255), (0, 0, 0)]),
    "I;16": ("I;16", encode(row("I;16", [0, 32768, 65535, 257 * 100])),
             [(0, 0, 0), (128, 128, 128), (255, 255, 255), (100, 100, 100)]),
    "I (16-bit PGM)": ("I", pgm16([0, 32768, 65535]), [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
    "I (TIFF, clipped)": ("I", encode(row("I", [-5, 32768, 70000]), "TIFF"), [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
    "F": ("F", encode(row("F", [0.0, 0.5, 1.0, 2.0, -1.0, float("nan")]), "TIFF"),
          [(0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 255, 255), (0, 0, 0), (0, 0, 0)]),
}


@pytest.mark.parametrize("case", MATRIX)
def test_every_mode_decodes_to_rgb(case):
    file_mode, data, expected = MATRIX[case]
    assert Image.open(io.BytesIO(data)).mode == file_mode  # the file really exercises that mode
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == (len(expected), 1)
    got = [im.getpixel((x, 0)) for x in range(len(expected))]
    # Half-transparent pixels are allowed one step of compositing rounding; the rest are exact.
    assert np.abs(np.array(got, int) - np.array(expected, int)).max() <= 1, got


def oriented(orientation: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A 40x20 image, blue with a red top-left 10x10 block, tagged with an EXIF orientation."""
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im.convert(mode), fmt, exif=exif.tobytes())


def near(pixel, colour) -> bool:
    return max(abs(a - b) for a, b in zip(pixel, colour)) <= 40  # JPEG is lossy


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    data = oriented(orientation)
    im = decode_image(data)
    assert im.size == ((20, 40) if orientation >= 5 else (40, 20))
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(im), np.asarray(reference))


def test_exif_orientation_by_hand():
    # 6: the camera was turned clockwise, so the stored top-left corner is shown top-right.
    im = decode_image(oriented(6))
    assert im.size == (20, 40) and near(im.getpixel((15, 5)), RED) and near(im.getpixel((5, 5)), BLUE)
    # 3: upside down, so the red corner is shown bottom-right.
    im = decode_image(oriented(3))
    assert im.size == (40, 20) and near(im.getpixel((35, 15)), RED) and near(im.getpixel((5, 5)), BLUE)


def test_exif_orientation_survives_mode_conversion():
    # TIFF keeps orientation in its own tags, which convert() drops: transposing must come first.
    im = decode_image(oriented(6, "TIFF", mode="L"))
    assert im.mode == "RGB" and im.size == (20, 40)
    assert decode_mask(oriented(8, "PNG")).size == (20, 40)


def noisy(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), fmt)


def png_header_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR (CRC fixed) claims another size: a bomb without the memory."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # after signature (8), length (4), b"IHDR" (4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file (0 bytes)"),
        (np.random.default_rng(1).bytes(1000), "not a decodable image: unrecognised format"),
        (b"\x89PNG\r\n\x1a\n", "not a decodable image: "),
        (noisy("PNG")[: len(noisy("PNG")) // 2], "not a decodable image: "),
        (noisy("JPEG")[: len(noisy("JPEG")) // 2], "not a decodable image: "),
    ],
    ids=["empty", "random-bytes", "png-signature-only", "truncated-png", "truncated-jpeg"],
)
@pytest.mark.parametrize("decode", [decode_image, decode_mask])
def test_bad_bytes_are_rejected(decode, data, reason):
    with pytest.raises(ImageInputError) as err:
        decode(data)
    assert str(err.value).startswith(reason)


@pytest.mark.parametrize("decode", [decode_image, decode_mask])
def test_decompression_bomb_rejected_from_header(decode):
    # 400M pixels: Pillow would raise its own DecompressionBombError; only 1x1 of data exists, so
    # getting the size message (not a truncation error) shows the check ran before decoding.
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning either
        with pytest.raises(ImageInputError) as err:
            decode(png_header_claiming(20000, 20000))
        with pytest.raises(ImageInputError, match="10000x10000 = 100000000 pixels"):
            decode(png_header_claiming(10000, 10000))  # in Pillow's warning band
    assert str(err.value) == f"image is 20000x20000 = 400000000 pixels, over the limit of {DEFAULT_MAX_PIXELS}"
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_is_per_call():
    data = encode(Image.new("RGB", (40, 20)))
    with pytest.raises(ImageInputError, match=r"^image is 40x20 = 800 pixels, over the limit of 799$"):
        decode_image(data, max_pixels=799)
    assert decode_image(data, max_pixels=800).size == (40, 20)


def test_pillow_global_limit_does_not_interfere(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x20 is over twice this: Pillow would raise
    assert decode_image(encode(Image.new("RGB", (40, 20)), "TIFF")).size == (40, 20)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


def test_concurrent_decodes_restore_pillow_limit():
    data, limit_before = encode(Image.new("RGB", (40, 20))), Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(8) as pool:
        assert {im.size for im in pool.map(lambda _: decode_image(data), range(200))} == {(40, 20)}
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_read_uri_local_and_file_url(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(data := encode(Image.new("RGB", (4, 4), RED)))
    assert read_uri(str(path)) == data
    assert read_uri(f"file://{path}") == data
    assert decode_image(read_uri(f"file://{path}")).getpixel((0, 0)) == RED


def test_read_uri_errors(tmp_path):
    with pytest.raises(ImageInputError, match=f"^file not found: {tmp_path}/nope.png$"):
        read_uri(str(tmp_path / "nope.png"))
    with pytest.raises(ImageInputError, match=f"^file not found: file://{tmp_path}/nope.png$"):
        read_uri(f"file://{tmp_path}/nope.png")
    with pytest.raises(ImageInputError, match=f"^cannot read {tmp_path}: IsADirectoryError: "):
        read_uri(str(tmp_path))
    with pytest.raises(ImageInputError, match="^cannot read nosuchproto://b/x.png: ValueError: "):
        read_uri("nosuchproto://b/x.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"^empty file \(0 bytes\)$"):
        decode_image(read_uri(str(tmp_path / "empty.png")))


def test_mask_from_rgb_and_grey():
    mask = decode_mask(encode(row("RGB", [(255, 255, 255), (0, 0, 0)])))
    assert mask.mode == "L" and list(mask.tobytes()) == [255, 0]
    assert list(decode_mask(encode(row("L", [0, 77, 255]))).tobytes()) == [0, 77, 255]
    assert list(decode_mask(encode(row("1", [1, 0]))).tobytes()) == [255, 0]
    assert list(decode_mask(encode(row("I;16", [65535, 32768]))).tobytes()) == [255, 128]


def test_mask_transparent_means_keep():
    rgba = row("RGBA", [(255, 255, 255, 255), (255, 255, 255, 0), (0, 0, 0, 255), (255, 255, 255, 128)])
    assert list(decode_mask(encode(rgba)).tobytes()) == [255, 0, 0, 128]
    la = row("LA", [(255, 0), (255, 255)])
    assert list(decode_mask(encode(la)).tobytes()) == [0, 255]


def test_fit_to_size():
    im = Image.new("RGB", (40, 20), RED)
    resized = fit_to_size(im, 64, 48)
    assert resized.size == (64, 48) and resized.getpixel((63, 47)) == RED
    assert fit_to_size(im, 40, 20) is im
    assert fit_to_size(im, 10, 30, resample=Image.Resampling.NEAREST).size == (10, 30)
