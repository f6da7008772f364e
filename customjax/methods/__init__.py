"""One module per paper: its trainable tree, its loss, its sampling settings."""
