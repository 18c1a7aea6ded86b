"""Tests of end to end: dvc.yaml's deps and real DVC runs."""
