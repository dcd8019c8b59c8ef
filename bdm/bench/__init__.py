"""Benchmarks that print ratios measured side by side in one run (never timed unit tests).

`python -m bdm.bench [step]` — one denoising step: backbone, BDM, shared encoder, the official path.
`python -m bdm.bench train` — one training step: ours vs diffusers' ControlNet-trainer way.
`python -m bdm.bench webui` — seconds per step inside a running WebUI.
"""
