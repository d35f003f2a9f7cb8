"""Importers for released checkpoints; each module is a ``fortify import <NAME>`` plugin."""
