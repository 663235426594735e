"""Fine-tuning the diffusion denoiser for the multi-scale cascade (docs/finetuning.md); imports torch, Ray Train, peft.

loss.py holds the objective (pure torch), weights.py the trainable UNet (full or LoRA), its checkpoint
state and the export to a diffusers directory, train_loop.py the Ray Train worker function, trainer.py the
launch (worker resources, checkpoint storage). The driver's flags and presets live in app/finetune.py.
"""
