"""Performance tooling: the benchmark sections, FLOP counting and MFU, torch.compile tuning, the GPU check and
the reference-style sampling loop the fused kernel is measured against. Never imported by a certify run."""
