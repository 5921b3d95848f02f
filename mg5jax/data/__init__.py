"""Data: tokenization, image transforms and the CC3M / VIST / MMDialog sample readers."""
