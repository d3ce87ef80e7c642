"""The main job (README command 1): learn a concept, sample it with and without the residual, judge it, report.

Run it from the repository as ``python -m demo --out out/``, or from any folder as
``python path/to/comfyui-concepts --out out/``. It uses the standalone core (torch + diffusers, no ComfyUI), or a
running ComfyUI server with ``--server``.
"""
