"""kiln benchmark scripts (not product code, not tests); see docs/benchmarks.md."""
