"""``python path/to/comfyui-concepts --out out/``: the main job from any folder (the folder itself is on sys.path)."""
import sys

from demo.cli import main

sys.exit(main())
