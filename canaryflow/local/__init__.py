"""Running it all on one machine: the embedded stack, its processes, examples, load generator."""
