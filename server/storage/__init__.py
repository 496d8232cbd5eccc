"""PostgreSQL access, one module per concern: pools, messages, fences, overrides, moves, layout, schema.

All SQL lives here, always parameterized; driver failures reach callers as the domain's errors
(server.resilience.db_errors).
"""
