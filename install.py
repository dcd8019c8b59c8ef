"""Run by the WebUI at start (unless --skip-install): installs only what its venv lacks, through the
WebUI's own `launch.run_pip`. Never downloads model weights."""
import launch

# (import name, pip requirement) — what `bdm/` needs at run time in the WebUI.
REQUIREMENTS = [
    ("torch", "torch>=2.0"),
    ("safetensors", "safetensors>=0.3"),
    ("transformers", "transformers>=4.30"),
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("yaml", "pyyaml"),
    ("tqdm", "tqdm"),
]

for module, requirement in REQUIREMENTS:
    if not launch.is_installed(module):
        launch.run_pip(f"install \"{requirement}\"", f"BDM requirement: {requirement}")
