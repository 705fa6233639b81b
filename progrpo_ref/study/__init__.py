"""The study: what the notebooks measure (``analysis``), plot (``plots``), run (``experiments``),
time (``bench``) and record (``results``). Nothing in the package imports this folder."""
