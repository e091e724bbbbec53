"""Slide backends. Each implements :class:`wsi.backends.base.Backend`; ``wsi.slide.Slide`` does the
checks once and calls the backend's private hooks."""
