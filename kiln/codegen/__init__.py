"""Code generation through Apache TVM (not yet built)."""
