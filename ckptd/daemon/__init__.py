"""The daemon: composes the library (``ckptd.*``) into a watching, ranking, publishing service."""
