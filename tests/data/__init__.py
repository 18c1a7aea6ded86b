"""Tests of unit and data-contract tests of the data stages."""
