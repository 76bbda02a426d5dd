"""machaon's embedded default configuration, shipped inside the package."""
