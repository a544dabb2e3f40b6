"""Forewarn: streaming anomaly detection for sensor fleets."""
__version__ = "0.1.0"
