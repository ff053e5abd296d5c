//! Recent runs, per tenant: what `GetRun` and `ListRuns` answer.
//!
//! Each tenant's history is its own bounded list (the newest `per_tenant` runs), so a busy tenant
//! never pushes out another's, and a lookup only ever searches the caller's own list: another
//! tenant's run is indistinguishable from one that never existed. Records hold how a run ended
//! and its manifest, not its stdout, stderr or files. History lives in this process's memory:
//! each replica knows only the runs it ran.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use super::{StepService, tenant_of, traced};
use crate::service::convert::bad;
use crate::service::telemetry::rpc_span;

use crate::pb;

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
        let size = match page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is more than {MAX_PAGE_SIZE}; ask for 1 to {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})"
                )));
            }
        };
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
            let record = self.history.get(&tenant.name, &run_id).ok_or_else(|| {
                Status::not_found(format!(
                    "run_id: no run {run_id:?} among this tenant's recent runs on this server"
                ))
            })?;
            Ok(Response::new(pb::RunRecord::clone(&record)))
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
                .list(&tenant.name, req.page_size, &req.page_token, status)?;
            Ok(Response::new(pb::ListRunsResponse {
                runs: page.runs.iter().map(|r| pb::RunRecord::clone(r)).collect(),
                next_page_token: page.next_page_token,
            }))
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
