"""StarChart sentiment trainer package (entry point: python -m trainer.task)."""
