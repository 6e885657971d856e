"""The DDPM forward process of the Transfusion setting: a cosine noise schedule over T steps.

Pure tensor math with no module state, shared by the data pipeline's noising, the diffusion
loss, validation and the sampler, so all four agree on what timestep t means.
"""

import math

import torch

SCHEDULES = ("cosine",)


class DiffusionSchedule:
    """`alphas_cumprod[t]` (the signal fraction of x_t) for t in [0, T).

    Cosine schedule (Nichol & Dhariwal 2021, improved-diffusion's `betas_for_alpha_bar`):
    alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2) on s = t / T, betas clipped at 0.999.
    Kept in float64 and cast once where it is applied.
    """

    def __init__(self, timesteps: int = 1000, kind: str = "cosine") -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"mot.diffusion_schedule = {kind!r}: known schedules {list(SCHEDULES)}")
        if timesteps < 1:
            raise ValueError(f"mot.diffusion_timesteps = {timesteps}: must be at least 1")
        self.timesteps = timesteps
        self.kind = kind

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [
                min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                for i in range(timesteps)
            ],
            dtype=torch.float64,
        )
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def coefficients(
        self, t: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) per element of `t`, as `dtype` on t's device."""
        if t.device.type == "cpu" and bool(((t < 0) | (t >= self.timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.timesteps}); got {t.min()}..{t.max()}")
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac.sqrt().to(dtype), (1 - ac).sqrt().to(dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; `t` has x0's leading
        shape (one timestep per row: per latent position, or per image)."""
        signal, sigma = self.coefficients(t, x0.dtype)
        shape = t.shape + (1,) * (x0.dim() - t.dim())
        return signal.view(shape) * x0 + sigma.view(shape) * noise
