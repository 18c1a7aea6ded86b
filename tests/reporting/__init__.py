"""Tests of metrics and the evaluate stage."""
