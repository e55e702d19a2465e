"""Shared code for the traffic-detector pipeline stages in ``stages/``."""
