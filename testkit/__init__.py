"""Test and demo tooling: the synthetic fixture, its loopback server, a local S3 store, repo copies, the demo."""
