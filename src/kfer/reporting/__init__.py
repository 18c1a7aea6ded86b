"""Metrics and the evaluate stage: scoring the test split and labelled photo sets through the served path."""
