"""Data side: record schema, synthetic world, templates, sources, quality checks."""
