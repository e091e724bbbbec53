"""Small commands over the slide layer: ``slidestream info`` (:mod:`.info`) and ``slidestream
convert`` (:mod:`.convert`). They take a slide and flags (no config file: nothing to configure
beyond the flags) and report errors through :func:`pipelines.cli.main` like every job."""
