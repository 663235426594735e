"""Certify an ImageNet classifier with multi-scale diffusion denoised smoothing on a Ray cluster.

Data: an ImageNet-style class-folder tree (val/<wnid>/*.JPEG; labels = index of the sorted folder
names) or a Parquet of encoded image bytes, preprocessed to the certified 224x224 input (--preprocess:
resize 256 + center crop 224 as Cohen et al. and Carlini et al., or resize 224 bicubic as the published
multi-scale code). Denoiser: a diffusers directory, e.g. OpenAI's 256x256_diffusion_uncond.pt converted
with jobs/convert_guided_diffusion.py --preset imagenet256-uncond; --denoiser-fit says how 224x224
inputs reach its 256x256 UNet (pad: reflection padding, the multi-scale code; native: the UNet at 224,
Carlini et al.). Classifier: a timm model name with a local or fsspec weights file, a Hugging Face
transformers directory, or a TorchScript file. docs/imagenet-cifar.md: the flags of each paper's setup.
One GPU per model actor when the cluster has GPUs (--device cuda also when its GPU workers are still
scaled to zero). --out must be shared storage.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/certify_imagenet.py \\
        --data s3://BUCKET/imagenet/val --denoiser s3://BUCKET/models/imagenet256 \\
        --classifier beit_large_patch16_512 --classifier-weights s3://BUCKET/models/beit.safetensors \\
        --out s3://BUCKET/mdds/runs/imagenet --device cuda --num-actors 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from pipeline.app.certify import certify  # noqa: E402
from pipeline.app.args import build_parser, request_from_args  # noqa: E402
from pipeline.app.cli import run_main  # noqa: E402


def main() -> None:
    parser = build_parser("imagenet", __doc__.strip())
    print(certify(request_from_args(parser.parse_args())))


if __name__ == "__main__":
    run_main(main)
