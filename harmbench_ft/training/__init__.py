"""Training: batches of tokenised rows, the gradient helpers defenses compose, and the one training loop."""
