"""GUI-free logic of the MiMSlicer module: engine jobs, scene I/O, model catalogue, dependencies.

Nothing here imports Qt (but desktopTests, which clicks through the panel in Slicer), torch or MONAI, and nothing is
installed at import: it runs in desktop Slicer and, for tests, on the `slicer-core` MRML library alone."""
