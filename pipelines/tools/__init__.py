"""Small commands: ``slidestream info`` (:mod:`.info`) and ``slidestream convert`` (:mod:`.convert`)
over the slide layer, ``slidestream models`` (:mod:`.models`) over the preset table. They take
flags (no config file: nothing to configure beyond the flags) and report errors through
:func:`pipelines.cli.main` like every job."""
