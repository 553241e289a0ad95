"""Command implementations; `fpm.cli` only parses arguments and calls these."""
