"""Check and GPU scripts of the project (not installed with it); see scripts/README.md."""
