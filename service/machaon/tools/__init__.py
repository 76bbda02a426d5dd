"""Build-time and demo code: building model packages, the phantom generator, the demo.

Nothing here runs in `machaon serve`; the build's own dependencies come with
the `machaon[build]` extra.
"""
