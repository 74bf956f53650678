"""Evaluation: generation backends, judges, and the harmful score / fine-tune accuracy of a run."""
