"""The command-line tools: one module each over the library (`python -m kpjax.train` runs kpjax.cli.train),
and `common`, what they share (flags, config files, exit statuses). No library module imports these."""
