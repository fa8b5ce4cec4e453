"""Evaluation protocols for frozen embeddings: k-NN, linear probes, cluster alignment."""
