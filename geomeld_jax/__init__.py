"""GeoMeld-FM in JAX/Flax: modality registry, records, models, losses and training."""
