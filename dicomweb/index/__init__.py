"""The PostgreSQL index: named queries and the repository that runs them."""
