"""The FUSE kernel protocol, our own session, and the pyfuse3 adapter."""
