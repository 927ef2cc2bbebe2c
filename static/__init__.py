"""The dashboard page and its assets; installed as the package ``proxy.static``."""
