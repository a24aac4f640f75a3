"""Experiment configs: one get_config() per file. Variants import their base."""
