"""Integrations with other training loops: the Hugging Face Trainer and TRL (:mod:`.hf`)."""
