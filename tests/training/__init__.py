"""Tests of the network, train, resume, distribution and tuning, with real TensorFlow, MLflow and Optuna."""
