"""Default configuration shipped with Mirador: the TOML files beside this module."""
