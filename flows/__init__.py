"""Prefect flows of DeepRubin-Explorer: orchestration only (retries, timeouts, concurrency, artifacts, schedules).

The science lives in ``deeprubin`` (src/): every task here calls a stage's ``run()``, the same function that the CLI
and DVC call.
"""
