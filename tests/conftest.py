"""Fixtures for the core tests: tiny random diffusers models built in code (no downloads)."""
import pytest

from core.toy_models import concept_renders, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae


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
    """Four 32x32 renders of a made-up concept (a striped red square on grey)."""
    return concept_renders(4, 32, seed=0)
