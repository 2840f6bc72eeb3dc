-- The application tables orgcast reads (contract section 2). orgcast never
-- writes them; this file creates them for the demo and the tests only.
CREATE TABLE IF NOT EXISTS oauth_access_tokens (
  access_token VARCHAR(40)  NOT NULL PRIMARY KEY,
  client_id    VARCHAR(80)  NOT NULL,
  user_id      VARCHAR(80),
  expires      TIMESTAMP    NOT NULL,
  scope        VARCHAR(4000)
);
CREATE TABLE IF NOT EXISTS organization_users (
  organization_id VARCHAR(64) NOT NULL,
  user_id         VARCHAR(80) NOT NULL,
  PRIMARY KEY (organization_id, user_id)
);
