"""Compose: several concepts in one image (regions, Cut-Mix, Custom Diffusion, FreeCustom, T2I-Zero)."""
