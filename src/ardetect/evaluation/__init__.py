"""Evaluation: the paper's ranking metrics, one harness for every method, baselines, figures."""
