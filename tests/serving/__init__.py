"""Tests of the photo model, registry, predict, video and Grad-CAM."""
