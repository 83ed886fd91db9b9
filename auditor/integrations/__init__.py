"""Trainer hooks that seal what a trainer writes: `hf` (transformers) and `lightning`.

Each module imports its trainer library at the top: import the one you use. Nothing here is
imported by `auditor` itself.
"""
