"""Monte-Carlo sampling, torch without Ray: counter-based noise, the one fused denoise-classify kernel,
vote sources over it, and the sampling strategies (early exit, all scales, adaptive, predict) that decide
per batch which (image, scale) cells get votes. Imports stats/ and models/."""
