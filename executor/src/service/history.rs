//! Recent runs, per tenant: what `GetRun` and `ListRuns` answer.
//!
//! Each tenant's history is its own bounded list (the newest `per_tenant` runs), so a busy tenant
//! never pushes out another's, and a lookup only ever searches the caller's own list: another
//! tenant's run is indistinguishable from one that never existed. Records hold how a run ended
//! and its manifest, not its stdout, stderr or files.
//!
//! Two homes ([`History`]): this process's memory ([`RunHistory`], the default: each replica
//! knows only the runs it ran), or, when `[catalog] database` is configured, the catalog
//! store's run table ([`SharedHistory`]), so a run is found on any replica. The store is bounded
//! by count per tenant and by age, pruned at start and every [`PRUNE_INTERVAL`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tonic::{Request, Response, Status};

use super::{StepService, tenant_of, traced};
use crate::service::catalog::CatalogHandle;
use crate::service::catalog_convert::catalog_status;
use crate::service::convert::bad;
use crate::service::telemetry::rpc_span;

use crate::pb;

/// How often the shared history is pruned to its bounds.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// The longest a run waits for its record to reach the shared store before it answers; past
/// it, the write finishes in the background (a slow database never slows runs down by more).
const RECORD_WAIT: Duration = Duration::from_millis(500);

/// Bounds of the shared run history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Newest runs kept per tenant (0: none are stored).
    pub per_tenant: usize,
    /// Runs older than this are dropped.
    pub max_age: Duration,
}

/// Where finished runs are kept.
#[derive(Debug)]
pub enum History {
    /// This process's memory.
    Memory(RunHistory),
    /// The catalog store, shared by replicas.
    Shared(SharedHistory),
}

/// The run history in the catalog store: one row per run holding the encoded [`pb::RunRecord`].
#[derive(Debug)]
pub struct SharedHistory {
    catalog: Arc<CatalogHandle>,
    retention: Retention,
}

/// Page tokens of the shared history: the run id of a page's last run (the store's position of
/// a run spans all tenants, so it is never shown: a token reveals nothing a tenant did not see).
const SHARED_TOKEN_PREFIX: &str = "s1.";

impl SharedHistory {
    /// The history in `catalog`'s store, kept within `retention`.
    pub fn new(catalog: Arc<CatalogHandle>, retention: Retention) -> SharedHistory {
        SharedHistory { catalog, retention }
    }

    async fn store(&self) -> Result<stepbox_store::Store, Status> {
        self.catalog
            .get()
            .await
            .map(|c| c.store().clone())
            .map_err(|e| catalog_status(e, ""))
    }

    async fn record(&self, tenant: &str, record: pb::RunRecord) {
        if self.retention.per_tenant == 0 {
            return;
        }
        let store = match self.store().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e.message(), run_id = %record.run_id, "run not recorded in the shared history");
                return;
            }
        };
        let tenant = tenant.to_string();
        let created_at = record.submitted_at.as_ref().map_or(0, |t| {
            t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000)
        });
        let status = pb::Status::try_from(record.status)
            .unwrap_or(pb::Status::Unspecified)
            .as_str_name();
        let write = tokio::spawn(async move {
            let bytes = record.encode_to_vec();
            if let Err(e) = store
                .record_run(&tenant, &record.run_id, created_at, status, &bytes)
                .await
            {
                tracing::warn!(error = %e, run_id = %record.run_id, "run not recorded in the shared history");
            }
        });
        let _ = tokio::time::timeout(RECORD_WAIT, write).await;
    }

    async fn get(&self, tenant: &str, run_id: &str) -> Result<Option<pb::RunRecord>, Status> {
        let store = self.store().await?;
        let entry = store
            .get_run(tenant, run_id)
            .await
            .map_err(|e| catalog_status(e.into(), ""))?;
        entry
            .map(|e| {
                pb::RunRecord::decode(e.record.as_slice()).map_err(|d| {
                    Status::internal(format!("stored run {run_id} cannot be read: {d}"))
                })
            })
            .transpose()
    }

    async fn list(
        &self,
        tenant: &str,
        page_size: u32,
        page_token: &str,
        status: Option<pb::Status>,
    ) -> Result<pb::ListRunsResponse, Status> {
        let size = page_size_of(page_size)?;
        let after_run = if page_token.is_empty() {
            None
        } else {
            Some(
                page_token
                    .strip_prefix(SHARED_TOKEN_PREFIX)
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| bad_token(page_token))?,
            )
        };
        let store = self.store().await?;
        let unavailable = |e: stepbox_store::StoreError| catalog_status(e.into(), "");
        let after_seq = match after_run {
            None => None,
            // The page's last run has been pruned since: so has everything older of this
            // tenant (pruning drops the oldest first), and the listing is over.
            Some(id) => match store.get_run(tenant, id).await.map_err(unavailable)? {
                Some(e) => Some(e.seq),
                None => {
                    return Ok(pb::ListRunsResponse::default());
                }
            },
        };
        let page = store
            .list_runs(
                tenant,
                status.map(|s| s.as_str_name()),
                size as u32,
                after_seq,
            )
            .await
            .map_err(unavailable)?;
        let next_page_token = match (page.next_after_seq, page.runs.last()) {
            (Some(_), Some(last)) => format!("{SHARED_TOKEN_PREFIX}{}", last.run_id),
            _ => String::new(),
        };
        let runs = page
            .runs
            .iter()
            .map(|e| {
                pb::RunRecord::decode(e.record.as_slice()).map_err(|d| {
                    Status::internal(format!("stored run {} cannot be read: {d}", e.run_id))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(pb::ListRunsResponse {
            runs,
            next_page_token,
        })
    }

    /// Drops runs past the bounds; called at start and every [`PRUNE_INTERVAL`]. Skipped while
    /// the database is down.
    pub async fn prune(&self) {
        let Ok(catalog) = self.catalog.get().await else {
            return;
        };
        let started = std::time::Instant::now();
        match catalog
            .store()
            .prune_runs(self.retention.per_tenant as u64, self.retention.max_age)
            .await
        {
            Ok(n) => tracing::debug!(deleted = n, took = ?started.elapsed(), "run history pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning the shared run history failed"),
        }
    }
}

impl History {
    /// Remembers a finished run of `tenant`.
    pub async fn record(&self, tenant: &str, record: pb::RunRecord) {
        match self {
            History::Memory(h) => h.record(tenant, record),
            History::Shared(h) => h.record(tenant, record).await,
        }
    }

    async fn get(&self, tenant: &str, run_id: &str) -> Result<Option<pb::RunRecord>, Status> {
        match self {
            History::Memory(h) => Ok(h.get(tenant, run_id).map(|r| pb::RunRecord::clone(&r))),
            History::Shared(h) => h.get(tenant, run_id).await,
        }
    }

    async fn list(
        &self,
        tenant: &str,
        page_size: u32,
        page_token: &str,
        status: Option<pb::Status>,
    ) -> Result<pb::ListRunsResponse, Status> {
        match self {
            History::Memory(h) => {
                let page = h.list(tenant, page_size, page_token, status)?;
                Ok(pb::ListRunsResponse {
                    runs: page.runs.iter().map(|r| pb::RunRecord::clone(r)).collect(),
                    next_page_token: page.next_page_token,
                })
            }
            History::Shared(h) => h.list(tenant, page_size, page_token, status).await,
        }
    }
}

/// The page size a request asks for (0: the default), or `INVALID_ARGUMENT`.
fn page_size_of(page_size: u32) -> Result<usize, Status> {
    match page_size as usize {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "page_size: {n} is more than {MAX_PAGE_SIZE}; ask for 1 to {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})"
        ))),
    }
}

/// Runs per page when the request leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page.
pub const MAX_PAGE_SIZE: usize = 500;

/// The bounded, per-tenant run history.
#[derive(Debug)]
pub struct RunHistory {
    per_tenant: usize,
    tenants: Mutex<HashMap<String, TenantRuns>>,
}

#[derive(Debug, Default)]
struct TenantRuns {
    /// Increases with each of this tenant's runs; page tokens name a position by it (per tenant,
    /// so a token says nothing about other tenants' activity).
    next_seq: u64,
    /// Oldest first.
    order: VecDeque<(u64, Arc<pb::RunRecord>)>,
    by_id: HashMap<String, Arc<pb::RunRecord>>,
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    /// Newest first.
    pub runs: Vec<Arc<pb::RunRecord>>,
    /// Empty on the last page.
    pub next_page_token: String,
}

const TOKEN_PREFIX: &str = "r1.";

fn bad_token(token: &str) -> Status {
    Status::invalid_argument(format!(
        "page_token: {token:?} is not a token this server gave; pass the next_page_token of the \
         previous ListRuns page, or leave it empty for the first page"
    ))
}

impl RunHistory {
    /// Keeps the newest `per_tenant` runs of each tenant (0: none).
    pub fn new(per_tenant: usize) -> RunHistory {
        RunHistory {
            per_tenant,
            tenants: Mutex::default(),
        }
    }

    /// Remembers a finished run of `tenant`.
    pub fn record(&self, tenant: &str, record: pb::RunRecord) {
        if self.per_tenant == 0 {
            return;
        }
        let record = Arc::new(record);
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let runs = tenants.entry(tenant.to_string()).or_default();
        let seq = runs.next_seq;
        runs.next_seq += 1;
        runs.by_id.insert(record.run_id.clone(), record.clone());
        runs.order.push_back((seq, record));
        while runs.order.len() > self.per_tenant {
            if let Some((_, old)) = runs.order.pop_front() {
                runs.by_id.remove(&old.run_id);
            }
        }
    }

    /// `tenant`'s run `run_id`, if it is still in the history.
    pub fn get(&self, tenant: &str, run_id: &str) -> Option<Arc<pb::RunRecord>> {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.get(tenant)?.by_id.get(run_id).cloned()
    }

    /// A page of `tenant`'s runs, newest first, optionally only those with `status`.
    pub fn list(
        &self,
        tenant: &str,
        page_size: u32,
        page_token: &str,
        status: Option<pb::Status>,
    ) -> Result<Page, Status> {
        let size = page_size_of(page_size)?;
        // Runs older than (below) `before` are on this page.
        let before = if page_token.is_empty() {
            u64::MAX
        } else {
            page_token
                .strip_prefix(TOKEN_PREFIX)
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| bad_token(page_token))?
        };
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let runs = tenants.get(tenant);
        if before != u64::MAX && before >= runs.map_or(0, |r| r.next_seq) {
            return Err(bad_token(page_token));
        }
        let Some(runs) = runs else {
            return Ok(Page {
                runs: Vec::new(),
                next_page_token: String::new(),
            });
        };
        let mut matching = runs
            .order
            .iter()
            .rev()
            .filter(|(seq, _)| *seq < before)
            .filter(|(_, r)| status.is_none_or(|s| r.status == s as i32));
        let page: Vec<_> = matching.by_ref().take(size).collect();
        let next_page_token = match (matching.next(), page.last()) {
            (Some(_), Some((seq, _))) => format!("{TOKEN_PREFIX}{seq}"),
            _ => String::new(),
        };
        Ok(Page {
            runs: page.into_iter().map(|(_, r)| r.clone()).collect(),
            next_page_token,
        })
    }
}

impl StepService {
    pub(super) async fn rpc_get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunRecord>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span("GetRun", request.metadata(), &tenant.name);
        let run_id = request.into_inner().run_id;
        traced(span, async {
            if run_id.is_empty() {
                return Err(bad(
                    "run_id",
                    "is empty; pass the run_id of a RunStepResponse",
                ));
            }
            let where_ = match self.history.as_ref() {
                History::Memory(_) => "on this server",
                History::Shared(_) => "in the shared history",
            };
            let record = self
                .history
                .get(&tenant.name, &run_id)
                .await?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "run_id: no run {run_id:?} among this tenant's recent runs {where_}"
                    ))
                })?;
            Ok(Response::new(record))
        })
        .await
    }

    pub(super) async fn rpc_list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span("ListRuns", request.metadata(), &tenant.name);
        let req = request.into_inner();
        traced(span, async {
            let status = match pb::Status::try_from(req.status) {
                Ok(pb::Status::Unspecified) => None,
                Ok(s) => Some(s),
                Err(_) => {
                    return Err(bad(
                        "status",
                        format!(
                            "{} is not a Status; pass STATUS_UNSPECIFIED (0) for all runs or one of STATUS_SUCCEEDED (1) to STATUS_CHECKS_FAILED (8)",
                            req.status
                        ),
                    ));
                }
            };
            let page = self
                .history
                .list(&tenant.name, req.page_size, &req.page_token, status)
                .await?;
            Ok(Response::new(page))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, status: pb::Status) -> pb::RunRecord {
        pb::RunRecord {
            run_id: id.into(),
            status: status as i32,
            ..Default::default()
        }
    }

    fn ids(p: &Page) -> Vec<&str> {
        p.runs.iter().map(|r| r.run_id.as_str()).collect()
    }

    #[test]
    fn a_tenant_sees_only_its_own_runs() {
        let h = RunHistory::new(10);
        h.record("acme", run("a1", pb::Status::Succeeded));
        h.record("globex", run("g1", pb::Status::Failed));
        assert!(h.get("acme", "a1").is_some());
        assert!(h.get("globex", "a1").is_none());
        assert!(h.get("initech", "a1").is_none());
        assert_eq!(ids(&h.list("globex", 0, "", None).unwrap()), ["g1"]);
        assert!(h.list("initech", 0, "", None).unwrap().runs.is_empty());
    }

    #[test]
    fn history_is_bounded_per_tenant() {
        let h = RunHistory::new(3);
        for i in 0..5 {
            h.record("busy", run(&format!("b{i}"), pb::Status::Succeeded));
        }
        h.record("quiet", run("q0", pb::Status::Succeeded));
        assert_eq!(
            ids(&h.list("busy", 0, "", None).unwrap()),
            ["b4", "b3", "b2"]
        );
        assert!(h.get("busy", "b1").is_none());
        assert!(h.get("quiet", "q0").is_some());
        let none = RunHistory::new(0);
        none.record("t", run("x", pb::Status::Succeeded));
        assert!(none.get("t", "x").is_none());
    }

    #[test]
    fn pages_are_newest_first_and_filter_by_status() {
        let h = RunHistory::new(100);
        for i in 0..7 {
            let s = if i % 2 == 0 {
                pb::Status::Succeeded
            } else {
                pb::Status::TimedOut
            };
            h.record("t", run(&format!("r{i}"), s));
        }
        let p1 = h.list("t", 3, "", None).unwrap();
        assert_eq!(ids(&p1), ["r6", "r5", "r4"]);
        let p2 = h.list("t", 3, &p1.next_page_token, None).unwrap();
        assert_eq!(ids(&p2), ["r3", "r2", "r1"]);
        let p3 = h.list("t", 3, &p2.next_page_token, None).unwrap();
        assert_eq!(ids(&p3), ["r0"]);
        assert!(p3.next_page_token.is_empty());
        // Exactly one page: no token.
        assert!(h.list("t", 7, "", None).unwrap().next_page_token.is_empty());
        let timed_out = h.list("t", 0, "", Some(pb::Status::TimedOut)).unwrap();
        assert_eq!(ids(&timed_out), ["r5", "r3", "r1"]);
        // New runs do not shift a page already handed out.
        h.record("t", run("r7", pb::Status::Succeeded));
        assert_eq!(
            ids(&h.list("t", 3, &p1.next_page_token, None).unwrap()),
            ["r3", "r2", "r1"]
        );
    }

    #[test]
    fn bad_pages_are_named() {
        let h = RunHistory::new(10);
        h.record("t", run("r0", pb::Status::Succeeded));
        h.record("t", run("r1", pb::Status::Succeeded));
        let token = h.list("t", 1, "", None).unwrap().next_page_token;
        assert_eq!(ids(&h.list("t", 1, &token, None).unwrap()), ["r0"]);
        // Positions are per tenant: another tenant's token means nothing here.
        let e = h.list("u", 1, &token, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        for (size, token, wanted) in [
            (501, "", "page_size: 501 is more than 500"),
            (0, "garbage", "page_token: \"garbage\" is not a token"),
            (0, "r1.99", "page_token: \"r1.99\" is not a token"),
            (0, "r1.-1", "page_token"),
        ] {
            let e = h.list("t", size, token, None).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(wanted), "{}", e.message());
        }
    }
}
