"""Smoke tests of the real-ComfyUI harness with stock nodes only (no pack nodes needed)."""
import struct

import pytest

from .harness import SD15_CKPT, output_refs
from .prompts import stock_t2i_prompt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data):
    assert data[:8] == PNG_MAGIC, f"not a PNG: {data[:16]!r}"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_stock_t2i_runs(comfy_server):
    torch = pytest.importorskip("torch")
    outputs = comfy_server.run(stock_t2i_prompt(SD15_CKPT, seed=1, prefix="smoke"))

    images = output_refs(outputs, "images")
    assert len(images) == 1, outputs
    assert png_size(comfy_server.image_bytes(images[0])) == (64, 64)

    latents = output_refs(outputs, "latents")
    assert len(latents) == 1, outputs
    assert latents[0]["subfolder"] == "latents"
    lat = comfy_server.read_latent(latents[0])
    assert list(lat.shape) == [1, 4, 8, 8]
    assert torch.isfinite(lat).all()
    assert lat.abs().sum() > 0


def test_same_seed_same_bytes_on_fresh_server(comfy_server, fresh_comfy_server):
    """The pattern for "nothing leaks": the same prompt on the session server and on a freshly started one."""
    torch = pytest.importorskip("torch")
    prompt = stock_t2i_prompt(SD15_CKPT, seed=12345, prefix="determinism")
    results = []
    for server in (comfy_server, fresh_comfy_server):
        outputs = server.run(prompt)
        (image,) = output_refs(outputs, "images")
        (latent,) = output_refs(outputs, "latents")
        results.append((server.image_bytes(image), server.read_latent(latent)))
    (img_a, lat_a), (img_b, lat_b) = results
    assert torch.equal(lat_a, lat_b)
    assert img_a == img_b
