"""The `goalrank` command line."""
