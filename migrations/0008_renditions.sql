-- Renditions (issue 5): frames of an image instance encoded in another transfer syntax ahead of requests (by the
-- `rendition` job at ingest) or on first demand, stored as derived blobs: one blob per instance and transfer
-- syntax holding all its frames end to end, with each frame's [offset, length] here, so that a frame request
-- is a byte-range read and never waits for an encoder.
--
-- A rendition names the instance bytes it was made from (source_sha256): an overwrite drops the rows (the ingest
-- hook), and an encoder that finishes after an overwrite cannot insert a row for the old bytes. Deleting the
-- instance deletes its renditions (the blobs are then orphans for the `blob.gc` sweep); the sweep keeps blobs
-- that a rendition row names.

CREATE TABLE renditions (
    instance_pk          bigint      NOT NULL REFERENCES instances ON DELETE CASCADE,
    transfer_syntax_uid  text        NOT NULL,
    source_sha256        text        NOT NULL,
    blob_key             text        NOT NULL UNIQUE,
    size_bytes           bigint      NOT NULL,
    sha256               text        NOT NULL,
    frames               jsonb       NOT NULL,  -- [[offset, length], ...] of frames 1..n in the blob
    codec                text        NOT NULL,  -- the encoder builds that made it (part of the frames' ETag)
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_pk, transfer_syntax_uid)
);
