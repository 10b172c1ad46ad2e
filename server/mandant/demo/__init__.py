"""The built-in demo's models: small networks built deterministically from seeds, so that
``mandant serve`` with no configuration needs no downloads."""
