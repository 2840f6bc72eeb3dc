-- Test data, loaded once per session on top of scripts/schema.sql.
-- Organizations: org-a (alice, bob, dave), org-b (carol, dave).
INSERT INTO organization_users (organization_id, user_id) VALUES
  ('org-a', 'alice'), ('org-a', 'bob'), ('org-a', 'dave'),
  ('org-b', 'carol'), ('org-b', 'dave');
INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires) VALUES
  ('tok-alice', 'web', 'alice', LOCALTIMESTAMP + INTERVAL '1 day'),
  ('tok-bob',   'web', 'bob',   LOCALTIMESTAMP + INTERVAL '1 day'),
  ('tok-carol', 'web', 'carol', LOCALTIMESTAMP + INTERVAL '1 day'),
  ('tok-dave',  'web', 'dave',  LOCALTIMESTAMP + INTERVAL '1 day'),
  ('tok-expired', 'web', 'alice', LOCALTIMESTAMP - INTERVAL '1 hour');
