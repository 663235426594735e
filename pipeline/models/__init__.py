"""Model loading, no Ray: the one-shot diffusion denoiser (t*(σ), fit to the UNet's size), classifiers (timm,
TorchScript), the picklable ModelSpec each actor loads, the guided-diffusion converter, and the embedded digits
models trained on first use."""
