"""Development only: a private PostgreSQL (`embedded_pg`) and the `make run` stack built on it (`stack`).

Nothing in the serving path imports this package; `dialog-server --dev` and the test fixtures do.
"""
