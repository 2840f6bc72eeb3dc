"""Publishing: one service, and one decoder per source (HTTP, pg_notify, Redis)."""
