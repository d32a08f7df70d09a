"""Small shared utilities (FLOP counting)."""
