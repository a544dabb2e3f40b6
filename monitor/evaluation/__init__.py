"""Scoring detectors against labelled benchmarks (NAB, SMD-style point labels)."""
