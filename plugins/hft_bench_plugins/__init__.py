"""The built-in plugins of hft-bench, written as any third party would write theirs: public API only,
registered through the ``hft_bench`` entry-point group in pyproject.toml."""
