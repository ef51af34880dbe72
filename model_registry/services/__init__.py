"""The use cases, one group per module; each receives what it uses from model_registry.bootstrap."""
