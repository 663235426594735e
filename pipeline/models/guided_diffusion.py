"""Convert OpenAI guided-diffusion / improved-diffusion UNet checkpoints into diffusers models.

Why: diffusion denoised smoothing (Carlini et al. 2023) uses OpenAI's pretrained ε-prediction UNets,
which ship as bare ``.pt`` state dicts of the original code's ``UNetModel``. The pipeline loads a
denoiser only as a diffusers directory (``UNet2DModel`` + ``DDPMScheduler``, see
``pipeline.models.denoiser.load_denoiser``), so this module rewrites such a checkpoint, tensor by
tensor, into an equivalent ``UNet2DModel`` and the ``DDPMScheduler`` of the schedule it was trained with.

Where the checkpoints come from (download them yourself; nothing here downloads anything):
- ``256x256_diffusion_uncond.pt``: the model list in the README of the openai/guided-diffusion GitHub
  repository (unconditional ImageNet 256×256) → ``--preset imagenet256-uncond``.
- ``cifar10_uncond_50M_500K.pt``: "Unconditional CIFAR-10 with our L_hybrid objective and cosine noise
  schedule" in the README of the openai/improved-diffusion GitHub repository → ``--preset cifar10-improved``.
  Other checkpoints: pass the MODEL_FLAGS / DIFFUSION_FLAGS their README gives.

Correspondence (original → diffusers), which is exact in fp32:
- ``time_embed.{0,2}`` → ``time_embedding.linear_{1,2}``; the original sinusoid is [cos, sin] with
  max period 10000 and frequencies exp(-ln(10000)·i/half) → ``flip_sin_to_cos=True, freq_shift=0``.
- ``input_blocks.0.0`` → ``conv_in``; ``out.{0,2}`` → ``conv_norm_out`` / ``conv_out``.
- level l of ``input_blocks``: ``num_res_blocks`` × (ResBlock [+ AttentionBlock]) → ``down_blocks.l.resnets``
  / ``.attentions``, then the down-sampler (a ResBlock(down) when resblock_updown, else a stride-2 conv
  ``op``) → ``down_blocks.l.downsamplers.0``. Levels with attention are ``AttnDownBlock2D``; levels without
  are ``ResnetDownsampleBlock2D`` (resblock_updown) or ``DownBlock2D`` (conv).
- ``output_blocks`` per level: ``num_res_blocks + 1`` ResBlocks (= diffusers' ``layers_per_block + 1``)
  → ``up_blocks``, likewise ``AttnUpBlock2D`` / ``ResnetUpsampleBlock2D`` / ``UpBlock2D``.
- ``middle_block`` = ResBlock, AttentionBlock, ResBlock → ``mid_block.resnets.0``, ``.attentions.0``,
  ``.resnets.1`` (with ``attn_norm_num_groups=32``: diffusers drops that norm for scale-shift models).
- ResBlock: ``in_layers.{0,2}`` → ``norm1``/``conv1``, ``emb_layers.1`` → ``time_emb_proj``,
  ``out_layers.{0,3}`` → ``norm2``/``conv2``, ``skip_connection`` → ``conv_shortcut``;
  use_scale_shift_norm ↔ ``resnet_time_scale_shift="scale_shift"``.
- AttentionBlock: ``norm`` → ``group_norm``; the 1×1-conv ``qkv`` (3C×C) is split into ``to_q/to_k/to_v``:
  the legacy order (guided-diffusion's default, and improved-diffusion) lays rows out per head as
  [q_h, k_h, v_h], the new order (use_new_attention_order) as [q_all, k_all, v_all]; ``proj_out`` →
  ``to_out.0``. diffusers has one ``attention_head_dim`` for the whole UNet, so every attention layer
  must have the same head width (always true with num_head_channels; checked with num_heads).

Not supported (a UserError says so): class-conditional checkpoints (``label_emb``; the one-shot
denoiser is unconditional), channel_mult not starting at 1 (the 512×512 model), num_heads_upsample,
and super-resolution models.

Schedule: the full ``diffusion_steps`` schedule as a ``DDPMScheduler``. improved-diffusion's models
(``rescale_timesteps``, e.g. CIFAR-10: cosine, 4,000 steps) were trained on the network input t·1000/T;
diffusers has no field for that, so the converter records the factor in ``timestep_scale.json`` and
``load_denoiser`` calls the network with t·factor (see ``network_timestep_scale``).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from pipeline.data.filesystems import open_location
from pipeline.errors import UserError
from pipeline.models.denoiser import TIMESTEP_SCALE_FILE, write_timestep_scale
from pipeline.models.spec import local_copy, output_folder

GROUP_NORM_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels), eps 1e-5
GROUP_NORM_EPS = 1e-5
TIMESTEPS_SEEN_BY_RESCALED_MODELS = 1000  # rescale_timesteps feeds the network t · 1000 / T

# guided-diffusion's create_model() defaults by image size (32 from improved-diffusion); the
# 512 default starts at 0.5 and is not representable by UNet2DModel, so it is left out.
DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


@dataclass(frozen=True)
class GuidedDiffusionConfig:
    """The flags of guided-diffusion's ``create_model_and_diffusion`` that decide what the weights mean.

    ``None`` means "read it from the checkpoint"; a value that is set is checked against the checkpoint.
    ``image_size``, the head split and the schedule are not stored in the weights and must be right.
    ``channel_mult=None`` means guided-diffusion's default for ``image_size`` when it has one.
    """

    image_size: int | None = None
    num_channels: int | None = None
    num_res_blocks: int | None = None
    channel_mult: tuple[int, ...] | None = None
    attention_resolutions: tuple[int, ...] | None = None
    num_heads: int = 4
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    learn_sigma: bool | None = None
    use_scale_shift_norm: bool | None = None
    resblock_updown: bool | None = None
    dropout: float = 0.0
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    rescale_timesteps: bool = False


UNET_ARCHITECTURES: dict[str, GuidedDiffusionConfig] = {
    # openai/guided-diffusion README, 256x256_diffusion_uncond.pt (used by Carlini et al. for ImageNet).
    "imagenet256-uncond": GuidedDiffusionConfig(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        learn_sigma=True,
        use_scale_shift_norm=True,
        resblock_updown=True,
        diffusion_steps=1000,
        noise_schedule="linear",
        rescale_timesteps=False,
    ),
    # openai/improved-diffusion README, cifar10_uncond_50M_500K.pt (used by Carlini et al. for CIFAR-10);
    # improved-diffusion's defaults: num_heads 4, attention at 16,8, rescale_timesteps True.
    "cifar10-improved": GuidedDiffusionConfig(
        image_size=32,
        num_channels=128,
        num_res_blocks=3,
        channel_mult=(1, 2, 2, 2),
        attention_resolutions=(16, 8),
        num_heads=4,
        learn_sigma=True,
        use_scale_shift_norm=True,
        resblock_updown=False,
        dropout=0.3,
        diffusion_steps=4000,
        noise_schedule="cosine",
        rescale_timesteps=True,
    ),
}


@dataclass(frozen=True)
class CheckpointLayout:
    """What a checkpoint's tensor names and shapes say about its architecture."""

    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_levels: frozenset[int]  # 0 = full resolution; attention follows every ResBlock there
    use_scale_shift_norm: bool
    resblock_updown: bool | None  # None: a one-level UNet has no resampling to tell from


@dataclass(frozen=True)
class GuidedUNetArchitecture:
    """The fully resolved architecture: the layout plus what the weights cannot tell."""

    image_size: int
    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_levels: frozenset[int]
    attention_head_dim: int
    legacy_attention_order: bool
    use_scale_shift_norm: bool
    resblock_updown: bool
    dropout: float

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def level_channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]


def load_guided_state_dict(location: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pt`` state dict safely (``weights_only=True``) from a local path or an fsspec URL (copied
    to a scratch folder first, as the model loaders do); any missing or unreadable file is a UserError."""
    location = str(location)
    with tempfile.TemporaryDirectory(prefix="mdds-checkpoint-") as scratch:
        path = Path(local_copy(location, scratch))
        if not path.is_file():
            raise UserError(f"checkpoint not found: {location}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            raise UserError(
                f"cannot read {location} as a PyTorch state dict ({type(error).__name__}: {first_line})"
            ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise UserError(f"{location} is not a state dict of tensors (expected a guided-diffusion UNet checkpoint)")
    return dict(state)


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state or state[key].ndim != ndim:
        raise UserError(f"checkpoint has no {ndim}-d tensor {key}: not a guided-diffusion UNet")
    return tuple(state[key].shape)


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(key.split(".")[1]) for key in state if key.startswith(prefix) and key.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def _upsampler_prefix(state: Mapping[str, torch.Tensor], block: int) -> str | None:
    """The prefix of output block ``block``'s up-sampler: a sub-module after the ResBlock that is not attention."""
    for sub in (1, 2):
        prefix = f"output_blocks.{block}.{sub}."
        if any(key.startswith(prefix) for key in state) and f"{prefix}qkv.weight" not in state:
            return prefix
    return None


def read_layout(state: Mapping[str, torch.Tensor]) -> CheckpointLayout:
    """Infer the architecture from tensor names and shapes (the final conversion checks every tensor)."""
    if "label_emb.weight" in state:
        raise UserError(
            "class-conditional checkpoint (label_emb): only unconditional models can serve as one-shot denoisers"
        )
    model_channels = _shape(state, "time_embed.0.weight", ndim=2)[1]
    conv_in_channels, in_channels = _shape(state, "input_blocks.0.0.weight", ndim=4)[:2]
    if conv_in_channels != model_channels:
        raise UserError(
            f"channel_mult starts at {conv_in_channels / model_channels:g}, not 1: "
            "diffusers UNet2DModel cannot represent it (e.g. the 512x512 model)"
        )
    out_channels = _shape(state, "out.2.weight", ndim=4)[0]
    n_input_blocks = _block_count(state, "input_blocks.")
    n_output_blocks = _block_count(state, "output_blocks.")
    upsample_blocks = [block for block in range(n_output_blocks) if _upsampler_prefix(state, block)]
    num_res_blocks = upsample_blocks[0] if upsample_blocks else n_output_blocks - 1
    if num_res_blocks < 1 or n_output_blocks % (num_res_blocks + 1) or n_input_blocks != n_output_blocks:
        raise UserError(
            f"unrecognised block structure ({n_input_blocks} input blocks, {n_output_blocks} output blocks): "
            "not a guided-diffusion UNet"
        )
    num_levels = n_output_blocks // (num_res_blocks + 1)

    channel_mult = []
    attention_levels = set()
    for level in range(num_levels):
        first = f"input_blocks.{1 + level * (num_res_blocks + 1)}"
        channels = _shape(state, f"{first}.0.out_layers.3.weight", ndim=4)[0]
        if channels % model_channels:
            raise UserError(f"{first} has {channels} channels, not a multiple of num_channels {model_channels}")
        channel_mult.append(channels // model_channels)
        if f"{first}.1.qkv.weight" in state:
            attention_levels.add(level)

    emb_width = _shape(state, "input_blocks.1.0.emb_layers.1.weight", ndim=2)[0]
    resblock_updown = None
    if upsample_blocks:
        upsampler = _upsampler_prefix(state, upsample_blocks[0])
        resblock_updown = f"{upsampler}in_layers.0.weight" in state
    return CheckpointLayout(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(channel_mult),
        attention_levels=frozenset(attention_levels),
        use_scale_shift_norm=emb_width == 2 * model_channels,  # FiLM: a scale and a shift per channel
        resblock_updown=resblock_updown,
    )


def _check_flag(flag: str, given: object, found: object, hint: str = "") -> None:
    if given is not None and given != found:
        raise UserError(f"{flag} is {_show(given)} but the checkpoint has {_show(found)}{hint}")


def _show(value: object) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return str(value)


def _attention_head_dim(config: GuidedDiffusionConfig, channels: set[int]) -> int:
    """The one head width diffusers needs, from num_head_channels or num_heads (guided-diffusion's rule)."""
    if config.num_head_channels != -1:
        if config.num_head_channels <= 0 or any(width % config.num_head_channels for width in channels):
            raise UserError(
                f"--num-head-channels {config.num_head_channels} does not divide "
                f"the attention widths {sorted(channels)}"
            )
        return config.num_head_channels
    if config.num_heads <= 0 or any(width % config.num_heads for width in channels):
        raise UserError(f"--num-heads {config.num_heads} does not divide the attention widths {sorted(channels)}")
    head_dims = {width // config.num_heads for width in channels}
    if len(head_dims) != 1:
        raise UserError(
            f"--num-heads {config.num_heads} gives head widths {sorted(head_dims)} at different levels; "
            "diffusers UNet2DModel supports a single attention_head_dim"
        )
    return head_dims.pop()


def resolve_architecture(config: GuidedDiffusionConfig, layout: CheckpointLayout) -> GuidedUNetArchitecture:
    """Combine the flags with the checkpoint's layout; any disagreement is a UserError naming the flag."""
    if config.image_size is None:
        raise UserError("--image-size is required (it is not stored in the weights); or use --preset")
    num_levels = len(layout.channel_mult)
    if config.image_size <= 0 or config.image_size % 2 ** (num_levels - 1):
        raise UserError(
            f"--image-size {config.image_size} is not divisible by 2^{num_levels - 1} ({num_levels} levels)"
        )
    _check_flag("--num-channels", config.num_channels, layout.model_channels)
    _check_flag("--num-res-blocks", config.num_res_blocks, layout.num_res_blocks)
    expected_mult = config.channel_mult or DEFAULT_CHANNEL_MULT.get(config.image_size)
    hint = "" if config.channel_mult else (
        f" (guided-diffusion's default for --image-size {config.image_size}; pass --channel-mult)"
    )
    _check_flag("--channel-mult", expected_mult, layout.channel_mult, hint)
    if layout.out_channels not in (layout.in_channels, 2 * layout.in_channels):
        raise UserError(
            f"checkpoint maps {layout.in_channels} input channels to {layout.out_channels} outputs: "
            "expected the same number (ε) or twice as many (ε and learned variance)"
        )
    _check_flag("--learn-sigma", config.learn_sigma, layout.out_channels == 2 * layout.in_channels)
    _check_flag("--use-scale-shift-norm", config.use_scale_shift_norm, layout.use_scale_shift_norm)
    _check_flag("--resblock-updown", config.resblock_updown, layout.resblock_updown)
    if config.attention_resolutions is not None:
        resolutions = {config.image_size // 2**level: level for level in range(num_levels)}
        flagged_levels = frozenset(resolutions[res] for res in config.attention_resolutions if res in resolutions)
        found = ",".join(str(config.image_size // 2**level) for level in sorted(layout.attention_levels))
        if flagged_levels != layout.attention_levels:
            raise UserError(
                f"--attention-resolutions {_show(config.attention_resolutions)} (with --image-size "
                f"{config.image_size}) but the checkpoint has attention at resolutions {found or 'none'}"
            )
    attention_widths = {layout.model_channels * layout.channel_mult[level] for level in layout.attention_levels}
    attention_widths.add(layout.model_channels * layout.channel_mult[-1])  # the middle block
    bad_widths = sorted(width for width in attention_widths | {layout.model_channels} if width % GROUP_NORM_GROUPS)
    if bad_widths:
        raise UserError(f"channel widths {bad_widths} are not multiples of {GROUP_NORM_GROUPS} (GroupNorm32)")
    return GuidedUNetArchitecture(
        image_size=config.image_size,
        in_channels=layout.in_channels,
        out_channels=layout.out_channels,
        model_channels=layout.model_channels,
        num_res_blocks=layout.num_res_blocks,
        channel_mult=layout.channel_mult,
        attention_levels=layout.attention_levels,
        attention_head_dim=_attention_head_dim(config, attention_widths),
        legacy_attention_order=not config.use_new_attention_order,
        use_scale_shift_norm=layout.use_scale_shift_norm,
        resblock_updown=bool(layout.resblock_updown if layout.resblock_updown is not None else config.resblock_updown),
        dropout=config.dropout,
    )


def diffusers_unet_config(arch: GuidedUNetArchitecture) -> dict:
    """``UNet2DModel`` keyword arguments that reproduce the original network."""
    down_types, up_types = [], []
    for level in range(arch.num_levels):
        if level in arch.attention_levels:
            down_types.append("AttnDownBlock2D")
        else:
            down_types.append("ResnetDownsampleBlock2D" if arch.resblock_updown else "DownBlock2D")
    for level in reversed(range(arch.num_levels)):
        if level in arch.attention_levels:
            up_types.append("AttnUpBlock2D")
        else:
            up_types.append("ResnetUpsampleBlock2D" if arch.resblock_updown else "UpBlock2D")
    resample_type = "resnet" if arch.resblock_updown else "conv"
    return dict(
        sample_size=arch.image_size,
        in_channels=arch.in_channels,
        out_channels=arch.out_channels,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        block_out_channels=tuple(arch.level_channels(level) for level in range(arch.num_levels)),
        layers_per_block=arch.num_res_blocks,
        downsample_padding=1,
        downsample_type=resample_type,
        upsample_type=resample_type,
        dropout=arch.dropout,
        act_fn="silu",
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=GROUP_NORM_GROUPS,
        attn_norm_num_groups=GROUP_NORM_GROUPS,
        norm_eps=GROUP_NORM_EPS,
        resnet_time_scale_shift="scale_shift" if arch.use_scale_shift_norm else "default",
        add_attention=True,
    )


class _WeightMover:
    """Builds the diffusers state dict from the original one, checking each shape and what is left over."""

    def __init__(self, source: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, ...]]):
        self.source = source
        self.target_shapes = target_shapes
        self.used: set[str] = set()
        self.converted: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.source:
            raise UserError(f"checkpoint has no tensor {key}: the architecture flags do not match it")
        tensor = self.source[key]
        if tuple(tensor.shape) != shape:
            raise UserError(
                f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the architecture needs {shape}: "
                "the flags do not match the checkpoint"
            )
        self.used.add(key)
        return tensor.detach().to(torch.float32)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.converted[key] = tensor.clone().contiguous()  # splits must not share storage (safetensors)

    def copy(self, source_key: str, target_key: str) -> None:
        self.put(target_key, self.take(source_key, self.target_shapes[target_key]))

    def copy_pair(self, source: str, target: str) -> None:
        for name in ("weight", "bias"):
            self.copy(f"{source}.{name}", f"{target}.{name}")

    def resblock(self, source: str, target: str) -> None:
        for src, dst in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                         ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
            self.copy_pair(f"{source}.{src}", f"{target}.{dst}")
        if f"{target}.conv_shortcut.weight" in self.target_shapes:
            self.copy_pair(f"{source}.skip_connection", f"{target}.conv_shortcut")

    def attention(self, source: str, target: str, head_dim: int, legacy_order: bool) -> None:
        self.copy_pair(f"{source}.norm", f"{target}.group_norm")
        channels = self.target_shapes[f"{target}.to_q.weight"][0]
        heads = channels // head_dim
        qkv_weight = self.take(f"{source}.qkv.weight", (3 * channels, channels, 1))[:, :, 0]
        qkv_bias = self.take(f"{source}.qkv.bias", (3 * channels,))
        # Rows of qkv as (part, head, dim) with part ∈ {q, k, v}; diffusers wants head-major rows per part.
        if legacy_order:
            weight = qkv_weight.reshape(heads, 3, head_dim, channels).transpose(0, 1)
            bias = qkv_bias.reshape(heads, 3, head_dim).transpose(0, 1)
        else:
            weight = qkv_weight.reshape(3, heads, head_dim, channels)
            bias = qkv_bias.reshape(3, heads, head_dim)
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            self.put(f"{target}.{name}.weight", weight[part].reshape(channels, channels))
            self.put(f"{target}.{name}.bias", bias[part].reshape(channels))
        self.put(f"{target}.to_out.0.weight", self.take(f"{source}.proj_out.weight", (channels, channels, 1))[:, :, 0])
        self.copy(f"{source}.proj_out.bias", f"{target}.to_out.0.bias")

    def resampler(self, source: str, target: str, resblock: bool) -> None:
        if resblock:
            self.resblock(source, target)
        else:
            self.copy_pair(source, f"{target}.conv")

    def leftover(self) -> list[str]:
        return sorted(set(self.source) - self.used)


def convert_weights(
    state: Mapping[str, torch.Tensor],
    arch: GuidedUNetArchitecture,
    target_shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """Rename/reshape every original tensor into the diffusers ``UNet2DModel`` layout (fp32)."""
    mover = _WeightMover(state, target_shapes)
    blocks = arch.num_res_blocks + 1  # res blocks plus the resampler (input) / res blocks (output) per level
    mover.copy_pair("input_blocks.0.0", "conv_in")
    mover.copy_pair("time_embed.0", "time_embedding.linear_1")
    mover.copy_pair("time_embed.2", "time_embedding.linear_2")
    for level in range(arch.num_levels):
        has_attention = level in arch.attention_levels
        for j in range(arch.num_res_blocks):
            source = f"input_blocks.{1 + level * blocks + j}"
            mover.resblock(f"{source}.0", f"down_blocks.{level}.resnets.{j}")
            if has_attention:
                mover.attention(f"{source}.1", f"down_blocks.{level}.attentions.{j}",
                                arch.attention_head_dim, arch.legacy_attention_order)
        if level < arch.num_levels - 1:
            downsampler = f"input_blocks.{1 + level * blocks + arch.num_res_blocks}.0"
            mover.resampler(downsampler if arch.resblock_updown else f"{downsampler}.op",
                            f"down_blocks.{level}.downsamplers.0", arch.resblock_updown)
    mover.resblock("middle_block.0", "mid_block.resnets.0")
    mover.attention("middle_block.1", "mid_block.attentions.0", arch.attention_head_dim, arch.legacy_attention_order)
    mover.resblock("middle_block.2", "mid_block.resnets.1")
    for up_level in range(arch.num_levels):
        has_attention = (arch.num_levels - 1 - up_level) in arch.attention_levels
        for j in range(blocks):
            source = f"output_blocks.{up_level * blocks + j}"
            mover.resblock(f"{source}.0", f"up_blocks.{up_level}.resnets.{j}")
            if has_attention:
                mover.attention(f"{source}.1", f"up_blocks.{up_level}.attentions.{j}",
                                arch.attention_head_dim, arch.legacy_attention_order)
        if up_level < arch.num_levels - 1:
            upsampler = f"output_blocks.{up_level * blocks + arch.num_res_blocks}.{2 if has_attention else 1}"
            mover.resampler(upsampler if arch.resblock_updown else f"{upsampler}.conv",
                            f"up_blocks.{up_level}.upsamplers.0", arch.resblock_updown)
    mover.copy_pair("out.0", "conv_norm_out")
    mover.copy_pair("out.2", "conv_out")
    leftover = mover.leftover()
    if leftover:
        raise UserError(
            f"checkpoint has {len(leftover)} tensors the architecture does not use (e.g. {leftover[0]}): "
            "the flags do not match the checkpoint"
        )
    return mover.converted


def make_scheduler(config: GuidedDiffusionConfig, learn_sigma: bool) -> DDPMScheduler:
    """The DDPM schedule the checkpoint was trained with, all ``diffusion_steps`` of it.

    t* is then chosen on the full schedule, as the published code does (Carlini et al. and Jeong &
    Shin search all 4,000 steps of the CIFAR-10 model); `network_timestep_scale` says what the network
    is called with.
    """
    steps = config.diffusion_steps
    if steps <= 0:
        raise UserError(f"--diffusion-steps must be positive, not {steps}")
    common = dict(
        num_train_timesteps=steps,
        variance_type="learned_range" if learn_sigma else "fixed_large",
        prediction_type="epsilon",
        clip_sample=True,
    )
    if config.noise_schedule == "linear":  # guided-diffusion's get_named_beta_schedule: scaled by 1000/T
        scale = 1000 / steps
        return DDPMScheduler(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02, **common)
    if config.noise_schedule == "cosine":  # diffusers' squaredcos_cap_v2 is improved-diffusion's formula (tested)
        return DDPMScheduler(beta_schedule="squaredcos_cap_v2", **common)
    raise UserError(f"--noise-schedule must be linear or cosine, not {config.noise_schedule!r}")


def network_timestep_scale(config: GuidedDiffusionConfig) -> float:
    """What the network's timestep input is per schedule step: improved-diffusion's ``rescale_timesteps``
    (its default) trained the network on t·1000/T, guided-diffusion's ImageNet models on t itself."""
    if config.rescale_timesteps:
        return TIMESTEPS_SEEN_BY_RESCALED_MODELS / config.diffusion_steps
    return 1.0


@dataclass(frozen=True)
class ConvertedDenoiser:
    """A converted checkpoint: the UNet, its schedule, and the timestep scale the network was trained with
    (kept together so that saving can never drop the scale)."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    timestep_scale: float


def convert_guided_diffusion(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    config: GuidedDiffusionConfig,
) -> ConvertedDenoiser:
    """Convert a guided-/improved-diffusion checkpoint (path or state dict) into a diffusers UNet and schedule.

    The UNet is returned in eval mode with fp32 weights; ``config`` fields left ``None`` are read from the
    checkpoint, the others are checked against it (UserError on any mismatch).
    """
    state = checkpoint if isinstance(checkpoint, Mapping) else load_guided_state_dict(checkpoint)
    arch = resolve_architecture(config, read_layout(state))
    scheduler = make_scheduler(config, arch.learn_sigma)
    with torch.device("meta"):  # no random init of up to ~550M parameters that are overwritten anyway
        unet = UNet2DModel(**diffusers_unet_config(arch))
    target_shapes = {key: tuple(value.shape) for key, value in unet.state_dict().items()}
    unet.load_state_dict(convert_weights(state, arch, target_shapes), strict=True, assign=True)
    return ConvertedDenoiser(unet.eval(), scheduler, network_timestep_scale(config))


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a non-empty (or non-directory) output location, a local path or an fsspec URL, unless
    ``overwrite``: checked before converting."""
    fs, path = open_location(str(out_dir))
    if fs.isfile(path):
        raise UserError(f"output path exists and is not a directory: {out_dir}")
    if fs.isdir(path) and fs.ls(path) and not overwrite:
        raise UserError(f"output directory is not empty: {out_dir} (pass --overwrite to write into it)")


def save_converted(converted: ConvertedDenoiser, out_dir: str | Path, overwrite: bool = False) -> list[str]:
    """Write it into one directory, a local path or an fsspec URL (the layout ``load_denoiser`` reads);
    returns the locations of the files written.

    A non-empty ``out_dir`` is refused unless ``overwrite``; overwriting replaces these files only
    (a stale timestep scale file from an earlier conversion is removed).
    """
    location = str(out_dir).rstrip("/")
    check_output_dir(location, overwrite)
    fs, path = open_location(location)
    stale_scale_file = f"{path}/{TIMESTEP_SCALE_FILE}"
    if fs.exists(stale_scale_file):
        fs.rm(stale_scale_file)
    with output_folder(location) as folder:
        converted.unet.save_pretrained(folder, safe_serialization=True)
        converted.scheduler.save_pretrained(folder)
        scale_file = write_timestep_scale(folder, converted.timestep_scale)
    names = (UNet2DModel.config_name, SAFETENSORS_WEIGHTS_NAME, DDPMScheduler.config_name)
    return [f"{location}/{name}" for name in names + ((TIMESTEP_SCALE_FILE,) if scale_file else ())]
