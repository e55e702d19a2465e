"""Operator commands: check the DVC remote before a push or pull, tag a release."""
