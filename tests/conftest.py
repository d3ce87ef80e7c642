"""Fixtures for the core tests: tiny random diffusers models built in code (no downloads)."""
import pytest
import torch

from core.toy_models import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def text_encoder(tokenizer):
    return tiny_text_encoder(len(tokenizer))


@pytest.fixture(scope="session", params=["sd1", "sdxl"])
def unet(request):
    return tiny_unet(request.param)


@pytest.fixture(scope="session")
def sd1_unet():
    return tiny_unet("sd1")


@pytest.fixture(scope="session")
def vae():
    return tiny_vae()


@pytest.fixture
def concept_images():
    """Four 32x32 renders of a 'concept': a textured red square at varying places on grey."""
    gen = torch.Generator().manual_seed(0)
    imgs = torch.full((4, 32, 32, 3), 0.5)
    for i in range(4):
        y, x = (int(v) for v in torch.randint(2, 14, (2,), generator=gen))
        stripes = (torch.arange(16)[:, None] % 4 < 2).float().expand(16, 16)
        imgs[i, y:y + 16, x:x + 16] = torch.stack([0.9 * torch.ones(16, 16), 0.2 * stripes, 0.1 * stripes], -1)
    return imgs
