"""FX graph passes of the clq backend: one concern per module."""
