"""Kandinsky 2.0's three samplers, batched per row: the original repository's `p_sampler`, `ddim_sampler` and
`plms_sampler` (ai-forever/Kandinsky-2 at aeefc1c: `model/gaussian_diffusion.py`, `model/respace.py`,
`model/samplers.py`, `kandinsky2_model.py`), written anew with the same float64 tables and float32 step
operations, in the same order, so that a row alone gives the original's latents at batch 1.

What differs from the original, where it is wrong for batch use (docs/kandinsky20.md shows both):
- the dynamic threshold's percentile is each row's own (the original takes batch element 0's and applies
  it to every row, so an image depended on its batch-mates);
- DDIM uses the configured eta (the original's `generate_img` rebinds `sampler` to the sampler object, so
  its `sampler == "ddim_sampler"` test fails and eta is always 0);
- DDIM and PLMS inpainting apply the original's inpainting `denoised_fn` (threshold, then the known region
  blended back) to each step's x0 prediction and re-derive eps from it, as 140d16d's DDIM did; the
  original at aeefc1c builds that function but passes it to `p_sampler` only.
Kept as the original has them: the timestep lists (DDIM/PLMS take every (1000 // N)-th timestep, so N that
do not divide 1000 run more than N steps, 75 -> 77), the final alpha of DDIM/PLMS (alpha_cumprod[0], not
1), the 99.5th-percentile threshold of every `p_sampler` step, and no threshold in DDIM/PLMS text2img.

Nothing here reads a device value back: the percentile is a sort on the device.
"""

from __future__ import annotations

import math

import numpy as np

TRAIN_STEPS = 1000
PERCENTILE = 99.5  # `dynamic_threshold_v` of generate_*, and the percentile hard-coded in p_sample's clip_denoised
SAMPLERS = {"ddpm": "p_sampler", "ddim": "ddim_sampler", "plms": "plms_sampler"}  # defaults.scheduler -> original


def f32(value):
    """A float64 table entry as the original extracts it (`torch.from_numpy(arr)[t].float()`): a 0-dim float32
    CPU tensor, which acts as a scalar beside device tensors."""
    import torch

    return torch.tensor(float(value), dtype=torch.float64).to(torch.float32)


def linear_betas(beta_start: float, beta_end: float, steps: int = TRAIN_STEPS) -> np.ndarray:
    """`get_named_beta_schedule("linear", steps)`: float64."""
    scale = 1000 / steps
    return np.linspace(scale * beta_start, scale * beta_end, steps, dtype=np.float64)


def respaced_timesteps(num_steps: int, steps: int = TRAIN_STEPS) -> list[int]:
    """`space_timesteps(steps, str(num_steps))`: one section, strided by a float accumulated step by step
    and rounded (Python's round, as the original)."""
    if steps < num_steps:
        raise ValueError(f"cannot divide section of {steps} steps into {num_steps}")
    stride = 1 if num_steps <= 1 else (steps - 1) / (num_steps - 1)
    taken, index = [], 0.0
    for _ in range(num_steps):
        taken.append(round(index))
        index += stride
    return sorted(set(taken))


class Tables:
    """The float64 tables of the original's `SpacedDiffusion(use_timesteps, betas)`: the kept timesteps'
    betas re-derived from the base alphas_cumprod, then GaussianDiffusion's tables of those betas."""

    def __init__(self, base_betas: np.ndarray, use: list[int]):
        base_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        self.timestep_map, betas, last = [], [], 1.0
        for i, cumprod in enumerate(base_cumprod):
            if i in set(use):
                betas.append(1 - cumprod / last)
                last = cumprod
                self.timestep_map.append(i)
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        variance = betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(variance[1], variance[1:]))
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - self.alphas_cumprod)


def dynamic_threshold(x, percentile: float = PERCENTILE):
    """Each row clipped to [-s, s] and divided by s, s = max(1, its `percentile` of |x|): the original's
    `np.percentile(..., axis=(1, 2, 3))` per row (numpy's linear method, bit for bit: the fraction is
    taken in float64 and rounded to float32 as numpy 2 does for a Python-float percentile)."""
    import torch

    flat = x.abs().reshape(x.shape[0], -1).sort(dim=1).values  # (n, C*h*w)
    m = flat.shape[1]
    virtual = (m - 1) * (percentile / 100)
    lo = int(math.floor(virtual))
    hi = min(lo + 1, m - 1)
    frac = virtual - lo
    a, b = flat[:, lo], flat[:, hi]
    if frac >= 0.5:
        s = b - (b - a) * f32(1 - frac).to(x.device)
    else:
        s = a + (b - a) * f32(frac).to(x.device)
    s = torch.clamp_min(s, 1.0).view(-1, *[1] * (x.ndim - 1))  # (n, 1, 1, 1)
    return torch.clip(x, -s, s) / s


class PSampler:
    """`p_sampler`: ancestral sampling on the schedule respaced to N steps, learned-range variance, every
    x0 prediction dynamic-thresholded (after the inpainting `denoised_fn`, when there is one)."""

    noisy = True  # draws noise every step

    def __init__(self, betas: np.ndarray, num_steps: int, start_step: int | None = None):
        self.tables = Tables(betas, respaced_timesteps(num_steps))
        indices = list(range(len(self.tables.timestep_map)))
        self.indices = (indices[:start_step] if start_step is not None else indices)[::-1]
        self.num_timesteps = len(self.tables.timestep_map)

    def model_timesteps(self) -> list[float]:
        """What the U-Net is given at each step (`_WrappedModel`: the original timestep, rescaled x 1000/1000)."""
        return [float(self.tables.timestep_map[i]) for i in self.indices]

    def run(self, x, eps_fn, noise, denoise=None):
        """x (n, C, h, w) at the first index -> x at t = 0. eps_fn(x, k) -> (guided eps, variance values) of
        step k; noise[k] the step's draws (n, C, h, w); denoise(x0) the inpainting denoised_fn or None."""
        import torch

        tb = self.tables
        for k, i in enumerate(self.indices):
            eps, var = eps_fn(x, k)
            frac = (var + 1) / 2
            log_variance = frac * f32(tb.log_betas[i]) + (1 - frac) * f32(tb.posterior_log_variance_clipped[i])
            x0 = f32(tb.sqrt_recip_alphas_cumprod[i]) * x - f32(tb.sqrt_recipm1_alphas_cumprod[i]) * eps
            if denoise is not None:
                x0 = denoise(x0)
            x0 = dynamic_threshold(x0)  # p_sample's clip_denoised, hard-coded at 99.5
            mean = f32(tb.posterior_mean_coef1[i]) * x0 + f32(tb.posterior_mean_coef2[i]) * x
            x = mean + torch.exp(0.5 * log_variance) * noise[k] if i != 0 else mean
        return x


class DDIMSampler:
    """`ddim_sampler` (and, with `plms=True`, `plms_sampler`): the full 1000-step schedule at timesteps
    range(0, 1000, 1000 // N) + 1 up to `start_step`, alpha_prev of the first = alpha_cumprod[0]."""

    def __init__(self, betas: np.ndarray, num_steps: int, start_step: int | None = None, eta: float = 0.0,
                 plms: bool = False):
        if plms and eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        cumprod = Tables(betas, list(range(TRAIN_STEPS))).alphas_cumprod
        timesteps = np.asarray(list(range(0, TRAIN_STEPS, TRAIN_STEPS // num_steps))) + 1
        if start_step is not None:
            timesteps = np.array([t for t in timesteps if t <= start_step])
        self.timesteps = timesteps
        self.alphas = cumprod[timesteps]
        self.alphas_prev = np.asarray([cumprod[0]] + cumprod[timesteps[:-1]].tolist())
        self.sigmas = eta * np.sqrt((1 - self.alphas_prev) / (1 - self.alphas) * (1 - self.alphas / self.alphas_prev))
        self.sqrt_one_minus_alphas = np.sqrt(1.0 - self.alphas)
        self.plms, self.noisy = plms, eta != 0

    def model_timesteps(self) -> list[float]:
        """The U-Net's timesteps, in order; PLMS also calls it at the next timestep on its first step."""
        return [float(t) for t in np.flip(self.timesteps)]

    def _step(self, x, e_t, index, noise, denoise):
        """x_t -> (x_prev, x0) with eps e_t (`p_sample_ddim` / PLMS's `get_x_prev_and_pred_x0`)."""
        a_t, a_prev = f32(self.alphas[index]), f32(self.alphas_prev[index])
        sigma, s1m = f32(self.sigmas[index]), f32(self.sqrt_one_minus_alphas[index])
        x0 = (x - s1m * e_t) / a_t.sqrt()
        if denoise is not None:  # inpainting: processed x0, and the eps that leads from x_t to it
            x0 = denoise(x0)
            e_t = (x - a_t.sqrt() * x0) / s1m
        x_prev = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).sqrt() * e_t
        return (x_prev + sigma * noise if noise is not None else x_prev), x0

    def run(self, x, eps_fn, noise, denoise=None):
        """As PSampler.run; eps_fn(x, k) is called with k = 0..steps-1, and PLMS's extra call on its first
        step with k = 1 (the next timestep, as the original's `t_next`), or k = 0 when there is one step."""
        total, old = len(self.timesteps), []
        for k in range(total):
            index = total - k - 1
            draw = noise[k] if self.noisy else None
            e_t = eps_fn(x, k)[0]
            if not self.plms:
                x, _ = self._step(x, e_t, index, draw, denoise)
                continue
            if not old:  # pseudo improved Euler (2nd order)
                x_next, _ = self._step(x, e_t, index, None, denoise)
                e_prime = (e_t + eps_fn(x_next, min(k + 1, total - 1))[0]) / 2
            elif len(old) == 1:  # Adams-Bashforth, 2nd to 4th order
                e_prime = (3 * e_t - old[-1]) / 2
            elif len(old) == 2:
                e_prime = (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
            else:
                e_prime = (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
            x, _ = self._step(x, e_prime, index, None, denoise)
            old = (old + [e_t])[-3:]
        return x


def make_sampler(kind: str, betas: np.ndarray, num_steps: int, start_step: int | None, eta: float):
    if kind == "ddpm":
        return PSampler(betas, num_steps, start_step)
    if kind in ("ddim", "plms"):
        return DDIMSampler(betas, num_steps, start_step, eta=eta if kind == "ddim" else 0.0, plms=kind == "plms")
    raise ValueError(f"Kandinsky 2.0 runs the samplers {sorted(SAMPLERS)}, not {kind!r}")


def check_steps(kind: str, num_steps: int) -> None:
    """DDIM and PLMS take timesteps range(0, 1000, 1000 // N) + 1; where that reaches 1000 (N = 3, 27, 37, ...:
    1000 // N divides 999) the original fails with an IndexError. Such a row fails alone, saying why."""
    if kind != "ddpm" and (TRAIN_STEPS - 1) % (TRAIN_STEPS // num_steps) == 0 and num_steps > 1:
        raise ValueError(f"{kind} with {num_steps} steps: the original's timesteps range(0, 1000, {TRAIN_STEPS // num_steps})"
                         " + 1 reach 1000, past its schedule (it fails there too); choose another step count")


def img2img_start(kind: str, num_steps: int, strength: float) -> int:
    """The original's `start_step = int(num_timesteps * (1 - strength_original))` with its strength = the share
    kept = 1 - ours (the share re-run); num_timesteps is N for p_sampler, 1000 for DDIM and PLMS."""
    total = num_steps if kind == "ddpm" else TRAIN_STEPS
    start = int(total * (1 - (1 - strength)))
    if start < 1:
        raise ValueError(f"strength {strength} x {total} timesteps leaves no step to run")
    return start


def q_sample_coefficients(betas: np.ndarray, timestep: int):
    """(sqrt(alpha_cumprod_t), sqrt(1 - alpha_cumprod_t)) of the 1000-step schedule, float32 (utils.q_sample)."""
    cumprod = np.cumprod(1.0 - betas, axis=0)
    return f32(np.sqrt(cumprod)[timestep]), f32(np.sqrt(1.0 - cumprod)[timestep])


def q_sample_timestep(kind: str, num_steps: int, start_step: int) -> int:
    """`diffusion.timestep_map[start_step - 1]`: the original timestep img2img noises its input to."""
    if kind == "ddpm":
        return respaced_timesteps(num_steps)[start_step - 1]
    return start_step - 1
