"""Standalone core of comfyui-concepts: pure torch, numpy and safetensors; never imports ComfyUI."""
