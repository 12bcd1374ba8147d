"""The README's table of parameters and bf16 GPU memory per stage, for every family, generated from
the stage memory model (kandinsky_engine/memory.py: the released architectures built on the meta
device), never typed by hand. `python -m kandinsky_engine.memory_table` prints it;
tests/test_docs.py checks that the README holds it as printed.
"""

from __future__ import annotations

from .memory import GIB

HEADER = ("| family (defaults) | stage (section) | models it loads | parameters | bf16 weights | "
          "estimated peak, 1 row |\n|---|---|---|---|---|---|")


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def family_rows(family) -> list[str]:
    """One line per stage of `family`'s text2img and img2img jobs, at its generation defaults."""
    from .config import JobConfig
    from .families import with_family
    from .memory import estimate_stage, reference_specs, released_module
    from .stage_calls import recipe

    config = with_family(JobConfig.model_validate({
        "input": {"manifest": "m"}, "output": {"path": "o"},
        "model": {"decoder": "released", "family": family.name, "device": "cuda", "dtype": "bfloat16"}}), family)
    d, specs = config.defaults, reference_specs(family.name)
    title = f"{family.title} ({d.width}x{d.height}, {d.num_inference_steps} steps)"
    lines = []
    for name, _, _ in family.stages(config, {"text2img", "img2img"}):
        tasks = {"img2img" if name == "encode" else "text2img"}
        parts, _ = recipe(family.name, name, tasks)
        counts = {part: sum(p.numel() for p in released_module(family.name, part).parameters()) for part in parts}
        models = " + ".join(f"{specs[part]['class'].rsplit('.', 1)[1]} {_count(n)}" for part, n in counts.items())
        need = estimate_stage(name, family.name, specs, dtype="bfloat16", batch_size=1, width=d.width,
                              height=d.height, steps=d.num_inference_steps, tasks=tasks)
        lines.append(f"| {title} | `{name}` | {models} | {_count(sum(counts.values()))} | "
                     f"{need.weights / GIB:.2f} GiB | {need.peak / GIB:.1f} GiB |")
    return lines


def table() -> str:
    from .families import FAMILIES

    return "\n".join([HEADER, *(line for family in FAMILIES.values() for line in family_rows(family))])


if __name__ == "__main__":
    print(table())
