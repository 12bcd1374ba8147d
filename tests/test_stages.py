"""Stage classes called directly on plain dicts: no Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from kandinsky_engine.columns import unpack_passthrough
from tests.conftest import batch_of, make_config

ROWS = [
    {"id": "a", "prompt": "a cat", "extra": "kept"},
    {"id": "b", "prompt": "a dog", "negative_prompt": "blur", "width": 128, "extra": "too"},
]


@pytest.fixture(scope="module")
def config(model_cache, tmp_path_factory):
    return make_config(model_cache, "m.parquet", str(tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="module")
def prior_out(config):
    return PriorStage(config)(batch_of(ROWS, config))


@pytest.fixture(scope="module")
def decoder_out(config, prior_out):
    return DecoderStage(config)(prior_out)


def test_prior_adds_embeddings(prior_out):
    assert prior_out["image_embeds"].shape == (2, 32) and prior_out["image_embeds"].dtype == np.float32
    assert prior_out["negative_image_embeds"].shape == (2, 32)
    # Pass-through columns ride along as the unit's Arrow blob, untouched by the stage.
    assert unpack_passthrough([prior_out["_passthrough"][0]])["extra"].to_pylist() == ["kept", "too"]
    assert np.isfinite(prior_out["image_embeds"]).all()


def test_decoder_latents_follow_each_rows_size(decoder_out):
    from kandinsky_engine.inputs import unpack

    # 64x64 and 64 high x 128 wide, MoVQ factor 8: packed float32 (4, H/8, W/8)
    assert [len(b) for b in decoder_out["latents"]] == [4 * 8 * 8 * 4, 4 * 8 * 16 * 4]
    assert np.isfinite(unpack(decoder_out["latents"][1], (4, 8, 16))).all()
    assert "image_embeds" not in decoder_out


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_movq_encodes_requested_format(config, decoder_out, fmt, pil):
    stage = MovqStage(config.model_copy(update={"output": config.output.model_copy(update={"image_format": fmt})}))
    out = stage(decoder_out)
    assert "latents" not in out
    images = [Image.open(io.BytesIO(b)) for b in out["image"]]
    assert [im.format for im in images] == [pil, pil]
    assert [im.size for im in images] == [(64, 64), (128, 64)]


@pytest.mark.parametrize("policy, size", [("crop", (100, 72)), ("round_up", (128, 128))])
def test_size_policy(config, policy, size):
    cfg = config.model_copy(update={"output": config.output.model_copy(update={"size_policy": policy})})
    batch = DecoderStage(cfg)(PriorStage(cfg)(batch_of([{"id": "z", "prompt": "x", "width": 100, "height": 72}], cfg)))
    out = MovqStage(cfg)(batch)
    assert Image.open(io.BytesIO(out["image"][0])).size == size
    assert (out["image_width"][0], out["image_height"][0]) == size
    assert (out["width"][0], out["height"][0]) == (100, 72)  # the request is kept too


def test_crop_is_centred(config):
    from kandinsky_engine.stages.movq import centre_crop

    image = np.arange(8 * 8).reshape(8, 8)
    assert centre_crop(image, 4, 6).tolist() == image[2:6, 1:7].tolist()


@pytest.mark.parametrize("stage", [PriorStage, DecoderStage, MovqStage])
def test_missing_columns_name_the_stage(config, stage):
    instance = stage.__new__(stage)  # the column check runs before any model is touched
    with pytest.raises(ValueError, match=f"{stage.__name__}: batch lacks columns"):
        instance({"id": np.array(["a"])})


def test_encoding_off_the_movq_actor_gives_the_same_bytes(config, decoder_out):
    from kandinsky_engine.stages.movq import encode_images

    decoded = MovqStage(config, encode=False)(decoder_out)
    assert "image" not in decoded and [len(p) for p in decoded["pixels"]] == [64 * 64 * 3, 64 * 128 * 3]
    encoded = encode_images(decoded, config.output)
    assert "pixels" not in encoded
    assert list(encoded["image"]) == list(MovqStage(config)(decoder_out)["image"])


def test_png_compress_level_changes_bytes_not_pixels(config, decoder_out):
    from kandinsky_engine.stages.movq import encode_images

    decoded = MovqStage(config, encode=False)(decoder_out)
    levels = {lvl: encode_images(decoded, config.output.model_copy(update={"png_compress_level": lvl}))["image"]
              for lvl in (0, 6, 9)}
    assert levels[0][0] != levels[6][0] and len(levels[0][0]) > len(levels[9][0])
    for images in levels.values():
        pixels = [np.asarray(Image.open(io.BytesIO(b))) for b in images]
        assert [p.tobytes() for p in pixels] == list(decoded["pixels"])


def test_a_row_that_fails_to_encode_fails_alone(config, decoder_out):
    from kandinsky_engine.stages.movq import encode_images

    decoded = MovqStage(config, encode=False)(decoder_out)
    decoded["pixels"] = decoded["pixels"].copy()
    decoded["pixels"][0] = b"\x00" * 7  # not 64 x 64 x 3 bytes
    out = encode_images(decoded, config.output)
    assert out["image"][0] is None and out["error_stage"][0] == "encode_images" and "reshape" in out["error_message"][0]
    assert Image.open(io.BytesIO(out["image"][1])).size == (128, 64) and not out["error_message"][1]
