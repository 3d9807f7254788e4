"""Pollinate's shared library: settings, model and LoRA, data, training maths and the adapter wire format."""
