"""pytest wiring for the tests that run our pack inside a real ComfyUI server.

Environment:
  COMFYUI_PATH             ComfyUI work tree (with main.py). Unset -> every test in tests/comfyui is skipped.
  COMFYUI_PYTHON           Python to run ComfyUI with (default <COMFYUI_PATH>/../venv/bin/python,
                           then <COMFYUI_PATH>/venv/bin/python, then the Python running pytest).
  COMFYUI_CONCEPTS_CACHE   where the random test checkpoints are built/cached (default ~/.cache/comfyui-concepts).
  COMFYUI_OMP_NUM_THREADS  OMP_NUM_THREADS for the server (default 1).
  COMFYUI_EXTRA_ARGS       extra main.py arguments for every server started.

Every test collected here gets the ``comfyui`` marker, so ``-m "not comfyui"`` deselects them.
"""
from pathlib import Path

import pytest

from . import harness
from .harness import SD15_CKPT, SDXL_CKPT, ComfyServer  # noqa: F401  (re-exported for tests)

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs a real ComfyUI (COMFYUI_PATH)")
    config.addinivalue_line("markers", "dit: SD3.5 / Flux in a real ComfyUI; builds 7.4 GiB of random model files "
                                       "once and needs ~10 GB of memory for Flux with T5 (deselect: -m 'not dit')")


def pytest_report_header(config):
    p = harness.comfyui_path()
    if p is None:
        return "comfyui: COMFYUI_PATH not set (tests/comfyui will be skipped)"
    return f"comfyui: {p} python={harness.comfyui_python()} cache={harness.cache_dir()}"


def _is_here(item):
    try:
        Path(str(item.path)).resolve().relative_to(HERE)
        return True
    except ValueError:
        return False


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(config, items):
    reason = harness.comfyui_skip_reason()
    for item in items:
        if not _is_here(item):
            continue
        item.add_marker(pytest.mark.comfyui)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfy_checkpoints():
    """{name: Path} of the test checkpoints in the cache dir, built on first use.

    Besides the two tiny checkpoints, every other *.safetensors in the cache dir is included too
    (e.g. a full-size SD1.5 for benchmarks), so servers can load them by file name.
    """
    try:
        paths = harness.ensure_checkpoints()
    except Exception as e:  # noqa: BLE001 - report any build failure as a test error with its output
        pytest.fail(str(e), pytrace=False)
    for extra in sorted(harness.cache_dir().glob("*.safetensors")):
        paths.setdefault(extra.name, extra)
    return paths


@pytest.fixture(scope="session")
def dit_checkpoints():
    """{name: Path} of the diffusion-transformer test files (SD3.5 checkpoint, Flux diffusion model, CLIP-L, T5-XXL,
    16-channel VAE), built on first use: ~100 s and 7.2 GB peak memory on 2 cores, then cached."""
    try:
        return harness.ensure_checkpoints(harness.DIT_FILES, timeout=3600)
    except Exception as e:  # noqa: BLE001 - report any build failure as a test error with its output
        pytest.fail(str(e), pytrace=False)


def _start(tmp_path_factory, checkpoints, name, **kwargs):
    base = tmp_path_factory.mktemp(name)
    try:
        return harness.start_server(checkpoints=checkpoints.values(), base_dir=base, **kwargs)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module", params=("sd35", "flux"))
def dit_server(request, tmp_path_factory, dit_checkpoints):
    """(family, server) per test module: a server holding the tiny DiT files and the concept images, one family at a
    time (Flux with T5 needs ~13 GB). ``--cache-lru`` keeps a prompt's encoding from one graph to the next: a Flux
    prompt encode costs ~50 s."""
    import shutil

    family = request.param
    server = _start(tmp_path_factory, dit_checkpoints, f"comfy-{family}", extra_args=("--cache-lru", "32"))
    for png in (HERE.parent.parent / "workflows" / "images").glob("*.png"):
        shutil.copy(png, server.base_dir / "input" / png.name)
    yield family, server
    server.stop()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfy_checkpoints):
    """One ComfyUI server for the whole session, with our pack in custom_nodes/ and the test checkpoints."""
    server = _start(tmp_path_factory, comfy_checkpoints, "comfy-session")
    yield server
    server.stop()


@pytest.fixture
def start_comfy_server(tmp_path_factory, comfy_checkpoints):
    """Factory: ``start_comfy_server(extra_args=(), timeout=120)`` starts a NEW independent server (new port, new base
    dir). All servers it started are stopped at the end of the test."""
    started = []

    def start(**kwargs):
        server = _start(tmp_path_factory, comfy_checkpoints, "comfy-fresh", **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fresh_comfy_server(start_comfy_server):
    """A freshly started server of its own, for "after running X" vs "fresh server" comparisons."""
    return start_comfy_server()
