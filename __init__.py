"""comfyui-concepts: ComfyUI entry point. Registers the nodes (V3 schema, comfy_api v0_0_2), nothing else.

ComfyUI is imported only when ComfyUI calls the entry point, so tools that import this package (pytest
collecting the repository, linters) work without ComfyUI.
"""


async def comfy_entrypoint():
    from comfy_api.v0_0_2 import ComfyExtension

    from .nodes import NODES

    class ConceptsExtension(ComfyExtension):
        async def get_node_list(self):
            return NODES

    return ConceptsExtension()
