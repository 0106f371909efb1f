"""filedrop: Nuxeo-compatible chunked uploads turned into smartlinks that NGINX serves."""

__version__ = "0.1.0"
