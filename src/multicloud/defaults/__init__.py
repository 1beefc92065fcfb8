"""Default YAML config files shipped with the package."""
