"""Optional downstream parts, one sub-package each, each behind its own pip extra."""
