"""Performance tooling: the benchmark sections and their headline table, FLOP counting and MFU, torch.compile
tuning, the GPU check, the reduce at ImageNet scale and the reference-style sampling loop the fused kernel is
measured against. Below app/ (never imports it: pipeline/app/benchmark.py drives the sections); never imported
by a certify run."""
