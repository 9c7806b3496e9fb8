"""TFDS dataset builders (each in its own package folder, as TFDS expects)."""
