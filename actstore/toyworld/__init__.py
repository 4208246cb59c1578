"""Toy world: a ray-cast scene renderer with exact depth / salient-object / shading labels,
a label model trained on it, and a tiny SD v1.x-topology latent diffusion model trained on
its renders (shipped in models/toy-ldm) so the whole probing pipeline runs on a CPU.

Modules: ``render`` (scenes), ``vocab`` + ``tokenizer`` (closed word-level vocabulary),
``model`` + ``train`` + ``ckpt`` (toy LDM), ``labeler`` + ``labeler_train`` (label model),
``samples`` (sample grids and quality measures).
"""
