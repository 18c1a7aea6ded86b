"""Synthetic data for the demo and the tests: faces, AI Hub-shaped photos, videos. Imported by the CLI and
the tests only."""
