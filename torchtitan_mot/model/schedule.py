"""The DDPM forward process of the Transfusion setting: a cosine noise schedule over T steps.

Pure tensor math with no module state, shared by the data pipeline's noising, the diffusion
loss, validation and the samplers (`ddpm_sample`, `ddim_sample`), so all four agree on what
timestep t means.
"""

import math
from collections.abc import Callable

import torch

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
"""An epsilon-prediction model as the samplers call it: (x_t, training timestep t) -> eps,
eps of x_t's shape. One t for the whole batch: every image is sampled in lockstep."""

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

    def sampling_timesteps(self, steps: int) -> list[int]:
        """`steps` training timesteps spread evenly over [0, T), from T - 1 down to 0 (as
        improved-diffusion's respacing: the Transfusion paper samples 250 of its 1000)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"sampling steps = {steps}: must lie in [1, {self.timesteps}] (the training timesteps)")
        grid = torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return grid.tolist()

    def _pairs(self, steps: int) -> list[tuple[int, float, float]]:
        """(t, alpha_bar_t, alpha_bar_s) for each step t -> s of the strided grid; after the
        last t the sampler lands on clean data, alpha_bar = 1."""
        ts = self.sampling_timesteps(steps)
        abar = self.alphas_cumprod.tolist()
        return [(t, abar[t], abar[s] if s is not None else 1.0) for t, s in zip(ts, ts[1:] + [None])]

    @torch.no_grad()
    def ddpm_sample(
        self, eps_fn: EpsFn, x: torch.Tensor, steps: int = 250, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Ancestral DDPM sampling from pure noise `x` (x_T) over `steps` strided timesteps.

        A step t -> s of the strided grid is the DDPM step of the respaced chain, whose
        beta is 1 - alpha_bar_t / alpha_bar_s: mean (x_t - beta / sqrt(1 - alpha_bar_t) eps)
        / sqrt(1 - beta), variance the posterior's beta (1 - alpha_bar_s) / (1 - alpha_bar_t)
        (the "fixed small" choice, which on the full grid is Ho et al.'s sigma^2 = beta~).
        The last step adds no noise; one randn draw of x's shape per earlier step, from
        `generator`. Works in x's dtype (float32 expected); eps is cast to it.
        """
        for t, abar_t, abar_s in self._pairs(steps):
            beta = 1.0 - abar_t / abar_s
            eps = eps_fn(x, t).to(x.dtype)
            x = (x - beta / math.sqrt(1.0 - abar_t) * eps) / math.sqrt(1.0 - beta)
            if abar_s < 1.0:
                var = beta * (1.0 - abar_s) / (1.0 - abar_t)
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + math.sqrt(var) * noise
        return x

    @torch.no_grad()
    def ddim_sample(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        steps: int = 250,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021, eq. 12) from pure noise `x` over `steps` strided
        timesteps: x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps + sigma z
        with sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_s)).
        eta = 0 is deterministic (no draws); eta = 1 is the same chain as `ddpm_sample`.
        """
        if eta < 0:
            raise ValueError(f"ddim eta = {eta}: must be >= 0")
        for t, abar_t, abar_s in self._pairs(steps):
            eps = eps_fn(x, t).to(x.dtype)
            x0 = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
            sigma = eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
            x = math.sqrt(abar_s) * x0 + math.sqrt(max(1.0 - abar_s - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x
