"""Backends: the only code that touches a concrete model graph (diffusers modules, ComfyUI's ModelPatcher)."""
