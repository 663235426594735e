"""Fine-tuning the diffusion denoiser for the multi-scale cascade (method.md §6).

loss.py holds the objective (pure torch), weights.py the trainable UNet (full or LoRA), its checkpoint
state and the export to a diffusers directory, train_loop.py the Ray Train worker function.
"""
