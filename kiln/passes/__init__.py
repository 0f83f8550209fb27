"""Graph passes: the pass manager, the pattern-rewrite engine and the rewrite rules (not yet built)."""
