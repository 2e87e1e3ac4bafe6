"""Workflow definitions (YAML) and the runner that executes their stages."""
