"""Generation: models, prompt tables, the denoising loop, capture hooks, materialize."""
