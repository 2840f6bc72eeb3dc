-- Demo data for `make run`: one organization, two users, a valid token and
-- an expired one. Tokens are written in the database's own time zone.
INSERT INTO organization_users (organization_id, user_id) VALUES
  ('acme', 'alice'), ('acme', 'bob')
ON CONFLICT DO NOTHING;
INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires, scope) VALUES
  ('demo-alice-token', 'demo', 'alice', LOCALTIMESTAMP + INTERVAL '30 days', NULL),
  ('demo-bob-token', 'demo', 'bob', LOCALTIMESTAMP + INTERVAL '30 days', NULL),
  ('demo-expired-token', 'demo', 'alice', LOCALTIMESTAMP - INTERVAL '1 hour', NULL)
ON CONFLICT (access_token) DO UPDATE SET expires = EXCLUDED.expires;
