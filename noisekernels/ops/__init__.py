"""One file per op: wrapper, fake kernel, autograd, backend choice and the reference (the spec)."""
