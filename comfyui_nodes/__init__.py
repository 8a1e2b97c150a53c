"""ComfyUI adapters over `backend`. Thin, stateless, V3 schema.

Importing this package outside ComfyUI (no `comfy_api`) gives empty mappings, so the pack imports
cleanly standalone as well.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
