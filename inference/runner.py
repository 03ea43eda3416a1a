"""`inference.run`: one model version on one series, end to end.

1. The result row is marked running (a succeeded one makes the job a no-op: idempotent).
2. The AI service identity asks the policy to read the series (audited), reads its instances from the blob
   store and decodes the pixel arrays off the event loop.
3. The backend runs the model (`InferenceBackend.predict`): arrays in, masks and measurements out.
4. Active models publish; shadow models only record. Publishing stores the SEG through `StoreService.store` (the
   ingest entry of STOW-RS, with an inference origin naming the model, so QIDO-RS/WADO-RS show it and its
   ImagingStudy follows), brings the ImagingStudy up to date, and creates a preliminary DiagnosticReport through
   the FHIR repository, each decided by the policy for the AI service and audited. Output UIDs are derived from
   (series, model, version) and the report id is recorded with the report, so a retry after a partial publish
   completes it instead of repeating it.
5. Latency and the measurements are recorded on the result row (monitoring, drift); a failure is recorded there
   (state `retrying`, or `failed` after the last attempt) and raised so that the job queue backs off and retries.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import asyncpg
import pydicom
from pydicom.dataset import Dataset

from authz.auditrecord import AuditRecord
from authz.decision import Resource
from authz.policy_input import dicomweb_resource
from dicomweb.blobs import BlobStore
from dicomweb.ingest.events import InstanceStored
from dicomweb.ingest.origin import Origin
from dicomweb.ingest.outcome import Outcome
from dicomweb.ingest.reasons import InstanceRejected
from dicomweb.ingest.service import StoreService
from fhir import sync as fhir_sync
from fhir.reports import prepare_report
from fhir.repository import FhirRepository
from fhir.validation import check_resource
from inference import monitoring, outputs, registry
from inference.backends import InferenceBackend
from inference.dispatch import SQL, series_facts
from inference.errors import InferenceError, ModelFailed
from inference.identity import ServiceActor
from inference.models import ModelInput, Prediction
from inference.registry import Model, SeriesFacts
from server.platform import jobs

log = logging.getLogger(__name__)


@dataclass
class Runner:
    pool: asyncpg.Pool
    blobs: BlobStore
    store: StoreService
    fhir: FhirRepository
    backend: InferenceBackend
    actor: ServiceActor
    endpoint_address: str
    max_instances: int = 2000
    """The most instances of one series a model reads (`HOUNSFIELD_INFERENCE_MAX_INSTANCES`): a larger series
    fails the run, never a part of it passed off as the whole."""

    async def handle(self, job: jobs.Job) -> None:
        p = job.payload
        series_uid, name, version = str(p.get("series", "")), str(p.get("model", "")), str(p.get("version", ""))
        async with self.pool.acquire() as conn:
            try:
                model = await registry.get(conn, name, version)
            except InferenceError as exc:
                raise jobs.PermanentJobError(str(exc)) from None
            row = await conn.fetchrow(SQL["result"], series_uid, name, version)
            if row is None or row["state"] == "succeeded":
                return
            await conn.execute(SQL["start_result"], row["id"])
        result_id = int(row["id"])
        try:
            if model.status == "retired":
                raise jobs.PermanentJobError(f"model {model.key} was retired before it ran")
            latency_ms, stats = await self._run(result_id, model, series_uid)
        except Exception as exc:
            final = isinstance(exc, jobs.PermanentJobError) or job.attempts >= job.max_attempts
            message = f"{type(exc).__name__}: {exc}"[:2000]
            async with self.pool.acquire() as conn:
                await conn.execute(SQL["fail_result"], result_id, "failed" if final else "retrying", message)
            monitoring.record_run(name, version, model.status == "shadow", "failed" if final else "retrying", None, {})
            log.info("inference %s on a series failed (attempt %d): %s", model.key, job.attempts, message)
            raise
        async with self.pool.acquire() as conn:
            await conn.execute(SQL["finish_result"], result_id, latency_ms, json.dumps(stats))
        monitoring.record_run(name, version, model.status == "shadow", "succeeded", latency_ms, stats)

    async def _run(self, result_id: int, model: Model, series_uid: str) -> tuple[float, dict[str, Any]]:
        async with self.pool.acquire() as conn:
            found = await series_facts(conn, series_uid)
            if found is None:
                raise jobs.PermanentJobError("the series is no longer in the archive")
            facts, modalities = found
            rows = await conn.fetch(SQL["series_instances"], series_uid, self.max_instances + 1)
        if len(rows) > self.max_instances:
            count = max(facts.instances, len(rows))
            raise jobs.PermanentJobError(
                f"the series has {count} instances, more than the {self.max_instances} a model reads"
                " (HOUNSFIELD_INFERENCE_MAX_INSTANCES); nothing was processed"
            )
        source = dicomweb_resource(
            "series",
            patient_id=facts.patient_id,
            study_uid=facts.study_uid,
            series_uid=series_uid,
            modalities_in_study=modalities,
        )
        decision = await self.actor.require("read", source, method="inference.read")
        datasets = await self._read(rows)
        await self.actor.record("read", source, decision, method="inference.read")
        inputs = await anyio.to_thread.run_sync(_inputs, datasets)
        started = time.perf_counter()
        prediction = await self.backend.predict(model, inputs)
        latency_ms = (time.perf_counter() - started) * 1000
        stats: dict[str, Any] = {k: float(v) for k, v in prediction.measurements.items()}
        stats["images"] = len(datasets)
        if model.status == "active":
            await self._publish(result_id, model, facts, modalities, datasets, prediction)
        return latency_ms, stats

    async def _read(self, rows: Sequence[asyncpg.Record]) -> list[Dataset]:
        if not rows:
            raise ModelFailed("the series has no instances")
        datasets: list[Dataset] = []
        for row in rows:
            data = await self.blobs.read_range(row["blob_key"], 0, int(row["size_bytes"]))
            datasets.append(await anyio.to_thread.run_sync(_parse, data))
        return datasets

    async def _publish(
        self,
        result_id: int,
        model: Model,
        facts: SeriesFacts,
        modalities: tuple[str, ...],
        datasets: list[Dataset],
        prediction: Prediction,
    ) -> None:
        algorithm = self.backend.adapter(model).algorithm
        if "SEG" in model.outputs and prediction.segments:
            out_series, out_instance = outputs.result_uids(facts.series_uid, model)
            async with self.pool.acquire() as conn:
                exists = await conn.fetchval(SQL["instance_exists"], out_instance)
            if not exists:
                data = await anyio.to_thread.run_sync(
                    outputs.segmentation, datasets, prediction, algorithm, model, facts.series_uid
                )
                await self._store(model, facts, modalities, out_series, out_instance, data)
            async with self.pool.acquire() as conn:
                await conn.execute(SQL["record_outputs"], result_id, out_series, [out_instance])
        if "SR" in model.outputs and (prediction.measurements or prediction.findings):
            await self._publish_sr(result_id, model, facts, modalities, datasets, prediction, algorithm)
        if "DiagnosticReport" in model.outputs:
            await self._report(result_id, model, facts, prediction, algorithm)

    async def _publish_sr(
        self,
        result_id: int,
        model: Model,
        facts: SeriesFacts,
        modalities: tuple[str, ...],
        datasets: list[Dataset],
        prediction: Prediction,
        algorithm: Any,
    ) -> None:
        """The TID 1500 Measurement Report (inference.sr), stored like the SEG. The result row names the SEG's
        series when there is one (else the SR's) and lists every output instance."""
        from inference import sr  # highdicom and pydicom's codes load with the first report, not with the server

        sr_series, sr_instance = sr.sr_uids(facts.series_uid, model)
        async with self.pool.acquire() as conn:
            exists = await conn.fetchval(SQL["instance_exists"], sr_instance)
        if not exists:
            data = await anyio.to_thread.run_sync(
                sr.measurement_report, datasets, prediction, algorithm, model, facts.series_uid
            )
            await self._store(model, facts, modalities, sr_series, sr_instance, data)
        outputs_so_far = [sr_instance]
        series = sr_series
        if "SEG" in model.outputs and prediction.segments:
            series, seg_instance = outputs.result_uids(facts.series_uid, model)
            outputs_so_far.insert(0, seg_instance)
        async with self.pool.acquire() as conn:
            await conn.execute(SQL["record_outputs"], result_id, series, outputs_so_far)

    async def _store(
        self,
        model: Model,
        facts: SeriesFacts,
        modalities: tuple[str, ...],
        series_uid: str,
        instance_uid: str,
        data: bytes,
    ) -> None:
        """Store a result instance through the ingest path, as the AI service."""
        target = dicomweb_resource(
            "instance", patient_id=facts.patient_id, study_uid=facts.study_uid, modalities_in_study=modalities
        )
        decision = await self.actor.require("create", target, method="inference.store")
        stored = Resource(
            kind="instance",
            patient_id=facts.patient_id,
            study_uid=facts.study_uid,
            series_uid=series_uid,
            instance_uid=instance_uid,
        )

        def audit(_stored: InstanceStored) -> list[AuditRecord]:  # committed with the result
            return [self.actor.record_of("create", stored, decision, method="inference.store")]

        origin = Origin.inference(self.actor.principal.sub, model.key)
        try:
            spooled = await anyio.to_thread.run_sync(self.store.spool.write, data)
        except InstanceRejected as exc:  # a full disk, free space below the watermark
            outcome = Outcome.rejected(exc)
        else:
            outcome = await self.store.store(spooled, origin, study=facts.study_uid, audit=audit)
        if outcome.failure is not None:
            await self.actor.record(
                "create", stored, decision, method="inference.store", status=500, detail=outcome.comment
            )
            raise ModelFailed(f"the result could not be stored: {outcome.comment}")
        if outcome.committed:
            self.actor.audit.nudge()
        else:  # the same bytes were already stored
            await self.actor.record("create", stored, decision, method="inference.store")

    async def _report(
        self, result_id: int, model: Model, facts: SeriesFacts, prediction: Prediction, algorithm: Any
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(SQL["report_of"], result_id):
                return
            synced = await fhir_sync.sync_study(
                conn, self.fhir, facts.study_uid, endpoint_address=self.endpoint_address
            )
            study = synced.imaging_study
            if study is None or study.content is None:
                raise ModelFailed("the study has no ImagingStudy")
            content = outputs.diagnostic_report(
                prediction,
                algorithm,
                model,
                patient=str(study.content["subject"]["reference"]),
                imaging_study=f"ImagingStudy/{study.id}",
                series_uid=facts.series_uid,
                issued=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            )
            content = check_resource("DiagnosticReport", content)
            filing = await prepare_report(conn, self.fhir, content)
            target = Resource(kind="DiagnosticReport", patient_id=filing.patient_key, modalities=filing.modalities)
            decision = await self.actor.require("create", target, method="inference.report")
            stored = await self.fhir.create(conn, "DiagnosticReport", content, filing)
            await conn.execute(SQL["record_report"], result_id, stored.id)
        done = Resource(
            kind="DiagnosticReport",
            patient_id=filing.patient_key,
            study_uid=facts.study_uid,
            attributes={"id": stored.id},
        )
        await self.actor.record("create", done, decision, method="inference.report")


def _parse(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _inputs(datasets: list[Dataset]) -> ModelInput:
    return ModelInput(tuple(outputs.image_input(ds) for ds in datasets))
