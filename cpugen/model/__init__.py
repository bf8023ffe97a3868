"""The model: its config and where it comes from, its shapes, the transformer, its weights and tokenizer."""
