"""The artifact runtime: loads and runs .kiln files with numpy, safetensors and the TVM runtime only (not yet built)."""
