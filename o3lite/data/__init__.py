"""Reasoning-task data: procedural tasks, TFDS builders, JSONL, batching."""
