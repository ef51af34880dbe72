"""StarChart iris trainer package (entry point: python -m trainer.task)."""
