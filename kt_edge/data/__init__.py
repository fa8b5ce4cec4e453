"""Images in, tensors out: sources on disk, the shipped sample, and augmentations."""
