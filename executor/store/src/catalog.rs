//! Versions, stage aliases and the promotion audit trail. Every write transaction first bumps the
//! single-row `catalog_generation` counter: that is the change feed, and on PostgreSQL its row
//! lock also serialises catalog writers, so numbering and compare-and-swap see committed state.

use serde_json::Value;

use crate::types::{
    Kind, NameSummary, NewVersion, Promotion, PromotionOutcome, PromotionRecord, StageRow,
    VersionRow, VersionState,
};
use crate::{Result, Store, StoreError, now_ms, with_pool};

/// How often a publish retries after losing a race for a version number.
const PUBLISH_ATTEMPTS: usize = 5;

const SELECT_VERSION: &str = "SELECT kind, name, number, digest, state, description, document, \
     evidence, created_by, created_at FROM versions";

type VersionTuple = (
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
);

const SELECT_PROMOTION: &str = "SELECT id, kind, name, stage, from_digest, to_digest, tenant, at, \
     outcome, reason, evidence FROM promotions";

type PromotionTuple = (
    i64,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    String,
    String,
    String,
);

const SELECT_STAGE: &str = "SELECT s.stage, s.digest, v.number, s.updated_at, s.updated_by, \
     s.generation FROM stages s JOIN versions v \
     ON v.kind = s.kind AND v.name = s.name AND v.digest = s.digest";

type StageTuple = (String, String, i64, i64, String, i64);

/// Increments the change counter inside a write transaction and returns the new value.
const BUMP_GENERATION: &str =
    "UPDATE catalog_generation SET value = value + 1 WHERE id = 1 RETURNING value";

impl Store {
    /// Publishes a version, idempotently: the same `(kind, name, digest)` again returns the
    /// stored row with `created == false` (its number, state and evidence unchanged). A new digest
    /// gets the next number of `(kind, name)` (v1, v2...), assigned in the transaction;
    /// concurrent publishes of different content all succeed with distinct numbers.
    pub async fn publish_version(&self, version: &NewVersion) -> Result<(VersionRow, bool)> {
        check_digest("digest", &version.digest)?;
        let document = version.document.to_string();
        let evidence = version.evidence.to_string();
        let mut attempt = 1;
        loop {
            match self.publish_once(version, &document, &evidence).await {
                Err(e) if e.is_unique_violation() && attempt < PUBLISH_ATTEMPTS => attempt += 1,
                other => return other.map_err(|e| self.name_err(e)),
            }
        }
    }

    async fn publish_once(
        &self,
        v: &NewVersion,
        document: &str,
        evidence: &str,
    ) -> Result<(VersionRow, bool)> {
        let kind = v.kind.as_str();
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let existing = sqlx::query_as::<_, VersionTuple>(&format!(
                "{SELECT_VERSION} WHERE kind = $1 AND name = $2 AND digest = $3"
            ))
            .bind(kind)
            .bind(&v.name)
            .bind(&v.digest)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                tx.rollback().await?;
                return Ok((version_row(row)?, false));
            }
            sqlx::query_scalar::<_, i64>(BUMP_GENERATION)
                .fetch_one(&mut *tx)
                .await?;
            let number = sqlx::query_scalar::<_, i64>(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE kind = $1 AND name = $2",
            )
            .bind(kind)
            .bind(&v.name)
            .fetch_one(&mut *tx)
            .await?;
            let created_at = now_ms();
            sqlx::query(
                "INSERT INTO versions (kind, name, number, digest, state, description, document, \
                 evidence, created_by, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(kind)
            .bind(&v.name)
            .bind(number)
            .bind(&v.digest)
            .bind(v.state.as_str())
            .bind(&v.description)
            .bind(document)
            .bind(evidence)
            .bind(&v.created_by)
            .bind(created_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            let row = VersionRow {
                kind: v.kind,
                name: v.name.clone(),
                number,
                digest: v.digest.clone(),
                state: v.state,
                description: v.description.clone(),
                document: v.document.clone(),
                evidence: v.evidence.clone(),
                created_by: v.created_by.clone(),
                created_at,
            };
            Ok((row, true))
        })
    }

    /// The version of `(kind, name)` with this digest (64 hex digits, no `sha256:` prefix).
    pub async fn get_version_by_digest(
        &self,
        kind: Kind,
        name: &str,
        digest: &str,
    ) -> Result<Option<VersionRow>> {
        let sql = format!("{SELECT_VERSION} WHERE kind = $1 AND name = $2 AND digest = $3");
        let r: Result<Option<VersionRow>> = async {
            let row = with_pool!(self, |pool, _begin| {
                sqlx::query_as::<_, VersionTuple>(&sql)
                    .bind(kind.as_str())
                    .bind(name)
                    .bind(digest)
                    .fetch_optional(pool)
                    .await?
            });
            row.map(version_row).transpose()
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }

    /// Version `vN` of `(kind, name)`.
    pub async fn get_version_by_number(
        &self,
        kind: Kind,
        name: &str,
        number: i64,
    ) -> Result<Option<VersionRow>> {
        let sql = format!("{SELECT_VERSION} WHERE kind = $1 AND name = $2 AND number = $3");
        let r: Result<Option<VersionRow>> = async {
            let row = with_pool!(self, |pool, _begin| {
                sqlx::query_as::<_, VersionTuple>(&sql)
                    .bind(kind.as_str())
                    .bind(name)
                    .bind(number)
                    .fetch_optional(pool)
                    .await?
            });
            row.map(version_row).transpose()
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }

    /// The verified version of `(kind, name)` with the highest number: what a bare `NAME` means.
    pub async fn latest_verified(&self, kind: Kind, name: &str) -> Result<Option<VersionRow>> {
        let sql = format!(
            "{SELECT_VERSION} WHERE kind = $1 AND name = $2 AND state = 'verified' \
             ORDER BY number DESC LIMIT 1"
        );
        let r: Result<Option<VersionRow>> = async {
            let row = with_pool!(self, |pool, _begin| {
                sqlx::query_as::<_, VersionTuple>(&sql)
                    .bind(kind.as_str())
                    .bind(name)
                    .fetch_optional(pool)
                    .await?
            });
            row.map(version_row).transpose()
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }

    /// Every version of `(kind, name)`, oldest (v1) first; empty for an unknown name.
    pub async fn list_versions(&self, kind: Kind, name: &str) -> Result<Vec<VersionRow>> {
        let sql = format!("{SELECT_VERSION} WHERE kind = $1 AND name = $2 ORDER BY number");
        let r: Result<Vec<VersionRow>> = async {
            let rows = with_pool!(self, |pool, _begin| {
                sqlx::query_as::<_, VersionTuple>(&sql)
                    .bind(kind.as_str())
                    .bind(name)
                    .fetch_all(pool)
                    .await?
            });
            rows.into_iter().map(version_row).collect()
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }

    /// The names of one kind, sorted, each with its newest version. `filter` keeps names whose
    /// name or newest description contains it (case-insensitive, ASCII).
    pub async fn list_names(&self, kind: Kind, filter: Option<&str>) -> Result<Vec<NameSummary>> {
        let pattern = match filter {
            Some(f) => format!("%{}%", escape_like(&f.to_ascii_lowercase())),
            None => "%".to_string(),
        };
        let sql = "SELECT v.name, v.number, v.digest, v.state, v.description, v.created_at, c.n \
             FROM versions v JOIN (SELECT name, MAX(number) AS latest, COUNT(*) AS n \
             FROM versions WHERE kind = $1 GROUP BY name) c \
             ON v.name = c.name AND v.number = c.latest \
             WHERE v.kind = $1 AND (LOWER(v.name) LIKE $2 ESCAPE '\\' \
             OR LOWER(v.description) LIKE $2 ESCAPE '\\') ORDER BY v.name";
        type Tuple = (String, i64, String, String, String, i64, i64);
        let r: Result<Vec<NameSummary>> = async {
            let rows = with_pool!(self, |pool, _begin| {
                sqlx::query_as::<_, Tuple>(sql)
                    .bind(kind.as_str())
                    .bind(&pattern)
                    .fetch_all(pool)
                    .await?
            });
            rows.into_iter()
                .map(|(name, number, digest, state, description, at, n)| {
                    Ok(NameSummary {
                        latest_state: parse_state(&state, &name, number)?,
                        name,
                        latest_number: number,
                        latest_digest: digest,
                        description,
                        updated_at: at,
                        versions: n,
                    })
                })
                .collect()
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }

    /// Where `stage` of `(kind, name)` points, or None when it was never promoted.
    pub async fn get_stage(&self, kind: Kind, name: &str, stage: &str) -> Result<Option<StageRow>> {
        let sql = format!("{SELECT_STAGE} WHERE s.kind = $1 AND s.name = $2 AND s.stage = $3");
        let row = with_pool!(self, |pool, _begin| {
            sqlx::query_as::<_, StageTuple>(&sql)
                .bind(kind.as_str())
                .bind(name)
                .bind(stage)
                .fetch_optional(pool)
                .await
        });
        row.map(|r| r.map(stage_row))
            .map_err(|e| self.name_err(e.into()))
    }

    /// Every set stage of `(kind, name)`, sorted by stage name.
    pub async fn list_stages(&self, kind: Kind, name: &str) -> Result<Vec<StageRow>> {
        let sql = format!("{SELECT_STAGE} WHERE s.kind = $1 AND s.name = $2 ORDER BY s.stage");
        let rows = with_pool!(self, |pool, _begin| {
            sqlx::query_as::<_, StageTuple>(&sql)
                .bind(kind.as_str())
                .bind(name)
                .fetch_all(pool)
                .await
        });
        rows.map(|r| r.into_iter().map(stage_row).collect())
            .map_err(|e| self.name_err(e.into()))
    }

    /// Records a promotion attempt and, when it is accepted, moves the stage alias if it still
    /// points at `expected_current` (compare-and-swap), all in one transaction. Exactly one audit
    /// record is written whatever happens: accepted ([`PromotionOutcome::Promoted`]), refused by
    /// the caller ([`PromotionOutcome::Refused`]) or refused because the stage moved meanwhile
    /// ([`PromotionOutcome::Conflict`], reason "stage moved concurrently from X to Y"). Of two
    /// concurrent promotions from the same expected state exactly one wins.
    ///
    /// `to_digest` must name an existing version of `(kind, name)`, else
    /// [`StoreError::NotFound`] and nothing is written. The store does not judge versions
    /// (unverified ones, stage order): that is the caller's gate.
    pub async fn promote(&self, p: &Promotion) -> Result<PromotionOutcome> {
        check_digest("to_digest", &p.to_digest)?;
        if let Some(expected) = &p.expected_current {
            check_digest("expected_current", expected)?;
        }
        let evidence = p.evidence.to_string();
        let kind = p.kind.as_str();
        let r: Result<PromotionOutcome> = async {
            with_pool!(self, |pool, begin| {
                let mut tx = pool.begin_with(begin).await?;
                let generation = sqlx::query_scalar::<_, i64>(BUMP_GENERATION)
                    .fetch_one(&mut *tx)
                    .await?;
                let exists = sqlx::query_scalar::<_, i64>(
                    "SELECT number FROM versions WHERE kind = $1 AND name = $2 AND digest = $3",
                )
                .bind(kind)
                .bind(&p.name)
                .bind(&p.to_digest)
                .fetch_optional(&mut *tx)
                .await?;
                if exists.is_none() {
                    tx.rollback().await?;
                    return Err(StoreError::NotFound {
                        what: format!("{kind} `{}` version sha256:{}", p.name, p.to_digest),
                    });
                }
                let current_sql =
                    "SELECT digest FROM stages WHERE kind = $1 AND name = $2 AND stage = $3";
                let mut current = sqlx::query_scalar::<_, String>(current_sql)
                    .bind(kind)
                    .bind(&p.name)
                    .bind(&p.stage)
                    .fetch_optional(&mut *tx)
                    .await?;
                let at = now_ms();
                let mut conflict = false;
                let mut accepted = false;
                if p.accepted {
                    if current == p.expected_current {
                        let moved = match &p.expected_current {
                            Some(expected) => sqlx::query(
                                "UPDATE stages SET digest = $4, updated_at = $5, \
                                 updated_by = $6, generation = $7 \
                                 WHERE kind = $1 AND name = $2 AND stage = $3 AND digest = $8",
                            )
                            .bind(kind)
                            .bind(&p.name)
                            .bind(&p.stage)
                            .bind(&p.to_digest)
                            .bind(at)
                            .bind(&p.tenant)
                            .bind(generation)
                            .bind(expected)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected(),
                            None => sqlx::query(
                                "INSERT INTO stages (kind, name, stage, digest, updated_at, \
                                 updated_by, generation) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                                 ON CONFLICT (kind, name, stage) DO NOTHING",
                            )
                            .bind(kind)
                            .bind(&p.name)
                            .bind(&p.stage)
                            .bind(&p.to_digest)
                            .bind(at)
                            .bind(&p.tenant)
                            .bind(generation)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected(),
                        };
                        accepted = moved == 1;
                    }
                    if !accepted {
                        // Only reachable without the write lock serialising us; re-read so the
                        // reason names the real current value.
                        current = sqlx::query_scalar::<_, String>(current_sql)
                            .bind(kind)
                            .bind(&p.name)
                            .bind(&p.stage)
                            .fetch_optional(&mut *tx)
                            .await?;
                        conflict = true;
                    }
                }
                let reason = if conflict {
                    format!(
                        "stage moved concurrently from {} to {}",
                        show_digest(p.expected_current.as_deref()),
                        show_digest(current.as_deref())
                    )
                } else {
                    p.reason.clone()
                };
                let id = sqlx::query_scalar::<_, i64>(
                    "INSERT INTO promotions (kind, name, stage, from_digest, to_digest, tenant, \
                     at, outcome, reason, evidence) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                )
                .bind(kind)
                .bind(&p.name)
                .bind(&p.stage)
                .bind(current.as_deref())
                .bind(&p.to_digest)
                .bind(&p.tenant)
                .bind(at)
                .bind(if accepted { "accepted" } else { "refused" })
                .bind(&reason)
                .bind(&evidence)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                let record = PromotionRecord {
                    id,
                    kind: p.kind,
                    name: p.name.clone(),
                    stage: p.stage.clone(),
                    from_digest: current.clone(),
                    to_digest: p.to_digest.clone(),
                    tenant: p.tenant.clone(),
                    at,
                    accepted,
                    reason,
                    evidence: p.evidence.clone(),
                };
                Ok(if accepted {
                    PromotionOutcome::Promoted(record)
                } else if conflict {
                    PromotionOutcome::Conflict { record, current }
                } else {
                    PromotionOutcome::Refused(record)
                })
            })
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }

    /// The audit trail of `(kind, name)`, newest first, at most `limit` records.
    pub async fn list_promotions(
        &self,
        kind: Kind,
        name: &str,
        limit: u32,
    ) -> Result<Vec<PromotionRecord>> {
        let sql =
            format!("{SELECT_PROMOTION} WHERE kind = $1 AND name = $2 ORDER BY id DESC LIMIT $3");
        let r: Result<Vec<PromotionRecord>> = async {
            let rows = with_pool!(self, |pool, _begin| {
                sqlx::query_as::<_, PromotionTuple>(&sql)
                    .bind(kind.as_str())
                    .bind(name)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?
            });
            rows.into_iter().map(promotion_record).collect()
        }
        .await;
        r.map_err(|e| self.name_err(e))
    }
}

/// Refuses anything but 64 lowercase hex digits.
fn check_digest(field: &'static str, digest: &str) -> Result<()> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument {
            field,
            reason: format!("`{digest}` is not 64 lowercase hex digits (sha256, no prefix)"),
        })
    }
}

fn show_digest(digest: Option<&str>) -> String {
    match digest {
        Some(d) => format!("sha256:{d}"),
        None => "(unset)".to_string(),
    }
}

/// Escapes `%`, `_` and `\` for `LIKE ... ESCAPE '\'`.
fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn corrupt(what: String, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        database: String::new(),
        what,
        reason: reason.to_string(),
    }
}

fn parse_kind(kind: &str) -> Result<Kind> {
    kind.parse()
        .map_err(|_| corrupt("kind".into(), format!("unknown kind `{kind}`")))
}

fn parse_state(state: &str, name: &str, number: i64) -> Result<VersionState> {
    VersionState::parse(state).ok_or_else(|| {
        corrupt(
            format!("state of `{name}` v{number}"),
            format!("unknown state `{state}`"),
        )
    })
}

fn parse_json(text: &str, what: impl FnOnce() -> String) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| corrupt(what(), e))
}

fn version_row(t: VersionTuple) -> Result<VersionRow> {
    let (kind, name, number, digest, state, description, document, evidence, created_by, at) = t;
    Ok(VersionRow {
        kind: parse_kind(&kind)?,
        state: parse_state(&state, &name, number)?,
        document: parse_json(&document, || format!("document of `{name}` v{number}"))?,
        evidence: parse_json(&evidence, || format!("evidence of `{name}` v{number}"))?,
        name,
        number,
        digest,
        description,
        created_by,
        created_at: at,
    })
}

fn stage_row(t: StageTuple) -> StageRow {
    let (stage, digest, number, updated_at, updated_by, generation) = t;
    StageRow {
        stage,
        digest,
        number,
        updated_at,
        updated_by,
        generation,
    }
}

fn promotion_record(t: PromotionTuple) -> Result<PromotionRecord> {
    let (id, kind, name, stage, from_digest, to_digest, tenant, at, outcome, reason, evidence) = t;
    Ok(PromotionRecord {
        id,
        kind: parse_kind(&kind)?,
        evidence: parse_json(&evidence, || format!("evidence of promotion {id}"))?,
        name,
        stage,
        from_digest,
        to_digest,
        tenant,
        at,
        accepted: outcome == "accepted",
        reason,
    })
}
