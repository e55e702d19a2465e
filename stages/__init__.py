"""One module per DVC stage, named as in dvc.yaml; each is a thin main() over testable functions."""
