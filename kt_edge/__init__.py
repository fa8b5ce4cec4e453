"""kt-edge: distil a self-supervised teacher into a small student and ship it to NVIDIA Jetson."""
