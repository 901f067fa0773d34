"""TFDS builders (array_record, no TensorFlow) for the LC-Fed datasets: one builder per
dataset, one BuilderConfig per site (see `lcfed_jax.data.real`)."""
