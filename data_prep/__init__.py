"""Offline GeoMeld dataset build: sources -> validate -> caption -> split -> ArrayRecord (TFDS)."""
