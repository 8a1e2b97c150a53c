"""SPO Studio's training library: SPO, Diffusion-DPO and Diffusion-RPO for SD1.5 and SDXL.

Imports neither gradio nor ComfyUI; the node pack and the page are thin adapters over it.
"""

__version__ = "0.1.0"
