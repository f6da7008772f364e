"""Per-concept fine-tuning: concept data, learnt tokens, the files other tools read, stacked training."""
