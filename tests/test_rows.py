import numpy as np
import pyarrow as pa

from kandinsky_engine.config import GenerationDefaults
from kandinsky_engine.rows import derive_seed, group_rows, latent_size, resolve_params


def test_derived_seed_depends_only_on_job_seed_and_id():
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert derive_seed(0, "a") != derive_seed(0, "b")
    assert derive_seed(0, "a") != derive_seed(1, "a")
    assert 0 <= derive_seed(5, "x" * 10_000) < 2**63


def test_row_values_override_defaults_and_nulls_fall_back():
    defaults = GenerationDefaults(seed=3, width=64, guidance_scale=4.0)
    table = pa.table({
        "id": ["a", "b"],
        "prompt": ["p", "q"],
        "seed": pa.array([11, None], pa.int64()),
        "width": pa.array([128, None], pa.int32()),
    })
    out, problems = resolve_params(table, defaults)
    assert problems == {}
    assert out["seed"].to_pylist() == [11, derive_seed(3, "b")]
    assert out["width"].to_pylist() == [128, 64] and out["width"].type == pa.int64()
    assert out["guidance_scale"].to_pylist() == [4.0, 4.0]
    assert out["negative_prompt"].to_pylist() == [None, None]
    assert "prompt" not in out


def test_grouping_and_latent_sizes():
    batch = {"id": np.array(["a", "b", "c"]), "w": np.array([64, 128, 64])}
    groups = group_rows(batch, lambda i: (int(batch["w"][i]),))
    assert {k: v.tolist() for k, v in groups.items()} == {(64,): [0, 2], (128,): [1]}
    assert latent_size(64, 128, 8) == (8, 16)
    assert latent_size(720, 512, 8) == (96, 64)  # 720 rounds up to 768, as diffusers does


def test_nulls_as_ray_hands_them_over():
    from kandinsky_engine.rows import is_null

    assert is_null(None) and is_null(float("nan")) and is_null(np.float32("nan")) and is_null(np.float64("nan"))
    assert not is_null("") and not is_null("nan") and not is_null(0.0) and not is_null(b"")
