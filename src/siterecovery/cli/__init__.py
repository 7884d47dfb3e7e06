"""The `siterecovery` command line (Typer + Rich)."""
