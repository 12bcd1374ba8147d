"""GPU checks: run where CUDA exists, skip cleanly elsewhere (CI never depends on them)."""

import pytest
import torch

from kandinsky_engine import DecoderStage, MovqStage, PriorStage
from tests.conftest import batch_of, make_config
from tests.reference import Reference, decode, max_diff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_stages_match_diffusers_on_cuda(model_cache, tiny_root, tmp_path, dtype):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    config = make_config(model_cache, "m.parquet", str(tmp_path), model={"device": "cuda", "dtype": dtype})
    rows = [{"id": "a", "prompt": "a red cat"}, {"id": "b", "prompt": "a ship", "negative_prompt": "blur", "width": 128}]
    out = MovqStage(config)(DecoderStage(config)(PriorStage(config)(batch_of(rows, config))))
    reference = Reference(tiny_root)
    torch_dtype = getattr(torch, dtype)
    reference.prior = KandinskyV22PriorPipeline.from_pretrained(tiny_root / "prior", torch_dtype=torch_dtype).to("cuda")
    reference.decoder = KandinskyV22Pipeline.from_pretrained(tiny_root / "decoder", torch_dtype=torch_dtype).to("cuda")
    resolved = batch_of(rows, config)
    for i in range(len(rows)):
        diff = max_diff(decode(out["image"][i]), reference.image({k: v[i] for k, v in resolved.items()}))
        print(f"{dtype} row {rows[i]['id']}: max |diff| {diff}/255")
        assert diff <= (1 if dtype == "float32" else 8)
