"""The catalog's schema as numbered migrations, applied in order by `Catalog.migrate`."""

# Append-only: a released migration is never edited; a schema change is a new entry.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE TABLE drops (
        drop_id VARCHAR PRIMARY KEY,
        path VARCHAR NOT NULL,
        format VARCHAR NOT NULL,
        sources VARCHAR NOT NULL,          -- JSON list of manifest / shard files
        n_samples INTEGER NOT NULL,
        n_valid INTEGER NOT NULL,
        n_quarantined INTEGER NOT NULL,
        bytes BIGINT NOT NULL,
        ingested_at TIMESTAMP NOT NULL,
        run_id VARCHAR
    );
    CREATE TABLE samples (
        sample_id VARCHAR PRIMARY KEY,     -- '<drop>/<local id>', stable across re-ingestion
        drop_id VARCHAR NOT NULL,
        local_id VARCHAR NOT NULL,
        content_hash VARCHAR,              -- sha256 of the file bytes
        path VARCHAR NOT NULL,
        width INTEGER,
        height INTEGER,
        n_bytes BIGINT,
        raw_caption VARCHAR,
        status VARCHAR NOT NULL,           -- 'valid' | 'quarantined'
        quarantine_reason VARCHAR
    );
    CREATE INDEX samples_drop ON samples (drop_id);
    CREATE INDEX samples_hash ON samples (content_hash);
    CREATE TABLE lineage (
        artifact VARCHAR PRIMARY KEY,      -- '<asset>/<partition>'
        asset VARCHAR NOT NULL,
        partition_key VARCHAR,
        inputs VARCHAR NOT NULL,           -- JSON list of upstream artifacts or files
        run_id VARCHAR,
        code_version VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL,
        governor_id VARCHAR,
        created_at TIMESTAMP NOT NULL
    );
    """),
    (2, """
    CREATE TABLE models (
        model_id VARCHAR PRIMARY KEY,      -- sha256 of the weights file
        role VARCHAR NOT NULL,             -- 'governor' | 'student'
        source VARCHAR NOT NULL,
        config VARCHAR NOT NULL,           -- JSON: architecture / settings
        record VARCHAR NOT NULL,           -- JSON: training record and held-out scores
        tau DOUBLE,                        -- calibrated class threshold (governors)
        calibration VARCHAR,               -- JSON: how tau was chosen and what it reached
        created_at TIMESTAMP NOT NULL
    );
    """),
    (3, """
    CREATE TABLE training_sets (
        training_set_id VARCHAR PRIMARY KEY,  -- sha256 of (sample id, caption, kept patches) of every member
        recipe VARCHAR NOT NULL,
        n_members INTEGER NOT NULL,
        excluded VARCHAR NOT NULL,            -- JSON: reason -> count
        drops VARCHAR NOT NULL,               -- JSON list of drop ids it was assembled from
        config_hash VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE training_set_members (
        training_set_id VARCHAR NOT NULL,
        recipe VARCHAR NOT NULL,
        sample_id VARCHAR NOT NULL,
        caption_version VARCHAR NOT NULL,     -- 'original' | 'cleaned' | 'enriched'
        caption VARCHAR NOT NULL,
        kept_patches VARCHAR NOT NULL         -- 'all', 'random', or the kept indices
    );
    CREATE INDEX members_sample ON training_set_members (sample_id);
    CREATE TABLE checkpoints (
        checkpoint_id VARCHAR PRIMARY KEY,    -- sha256 of the weights file
        recipe VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        training_set_id VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL,
        tokens_seen BIGINT NOT NULL,
        samples_seen BIGINT NOT NULL,
        wall_seconds DOUBLE NOT NULL,
        final_loss DOUBLE NOT NULL,
        record VARCHAR NOT NULL,              -- JSON: phases, step times, learning curve
        created_at TIMESTAMP NOT NULL
    );
    CREATE TABLE benchmark_scores (
        score_id VARCHAR PRIMARY KEY,         -- '<checkpoint id>:<metric>'
        checkpoint_id VARCHAR NOT NULL,
        recipe VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        metric VARCHAR NOT NULL,
        value DOUBLE NOT NULL,
        eval_set VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    );
    """),
    # Lineage becomes append-only (one row per materialisation, ordered by seq) so that a checkpoint
    # can be traced to the versions it was trained on; lineage_current is the latest row per artifact.
    # Rows from before this migration keep their order; overwritten history is not recoverable.
    (4, """
    CREATE SEQUENCE lineage_seq;
    CREATE TABLE lineage_log (
        seq BIGINT PRIMARY KEY DEFAULT nextval('lineage_seq'),
        artifact VARCHAR NOT NULL,         -- '<asset>/<partition>'
        asset VARCHAR NOT NULL,
        partition_key VARCHAR,
        inputs VARCHAR NOT NULL,           -- JSON list of upstream artifacts or files
        run_id VARCHAR,                    -- Dagster run that materialised it
        code_version VARCHAR NOT NULL,
        config_hash VARCHAR NOT NULL,
        governor_id VARCHAR,
        created_at TIMESTAMP NOT NULL
    );
    INSERT INTO lineage_log (artifact, asset, partition_key, inputs, run_id, code_version, config_hash,
                             governor_id, created_at)
        SELECT * FROM lineage ORDER BY created_at, artifact;
    DROP TABLE lineage;
    ALTER TABLE lineage_log RENAME TO lineage;
    CREATE INDEX lineage_artifact ON lineage (artifact);
    CREATE VIEW lineage_current AS
        SELECT * FROM lineage QUALIFY row_number() OVER (PARTITION BY artifact ORDER BY seq DESC) = 1;
    -- the last lineage seq a checkpoint saw: its trace reads lineage as of then
    ALTER TABLE checkpoints ADD COLUMN lineage_seq BIGINT;
    UPDATE checkpoints SET lineage_seq = (SELECT max(seq) FROM lineage);
    """),
    # Two fair comparisons: a checkpoint was trained at the equal vision-token budget or at the
    # equal wall-clock budget; earlier checkpoints were all token-budget runs.
    (5, """
    ALTER TABLE checkpoints ADD COLUMN budget VARCHAR DEFAULT 'tokens';
    UPDATE checkpoints SET budget = 'tokens';
    """),
    # Commit records folded by the committer (storage/commits.py): a record's id is written in the
    # same transaction as its rows, so no record is ever applied twice.
    (6, """
    CREATE TABLE commits (
        commit_id VARCHAR PRIMARY KEY,        -- '<submission time ns>-<random>'
        n_ops INTEGER NOT NULL,
        folded_at TIMESTAMP NOT NULL
    );
    """),
    # Drops as versioned inputs: the content fingerprint each was ingested at, and whether its
    # folder is still there (the drop sensor marks a drop whose folder was deleted).
    (7, """
    ALTER TABLE drops ADD COLUMN version VARCHAR;             -- fingerprint of the files ingested
    ALTER TABLE drops ADD COLUMN status VARCHAR DEFAULT 'present';  -- 'present' | 'deleted'
    ALTER TABLE drops ADD COLUMN status_changed_at TIMESTAMP;
    UPDATE drops SET status = 'present';
    """),
]
