"""Small VLMs built by tlq itself: tokenizers, processors and checkpoints for tests, demo and benchmark."""
