"""Training: the one training loop, forgetting protection and its background text, and the
transformers.Trainer / TRL integration."""
