"""l3net: a pure layer-3 Docker network plugin (NetworkDriver + IpamDriver)."""

__version__ = "0.1.0"
