"""A researcher's own models, importable by name (py:tests.models.user_factory:tiny_classifier), as her
package would hold them: nothing here is a kind mdds knows (timm, TorchScript, Hugging Face)."""

from __future__ import annotations

import torch

from pipeline.models.denoiser import OneShotDenoiser, denoiser_from_parts

NUM_CLASSES = 10
NOT_CALLABLE = 3  # a py: reference to something that is not a function


class TinyClassifier(torch.nn.Module):
    """[0,1] images (N, C, H, W) → logits (N, num_classes): per-channel mean, then a linear layer."""

    def __init__(self, in_chans: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.linear = torch.nn.Linear(in_chans, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.mean(dim=(2, 3)))


def tiny_classifier() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def not_a_module() -> str:
    return "a string, not a torch.nn.Module"


def tiny_unet_and_scheduler(in_channels: int = 1, sample_size: int = 16):
    """A diffusers UNet2DModel (random weights) and its DDPMScheduler, as a user builds them in memory."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    return unet, DDPMScheduler(num_train_timesteps=1000)


def tiny_models() -> tuple[OneShotDenoiser, TinyClassifier]:
    """A (denoiser, classifier) factory for ModelFactory: 1-channel 16x16 images, 10 classes."""
    return denoiser_from_parts(*tiny_unet_and_scheduler()), tiny_classifier()
