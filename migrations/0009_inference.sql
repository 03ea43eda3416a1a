-- AI on ingest (issue 7): the model registry, one result row per (series, model, version), and on-demand
-- inference requests. See inference/registry.py, inference/dispatch.py, inference/runner.py.

-- Model statuses as a table (house style 8): active models run and publish, shadow models run and only record,
-- retired models do not run.
CREATE TABLE inference_model_states (name text PRIMARY KEY);
INSERT INTO inference_model_states VALUES ('active'), ('shadow'), ('retired');

CREATE TABLE inference_models (
    name        text NOT NULL,
    version     text NOT NULL,
    task        text NOT NULL,
    selector    jsonb NOT NULL DEFAULT '{}',   -- {modality, sop_class, body_part, series_description, min_instances}
    outputs     text[] NOT NULL DEFAULT '{}',  -- what it publishes: SEG, SR, DiagnosticReport
    status      text NOT NULL DEFAULT 'shadow' REFERENCES inference_model_states,
    backend     jsonb NOT NULL DEFAULT '{}',   -- {"adapter": ..., "backend": "in-process", ...}
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
CREATE INDEX inference_models_running ON inference_models (status) WHERE status <> 'retired';

CREATE TABLE inference_result_states (name text PRIMARY KEY);
INSERT INTO inference_result_states VALUES ('queued'), ('running'), ('retrying'), ('succeeded'), ('failed');

-- One result per series, model and version (idempotent dispatch). `shadow` is the model's status when it ran:
-- a shadow result publishes nothing (no output series, no report).
CREATE TABLE inference_results (
    id                bigserial PRIMARY KEY,
    study_uid         text NOT NULL,
    series_uid        text NOT NULL,
    model_name        text NOT NULL,
    model_version     text NOT NULL,
    state             text NOT NULL DEFAULT 'queued' REFERENCES inference_result_states,
    shadow            boolean NOT NULL DEFAULT false,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    latency_ms        double precision,
    stats             jsonb NOT NULL DEFAULT '{}',
    output_series_uid text,
    output_instances  text[] NOT NULL DEFAULT '{}',
    report_id         text,
    feedback          text,            -- final (accepted) or entered-in-error (rejected), from the report
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (series_uid, model_name, model_version),
    FOREIGN KEY (model_name, model_version) REFERENCES inference_models (name, version)
);
CREATE INDEX inference_results_model ON inference_results (model_name, model_version, state);
CREATE INDEX inference_results_report ON inference_results (report_id) WHERE report_id IS NOT NULL;

CREATE TABLE inference_requests (
    id            uuid PRIMARY KEY,
    study_uid     text NOT NULL,
    series_uid    text NOT NULL,
    model_name    text NOT NULL,
    model_version text NOT NULL,
    requested_by  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (model_name, model_version) REFERENCES inference_models (name, version)
);
