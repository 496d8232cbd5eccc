"""Thin servicers: validate -> resolve shard -> call storage -> build response."""
