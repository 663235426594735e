"""The fine-tuning objective (docs/finetuning.md, "The objective"), one function per term.

L = L_diff + λ·(L_recoverable + η·L_anti). The classifier f is frozen: its parameters get no
gradient, but gradients flow *through* it into the denoiser D, which is what is trained. Every
function takes classifier logits of shape (M, B, C): M independent denoisings of a batch of B images.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.models.denoiser import OneShotDenoiser

RecoverableKind = Literal["ce", "brier"]


@dataclass(frozen=True)
class LossSettings:
    """Options of the objective; `sigmas` is the cascade's scale set the training scales are drawn from."""

    sigmas: tuple[float, ...] = (1.0, 0.5, 0.25)
    num_denoisings: int = 2
    lambda_cls: float = 1.0
    eta_anti: float = 1.0
    recoverable_loss: RecoverableKind = "ce"

    def __post_init__(self) -> None:
        if not self.sigmas or any(s <= 0 for s in self.sigmas):
            raise UserError(f"sigmas must be positive, got {self.sigmas}")
        if self.num_denoisings < 2:
            raise UserError(
                f"the number of denoisings M must be at least 2 (anti-consistency compares pairs), "
                f"got {self.num_denoisings}"
            )
        if self.lambda_cls < 0 or self.eta_anti < 0:
            raise UserError(f"lambda and eta must be >= 0, got {self.lambda_cls} and {self.eta_anti}")
        if self.recoverable_loss not in ("ce", "brier"):
            raise UserError(f"recoverable loss must be 'ce' or 'brier', got {self.recoverable_loss!r}")


@dataclass(frozen=True)
class LossTerms:
    """The total (with gradient) and its parts; `fraction_recoverable` is the share of the batch in L_rec."""

    total: torch.Tensor
    diffusion: torch.Tensor
    recoverable: torch.Tensor
    anti: torch.Tensor
    fraction_recoverable: torch.Tensor

    def detached(self) -> torch.Tensor:
        """The five values as one detached vector, so workers can sum and all-reduce them in one call."""
        return torch.stack([self.total, self.diffusion, self.recoverable, self.anti,
                            self.fraction_recoverable]).detach().float()


METRIC_NAMES = ("loss", "loss_diffusion", "loss_recoverable", "loss_anti", "fraction_recoverable")
"""Names of the entries of `LossTerms.detached()`, in order."""


def diffusion_loss(
    denoiser: OneShotDenoiser, clean: torch.Tensor, max_timestep: int, generator: torch.Generator
) -> torch.Tensor:
    """L_diff: the DDPM objective at t ~ U{0..max_timestep} on clean images in [0, 1].

    It keeps D a diffusion model while the classification terms reshape it. The target follows the
    model's parameterization (ε, x₀ or v), so the loss is "the usual" one for whichever it is. The
    clean images reach the UNet with the denoiser's fit, the geometry it is queried with when certifying.
    """
    denoiser.check_size(tuple(clean.shape[-2:]))
    x0 = denoiser.to_model(2.0 * clean - 1.0)
    timesteps = torch.randint(0, max_timestep + 1, (len(x0),), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha_bar = denoiser.alphas_cumprod[timesteps].to(x0.dtype).view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
    output = denoiser.network(x_t, timesteps)
    if denoiser.prediction_type == "epsilon":
        target = noise
    elif denoiser.prediction_type == "v_prediction":
        target = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x0
    else:
        target = x0
    return F.mse_loss(output.float(), target.float())


def denoised_logits(
    denoiser: OneShotDenoiser,
    classifier: torch.nn.Module,
    images: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    num_denoisings: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """f(D(x + δ_m)) for M independent δ_m ~ N(0, σ_i² I) per image i, as float32 logits (M, B, C).

    All M·B denoisings go through the UNet in one call (under DDP, one forward per loss term keeps
    the gradient all-reduce simple); `timesteps` holds t*(σ_i) per image.
    """
    batch = len(images)
    repeated = images.repeat(num_denoisings, 1, 1, 1)
    noise = torch.randn(repeated.shape, generator=generator, device=images.device, dtype=images.dtype)
    noisy = repeated + sigmas.repeat(num_denoisings).view(-1, 1, 1, 1).to(images.dtype) * noise
    logits = classifier(denoiser(noisy, timesteps.repeat(num_denoisings)))
    return logits.float().view(num_denoisings, batch, -1)


def recoverable_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True where the majority vote of the M predictions is the label (B,).

    A tie that includes the label counts as recoverable: the input is one vote from a correct
    smoothed prediction, and pushing its denoisings apart (L_anti) would work against that.
    """
    num_classes = logits.shape[-1]
    votes = F.one_hot(logits.argmax(dim=-1), num_classes).sum(dim=0)
    return votes.gather(1, labels.view(-1, 1)).squeeze(1) >= votes.max(dim=1).values


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` holds; 0 (still in the graph) when the mask is empty."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def recoverable_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, kind: RecoverableKind = "ce"
) -> torch.Tensor:
    """L_recoverable: CE (or Brier score) of each p_m to y, averaged over m and the recoverable inputs.

    CE sharpens every denoising towards y; Brier is bounded, so a few hopeless inputs that are
    recoverable only by a tie cannot dominate the batch.
    """
    num_denoisings, batch, num_classes = logits.shape
    if kind == "ce":
        per_sample = F.cross_entropy(logits.reshape(-1, num_classes), labels.repeat(num_denoisings), reduction="none")
    elif kind == "brier":
        target = F.one_hot(labels, num_classes).to(logits.dtype).repeat(num_denoisings, 1)
        per_sample = (logits.reshape(-1, num_classes).softmax(dim=-1) - target).pow(2).sum(dim=-1)
    else:
        raise UserError(f"recoverable loss must be 'ce' or 'brier', got {kind!r}")
    return _masked_mean(per_sample.view(num_denoisings, batch).mean(dim=0), mask)


def anti_consistency_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_anti: ⟨p_m, p_m'⟩ averaged over pairs m < m' and over the non-recoverable inputs.

    ⟨p_1, p_2⟩ is the probability that two independent denoisings agree; minimizing it on inputs the
    smoothed classifier gets wrong spreads their votes, so the cascade abstains (or falls through to a
    lower scale) instead of certifying a wrong class.
    """
    probabilities = logits.softmax(dim=-1)
    agreement = torch.stack([
        (probabilities[first] * probabilities[second]).sum(dim=-1)
        for first, second in combinations(range(len(probabilities)), 2)
    ]).mean(dim=0)
    return _masked_mean(agreement, ~mask)


def cascade_finetune_loss(
    denoiser: OneShotDenoiser,
    classifier: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: LossSettings,
    generator: torch.Generator,
) -> LossTerms:
    """The full objective on one batch: each image gets its own scale σ drawn uniformly from the set.

    L_diff draws t up to t*(largest σ): the one-shot denoiser is only ever queried at those steps.
    """
    steps = [denoiser.timestep_for_sigma(float(sigma)) for sigma in settings.sigmas]
    scale = torch.randint(0, len(steps), (len(images),), generator=generator, device=images.device)
    sigmas = torch.tensor(settings.sigmas, device=images.device)[scale]
    timesteps = torch.tensor(steps, device=images.device)[scale]

    diffusion = diffusion_loss(denoiser, images, max(steps), generator)
    logits = denoised_logits(denoiser, classifier, images, sigmas, timesteps, settings.num_denoisings, generator)
    mask = recoverable_mask(logits.detach(), labels)
    recoverable = recoverable_loss(logits, labels, mask, settings.recoverable_loss)
    anti = anti_consistency_loss(logits, mask)
    total = diffusion + settings.lambda_cls * (recoverable + settings.eta_anti * anti)
    return LossTerms(total, diffusion, recoverable, anti, mask.float().mean())
