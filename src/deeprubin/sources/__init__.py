"""Sources of light curves: each yields contract tables (see deeprubin.schema)."""
