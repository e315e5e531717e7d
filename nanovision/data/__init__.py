"""Built-in data for nanovision: a deterministic synthetic shapes world (see :mod:`nanovision.data.shapes`)."""
