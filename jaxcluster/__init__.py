"""jaxcluster: sparse convolutional clustering of LArTPC images in JAX and Flax."""

__version__ = "0.1.0"
