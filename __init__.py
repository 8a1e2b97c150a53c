"""SPO Studio as a ComfyUI custom-node pack.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS. Outside ComfyUI the same
folder is the `spo_studio` Python package (see pyproject.toml). Everything in the pack uses
package-relative imports, so another pack's top-level `backend` module can never shadow ours.
"""

from .comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
