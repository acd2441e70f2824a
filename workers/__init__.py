"""Running postroom: the pool launcher, Flower, the demo and the ``postroom`` command."""
