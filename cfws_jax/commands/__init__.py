"""``cfws-jax`` subcommands, one module each (see ``cfws_jax.cli``)."""
