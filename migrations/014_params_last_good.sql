-- 014: the SSM params documents that were valid when read, so that a start-up with SSM
-- unreachable uses the operators' last good limits rather than the reviewed file (whose limits
-- may be looser); and the params each configured source has in force, for `status`.

-- Every document an SSM read accepted, as read (the text is re-validated before use).
-- content_hash is ParamsInForce.content_hash, the identity every decision records.
CREATE TABLE params_ssm_documents (
    name          text        NOT NULL,   -- the SSM parameter name
    version       text        NOT NULL,   -- its SSM Version
    content_hash  text        NOT NULL,
    document      text        NOT NULL,
    stored_at     timestamptz NOT NULL,
    PRIMARY KEY (name, version, content_hash)
);
-- The start-up read: the newest good document of one parameter.
CREATE INDEX params_ssm_documents_newest ON params_ssm_documents (name, stored_at DESC);

-- What is in force for each configured source (e.g. ssm:/ops-pipeline/trading-params), written
-- by the services whenever it changes: `status` shows a fallback even from another process.
CREATE TABLE params_in_force (
    configured_source text        PRIMARY KEY,
    source            text        NOT NULL,   -- ssm:..., ssm-last-good:..., file:...
    version           text        NOT NULL,
    content_hash      text        NOT NULL,
    using_fallback    boolean     NOT NULL,
    note              text,
    since             timestamptz NOT NULL
);
