"""Who may listen: credentials, the database lookups and the connect check."""
