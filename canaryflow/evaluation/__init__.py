"""Offline evaluation: suites, scorers, the harness, and the paired candidate-vs-baseline test."""
