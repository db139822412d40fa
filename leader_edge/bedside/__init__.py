"""What `predict` and `serve` run, torch-free: the visits reader, the encoder, the bundle and its manifest, the recommendations format, explanations."""
