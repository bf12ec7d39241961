"""Pipeline stages: each is a plain run(params, paths) function shared by the CLI, DVC and Prefect."""
