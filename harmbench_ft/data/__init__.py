"""Data: the dataset registry and loading (sources), tasks, the prompt template (formatting) and the disjoint windows."""
