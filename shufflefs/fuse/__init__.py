"""The FUSE kernel protocol and request loop, spoken on /dev/fuse without libfuse."""
