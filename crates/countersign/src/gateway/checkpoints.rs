//! The audit log for auditors: signed checkpoints, JSON Lines export as a job, retention as a job, and
//! chain verification that starts from the checkpoint retention left behind.
//!
//! A checkpoint is an Ed25519 signature over (org, seq, head hash, time) made with the instance's key
//! (`audit-signing.key` in the data directory). An export ends with a fresh checkpoint of its last event and,
//! when retention has deleted a prefix, starts with the checkpoint that vouches for its first event, so
//! `countersign audit verify --file … --public-key …` can check it offline. Retention deletes only whole
//! prefixes and only behind a stored checkpoint; the schema refuses any other delete.

use std::path::PathBuf;

use countersign_core::audit::{Actor, ChainReport, ChainVerifier};
use countersign_core::checkpoint::{Checkpoint, CheckpointLine, verify_checkpoint};
use countersign_core::domain::{Job, JobKind};
use countersign_core::ids::{JobId, OrgId};
use countersign_core::store::{AuditFilter, StoreTx};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::jobs::JobOutcome;
use super::{Caller, Gateway};

/// The longest audit retention window: a century. Longer is a slip, and the date arithmetic has limits.
pub const MAX_RETENTION_DAYS: u32 = 36_500;
use crate::error::{Error, Result};

const EXPORT_PAGE: u32 = 2000;
/// Events (and so at most as many checkpoints) read at a time by `verify_audit`.
const VERIFY_PAGE: u32 = 5000;

impl Gateway {
    pub fn audit_public_key(&self) -> (String, String) {
        (self.inner.signer.public_key_base64(), self.inner.signer.key_id())
    }

    /// Where an export job writes its file.
    fn export_path(&self, job: &JobId) -> PathBuf {
        self.inner.data_dir.join("exports").join(format!("{job}.jsonl"))
    }

    /// Signs the org's current head and stores the checkpoint (admin).
    pub async fn checkpoint_now(&self, caller: &Caller) -> Result<Option<Checkpoint>> {
        caller.require_admin()?;
        let mut work = self.write().await?;
        let checkpoint = self.checkpoint_head(&mut *work.tx, caller.org_id()).await?;
        work.commit(self).await?;
        Ok(checkpoint)
    }

    /// The stored checkpoint at the org's head, signing one if there is none yet.
    async fn checkpoint_head(&self, tx: &mut dyn StoreTx, org: &OrgId) -> Result<Option<Checkpoint>> {
        let Some(head) = tx.audit_head(org).await? else { return Ok(None) };
        let stored = match tx.checkpoint_at(org, head.seq).await? {
            Some(existing) => existing,
            None => {
                let signed = self.inner.signer.sign(org.as_str(), head.seq, &head.hash, head.time.timestamp_micros());
                self.store_checkpoint(tx, org, &signed).await?
            }
        };
        // A checkpoint is never signed over a hash the chain no longer has: say so instead of handing out
        // a pair that cannot verify.
        if !self.vouches_for(&stored, &head.hash) {
            return Err(Error::Internal(format!(
                "the checkpoint stored at seq {} does not vouch for the audit chain there (its hash differs, or \
                 another key signed it); run audit verify",
                head.seq
            )));
        }
        Ok(Some(stored))
    }

    /// Whether a stored checkpoint is this instance's signature over `hash`.
    fn vouches_for(&self, checkpoint: &Checkpoint, hash: &str) -> bool {
        checkpoint.head_hash == hash && verify_checkpoint(checkpoint, &self.inner.signer.public_key_base64()).is_ok()
    }

    /// Stores a checkpoint and answers the one stored at its seq. Another replica may have signed the same
    /// seq meanwhile: the insert then keeps that one, and it is the one to use.
    async fn store_checkpoint(&self, tx: &mut dyn StoreTx, org: &OrgId, checkpoint: &Checkpoint) -> Result<Checkpoint> {
        tx.insert_checkpoint(checkpoint).await?;
        tx.checkpoint_at(org, checkpoint.seq)
            .await?
            .ok_or_else(|| Error::Internal(format!("the checkpoint at seq {} vanished", checkpoint.seq)))
    }

    /// Queues a JSON Lines export of the caller's org (admin); the job's result names the file.
    pub async fn start_audit_export(&self, caller: &Caller) -> Result<Job> {
        caller.require_admin()?;
        let org = caller.org_id().clone();
        let now = self.now();
        let job = Job::new(org.clone(), JobKind::AuditExport, Some(org.to_string()), json!({}), now);
        let mut work = self.write().await?;
        work.enqueue(&job).await?;
        work.audit(&org, now, &caller.actor(), "audit.export_requested", Some(job.id.as_str()), json!({})).await?;
        work.commit(self).await?;
        Ok(job)
    }

    /// The finished export of a job of the caller's org (admin). The file is on the replica whose runner made
    /// it; any other replica writes the same file again from the store (the job's result names its range,
    /// and its checkpoints are stored), unless retention has since deleted events of it.
    pub async fn export_file(&self, caller: &Caller, id: &JobId) -> Result<PathBuf> {
        caller.require_admin()?;
        let job = self.get_job(caller, id).await?;
        if job.kind != JobKind::AuditExport {
            return Err(Error::not_found("audit export", id.as_str()));
        }
        if job.state != countersign_core::state::JobState::Succeeded {
            return Err(Error::Conflict {
                message: format!("export {id} is {}; wait for it to succeed", job.state.as_str()),
                state: Some(job.state.as_str().to_owned()),
            });
        }
        let path = self.export_path(id);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let result = job.result.clone().unwrap_or_default();
        let Some(upto) = result.get("last_seq").and_then(serde_json::Value::as_i64) else {
            return Err(Error::Internal(format!("export {id} has no range in its result")));
        };
        // The opening checkpoint (where retention had cut the log) is just before the first event.
        let start = result.get("first_seq").and_then(serde_json::Value::as_i64).map_or(upto, |first| first - 1);
        let mut tx = self.read().await?;
        if tx.retention(&job.org_id).await?.deleted_upto > start {
            return Err(Error::Conflict {
                message: format!(
                    "export {id} was made on another replica and retention has since deleted events it held; \
                     start a new export"
                ),
                state: Some("deleted".into()),
            });
        }
        let opening =
            if start > 0 {
                Some(tx.checkpoint_at(&job.org_id, start).await?.ok_or_else(|| {
                    Error::Internal(format!("no checkpoint at seq {start}, where export {id} opened"))
                })?)
            } else {
                None
            };
        let closing = tx
            .checkpoint_at(&job.org_id, upto)
            .await?
            .ok_or_else(|| Error::Internal(format!("no checkpoint at seq {upto}, where export {id} closed")))?;
        // In the same read transaction as the retention check: a retention run meanwhile cannot cut events out.
        self.write_export(&mut *tx, &job.org_id, opening, start, Some(closing), &path, None).await?;
        Ok(path)
    }

    pub(super) async fn export_audit_job(&self, job: &Job) -> JobOutcome {
        match self.export_audit(job).await {
            Ok(result) => JobOutcome::Succeeded(result),
            Err(Error::Unavailable(e)) => JobOutcome::Retry(format!("store unavailable: {e}")),
            Err(e) => JobOutcome::Failed(e.to_string()),
        }
    }

    async fn export_audit(&self, job: &Job) -> Result<serde_json::Value> {
        let org = &job.org_id;
        let path = self.export_path(&job.id);
        // Sign the head first: the export covers up to it, and its checkpoint closes the file. Then one read
        // transaction for where retention cut the log and the events after it; a cut that landed between the
        // two would leave its record of the cut past the closing checkpoint, outside the file (which would then
        // fail offline as a log whose beginning was cut off), so then it starts over.
        let mut attempts = 0;
        let (closing, mut tx, retention) = loop {
            let (closing, cut) = {
                let mut work = self.write().await?;
                let cut = work.tx.retention(org).await?.deleted_upto;
                let checkpoint = self.checkpoint_head(&mut *work.tx, org).await?;
                work.commit(self).await?;
                (checkpoint, cut)
            };
            let mut tx = self.read().await?;
            let retention = tx.retention(org).await?;
            if retention.deleted_upto == cut {
                break (closing, tx, retention);
            }
            attempts += 1;
            if attempts == 3 {
                return Err(Error::Unavailable("retention kept cutting the log while the export began".into()));
            }
        };
        let opening = if retention.deleted_upto > 0 {
            Some(tx.checkpoint_at(org, retention.deleted_upto).await?.ok_or_else(|| {
                Error::Internal(format!("no checkpoint at seq {} where retention cut the log", retention.deleted_upto))
            })?)
        } else {
            None
        };
        let (events, first_seq) = self
            .write_export(&mut *tx, org, opening, retention.deleted_upto, closing.clone(), &path, Some(job))
            .await?;
        drop(tx);
        let bytes = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
        Ok(json!({
            "events": events,
            "first_seq": first_seq,
            "last_seq": closing.as_ref().map(|c| c.seq),
            "head_hash": closing.as_ref().map(|c| c.head_hash.clone()),
            "bytes": bytes,
            "download_url": format!("{}/v1/audit/exports/{}", self.public_url(), job.id),
            "public_key": self.inner.signer.public_key_base64(),
        }))
    }

    /// Writes an export to `path` (through a `.partial` file, synced, then renamed): the opening checkpoint,
    /// the events after `after` up to the closing checkpoint's seq, and the closing checkpoint. Reports
    /// progress on `job` when given. Answers how many events it wrote and the first one's seq.
    #[allow(clippy::too_many_arguments)]
    async fn write_export(
        &self,
        tx: &mut dyn StoreTx,
        org: &OrgId,
        opening: Option<Checkpoint>,
        after: i64,
        closing: Option<Checkpoint>,
        path: &std::path::Path,
        job: Option<&Job>,
    ) -> Result<(u64, Option<i64>)> {
        // A name of its own: two downloads rebuilding the same export at once each write their own file.
        let partial = PartialFile(path.with_extension(format!("jsonl.{}.partial", ulid::Ulid::generate())));
        if let Some(dir) = path.parent() {
            tokio::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .await
                .map_err(|e| Error::Internal(format!("cannot create {dir:?}: {e}")))?;
        }
        let io = |e: std::io::Error| Error::Internal(format!("cannot write the export: {e}"));
        // The org's whole log: readable by the server's user only.
        let created = tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial.0).await;
        let mut file = tokio::io::BufWriter::new(created.map_err(io)?);
        if let Some(opening) = opening {
            write_line(&mut file, &CheckpointLine { checkpoint: opening }).await?;
        }
        let upto = closing.as_ref().map_or(0, |c| c.seq);
        let (mut after, mut events, mut first_seq) = (after, 0u64, None);
        while after < upto {
            let page = tx.list_audit(org, &AuditFilter::default(), after, EXPORT_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for event in page.iter().filter(|e| e.seq <= upto) {
                first_seq.get_or_insert(event.seq);
                write_line(&mut file, event).await?;
                events += 1;
            }
            if let Some(job) = job.filter(|_| after < upto) {
                self.report_progress(job, json!({"events_written": events, "upto_seq": upto})).await?;
            }
        }
        if let Some(checkpoint) = &closing {
            write_line(&mut file, &CheckpointLine { checkpoint: checkpoint.clone() }).await?;
        }
        file.flush().await.map_err(io)?;
        file.into_inner().sync_all().await.map_err(io)?;
        tokio::fs::rename(&partial.0, path).await.map_err(io)?;
        if let Some(job) = job {
            self.report_progress(job, json!({"events_written": events, "upto_seq": upto})).await?;
        }
        Ok((events, first_seq))
    }

    /// Sets the org's retention window in days (admin); none keeps everything. Queues a run at once.
    pub async fn set_audit_retention(&self, caller: &Caller, days: Option<u32>) -> Result<Option<Job>> {
        caller.require_admin()?;
        if days.is_some_and(|d| !(1..=MAX_RETENTION_DAYS).contains(&d)) {
            return Err(Error::invalid(
                "days",
                format!("`days` must be between 1 and {MAX_RETENTION_DAYS} (100 years), or null to keep everything"),
            ));
        }
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        work.tx.set_retention_days(&org, days).await?;
        work.audit(&org, now, &caller.actor(), "audit.retention_set", Some(org.as_str()), json!({"days": days}))
            .await?;
        let job = match days {
            Some(_) => {
                let job = Job::new(org.clone(), JobKind::AuditRetention, Some(org.to_string()), json!({}), now);
                work.enqueue(&job).await?;
                Some(job)
            }
            None => None,
        };
        work.commit(self).await?;
        Ok(job)
    }

    pub async fn audit_retention(&self, caller: &Caller) -> Result<countersign_core::store::Retention> {
        caller.require_admin()?;
        Ok(self.read().await?.retention(caller.org_id()).await?)
    }

    /// Queues a retention run for every org that has a window (the hourly sweep).
    pub async fn schedule_retention(&self) -> Result<usize> {
        let now = self.now();
        let mut work = self.write().await?;
        let windows = work.tx.list_retention_windows().await?;
        for window in &windows {
            let job = Job::new(
                window.org_id.clone(),
                JobKind::AuditRetention,
                Some(window.org_id.to_string()),
                json!({}),
                now,
            );
            work.enqueue(&job).await?;
        }
        work.commit(self).await?;
        Ok(windows.len())
    }

    pub(super) async fn retention_job(&self, job: &Job) -> JobOutcome {
        match self.apply_retention(&job.org_id).await {
            Ok(result) => JobOutcome::Succeeded(result),
            Err(Error::Unavailable(e)) => JobOutcome::Retry(format!("store unavailable: {e}")),
            Err(e) => JobOutcome::Failed(e.to_string()),
        }
    }

    /// Deletes the events older than the window, behind a signed checkpoint at the last deleted seq. Never while
    /// the log fails verification: the events it would delete may be what shows the tampering, and a fresh
    /// checkpoint over a rewritten hash would launder it.
    async fn apply_retention(&self, org: &OrgId) -> Result<serde_json::Value> {
        let now = self.now();
        {
            let mut tx = self.read().await?;
            if let Err(nothing) = Self::due_cut(&mut *tx, org, now).await? {
                return Ok(nothing);
            }
            let report = self.verify_chain(&mut *tx, org).await?;
            if !report.ok {
                return Err(Error::Conflict {
                    message: format!(
                        "the audit log fails verification at seq {}: retention deletes nothing until that is \
                         explained (GET /v1/audit/verify)",
                        report.first_broken_seq.map_or_else(|| "?".to_owned(), |s| s.to_string())
                    ),
                    state: None,
                });
            }
        }
        let mut work = self.write().await?;
        let (days, upto) = match Self::due_cut(&mut *work.tx, org, now).await? {
            Ok(cut) => cut,
            Err(nothing) => return Ok(nothing),
        };
        let event = work
            .tx
            .list_audit(org, &AuditFilter::default(), upto - 1, 1)
            .await?
            .into_iter()
            .next()
            .filter(|e| e.seq == upto)
            .ok_or_else(|| Error::Internal(format!("audit event {upto} vanished")))?;
        match work.tx.checkpoint_at(org, upto).await? {
            None => {
                let checkpoint = self.inner.signer.sign(org.as_str(), upto, &event.hash, event.time_us);
                self.store_checkpoint(&mut *work.tx, org, &checkpoint).await?;
            }
            // The checkpoint the cut will stand on must vouch for it, or the log could never verify again.
            Some(stored) => {
                if !self.vouches_for(&stored, &event.hash) {
                    return Err(Error::Conflict {
                        message: format!(
                            "the stored checkpoint at seq {upto} does not vouch for the event there (another key \
                             signed it, or its hash differs): retention deletes nothing behind it"
                        ),
                        state: None,
                    });
                }
            }
        }
        let deleted = work.tx.delete_audit_prefix(org, upto).await?;
        work.audit(
            org,
            now,
            &Actor::system(),
            countersign_core::audit::RETENTION_APPLIED,
            Some(org.as_str()),
            json!({"days": days, "deleted": deleted, "upto_seq": upto, "checkpoint_seq": upto}),
        )
        .await?;
        work.commit(self).await?;
        Ok(json!({"deleted": deleted, "upto_seq": upto}))
    }

    /// What retention would delete now: its window and the last seq to delete; or, when nothing is due, the
    /// job's answer saying so.
    async fn due_cut(
        tx: &mut dyn StoreTx,
        org: &OrgId,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<std::result::Result<(u32, i64), serde_json::Value>> {
        let retention = tx.retention(org).await?;
        let Some(days) = retention.days else { return Ok(Err(json!({"deleted": 0, "reason": "no retention window"}))) };
        let cutoff = now
            .checked_sub_signed(chrono::Duration::days(i64::from(days.min(MAX_RETENTION_DAYS))))
            .ok_or_else(|| Error::Internal(format!("a retention window of {days} days is out of range")))?;
        let upto = tx.last_audit_seq_before(org, cutoff).await?.unwrap_or(0);
        if upto <= retention.deleted_upto {
            return Ok(Err(json!({"deleted": 0, "upto_seq": retention.deleted_upto})));
        }
        Ok(Ok((days, upto)))
    }

    /// Recomputes the org's chain, in pages, from the start or from the checkpoint retention left, and names
    /// the first broken seq. Every later stored checkpoint must verify with the signing key and match the
    /// recomputed hash at its seq: someone who edits an event and recomputes the (unkeyed) hashes after it
    /// keeps the chain whole, but cannot sign, so the first checkpoint past the edit names the break. A
    /// checkpoint past the last event is a break too: the events it vouched for are gone.
    pub async fn verify_audit(&self, caller: &Caller) -> Result<ChainReport> {
        caller.require_admin()?;
        let mut tx = self.read().await?;
        self.verify_chain(&mut *tx, caller.org_id()).await
    }

    /// [`Gateway::verify_audit`] in a transaction of the caller's.
    async fn verify_chain(&self, tx: &mut dyn StoreTx, org: &OrgId) -> Result<ChainReport> {
        let public_key = self.inner.signer.public_key_base64();
        let retention = tx.retention(org).await?;
        let cut = retention.deleted_upto;
        // Where the log was cut, if it was, and nothing vouches for the cut: broken there, even with no events
        // after it (an empty log after a cut is not a verified one).
        let mut bad_cut: Option<i64> = None;
        let mut verifier = if cut > 0 {
            let checkpoint = tx.checkpoint_at(org, cut).await?;
            match checkpoint {
                Some(c) if verify_checkpoint(&c, &public_key).is_ok() => {
                    ChainVerifier::starting_after(c.seq, &c.head_hash)
                }
                // Without a valid checkpoint the first remaining event cannot be vouched for.
                _ => {
                    bad_cut = Some(cut + 1);
                    ChainVerifier::starting_after(cut, "")
                }
            }
        } else {
            ChainVerifier::default()
        };
        // Retention records each cut in the log it leaves: a prefix gone without that record was cut by
        // something else (plain SQL moving the retention marker).
        let mut cut_recorded = cut == 0;
        // The first stored checkpoint that fails; events are walked in seq order, so the first found is it.
        let mut bad_checkpoint: Option<i64> = None;
        let mut after = cut;
        loop {
            let page = tx.list_audit(org, &AuditFilter::default(), after, VERIFY_PAGE).await?;
            let Some(last) = page.last() else { break };
            let upto = last.seq;
            let checkpoints = if bad_checkpoint.is_none() {
                tx.list_checkpoints(org, after, upto, VERIFY_PAGE).await?
            } else {
                vec![]
            };
            let mut checkpoints = checkpoints.into_iter().peekable();
            for event in &page {
                verifier.push(event);
                cut_recorded |= event.records_retention_upto(cut);
                while let Some(c) = checkpoints.next_if(|c| c.seq <= event.seq) {
                    let vouches =
                        c.seq == event.seq && c.head_hash == event.hash && verify_checkpoint(&c, &public_key).is_ok();
                    if !vouches {
                        bad_checkpoint.get_or_insert(c.seq);
                    }
                }
            }
            after = upto;
        }
        if bad_checkpoint.is_none()
            && let Some(c) = tx.list_checkpoints(org, after, i64::MAX, 1).await?.into_iter().next()
        {
            bad_checkpoint = Some(c.seq);
        }
        if !cut_recorded {
            bad_cut = Some(cut + 1);
        }
        let mut report = verifier.finish();
        for seq in bad_checkpoint.into_iter().chain(bad_cut) {
            report.ok = false;
            report.first_broken_seq = Some(report.first_broken_seq.map_or(seq, |broken| broken.min(seq)));
        }
        Ok(report)
    }
}

/// An export being written: removed unless it was renamed into place (a failed or abandoned write leaves
/// nothing behind on disk).
struct PartialFile(PathBuf);

impl Drop for PartialFile {
    fn drop(&mut self) {
        // After the rename there is nothing here to remove.
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn write_line<W, T>(file: &mut W, value: &T) -> Result<()>
where
    W: AsyncWriteExt + Unpin,
    T: serde::Serialize,
{
    let mut line = serde_json::to_vec(value).map_err(|e| Error::Internal(format!("cannot encode: {e}")))?;
    line.push(b'\n');
    file.write_all(&line).await.map_err(|e| Error::Internal(format!("cannot write the export: {e}")))
}
