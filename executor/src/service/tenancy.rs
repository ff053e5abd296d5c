//! Tenants: bearer tokens (stored as sha256) map to tenants, each with the policies it may use, a
//! concurrency quota, a rate limit, what it may do with the step catalog (`run`, `publish`,
//! `promote`; default `run`) and which published steps it may see (name patterns; default all).
//!
//! Without tenants every caller is the anonymous tenant `local`, which may do anything (the config
//! refuses that on a non-loopback address unless told otherwise). Errors: no or unknown token →
//! `UNAUTHENTICATED`; a policy or catalog action the tenant may not use → `PERMISSION_DENIED`; a
//! step it may not see → `NOT_FOUND` (worded like a step that does not exist); over quota or rate
//! → `RESOURCE_EXHAUSTED`, with a `google.rpc.RetryInfo` detail saying when to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::metadata::MetadataMap;
use tonic_types::{ErrorDetails, StatusExt};

use crate::service::config::{CatalogPermission, TenantConfig};

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes one token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// One tenant.
#[derive(Debug)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    policies: Vec<String>,
    slots: Option<Arc<Semaphore>>,
    quota: usize,
    bucket: Option<Mutex<Bucket>>,
    catalog: Vec<CatalogPermission>,
    /// Step name patterns it may see (`*` matches any run of characters); empty: all.
    steps: Vec<String>,
}

/// Holds one of a tenant's concurrent slots.
#[derive(Debug)]
pub struct TenantTicket(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Tenant {
    fn anonymous() -> Tenant {
        Tenant {
            name: "local".into(),
            policies: Vec::new(),
            slots: None,
            quota: 0,
            bucket: None,
            catalog: vec![
                CatalogPermission::Run,
                CatalogPermission::Publish,
                CatalogPermission::Promote,
            ],
            steps: Vec::new(),
        }
    }

    /// Whether the tenant may `permission` published steps.
    pub fn may(&self, permission: CatalogPermission) -> bool {
        self.catalog.contains(&permission)
    }

    /// Refuses a catalog action the tenant may not take (`PERMISSION_DENIED`).
    pub fn require(&self, permission: CatalogPermission) -> Result<(), Status> {
        if self.may(permission) {
            return Ok(());
        }
        let (key, what) = match permission {
            CatalogPermission::Run => ("run", "run published steps"),
            CatalogPermission::Publish => ("publish", "publish steps"),
            CatalogPermission::Promote => ("promote", "promote steps"),
        };
        Err(Status::permission_denied(format!(
            "tenant `{}` may not {what}: its `catalog` permissions do not include `{key}`",
            self.name
        )))
    }

    /// Whether the tenant may see the published step `name` (its `steps` patterns).
    pub fn may_see(&self, name: &str) -> bool {
        self.steps.is_empty() || self.steps.iter().any(|p| glob_match(p, name))
    }

    /// Refuses a policy the tenant may not use.
    pub fn check_policy(&self, policy: &str) -> Result<(), Status> {
        let name = if policy.is_empty() {
            crate::job::policy::DEFAULT_POLICY
        } else {
            policy
        };
        if self.policies.is_empty() || self.policies.iter().any(|p| p == name) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "tenant `{}` may not use policy `{name}` (allowed: {})",
                self.name,
                self.policies.join(", ")
            )))
        }
    }

    /// Applies the rate limit, then takes a concurrency slot.
    pub fn admit(&self) -> Result<TenantTicket, Status> {
        if let Some(bucket) = &self.bucket {
            let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(wait) = b.take() {
                return Err(Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "tenant `{}` is over its rate limit of {} requests/s; retry in {} ms",
                        self.name,
                        b.rate,
                        wait.as_millis().max(1)
                    ),
                    ErrorDetails::with_retry_info(Some(wait)),
                ));
            }
        }
        match &self.slots {
            None => Ok(TenantTicket(None)),
            Some(s) => s.clone().try_acquire_owned().map(|p| TenantTicket(Some(p))).map_err(|_| {
                Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    format!("tenant `{}` already runs its quota of {} jobs; retry when one finishes", self.name, self.quota),
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(100))),
                )
            }),
        }
    }
}

/// Every tenant, by token hash.
#[derive(Debug)]
pub struct Tenants {
    by_token: HashMap<String, Arc<Tenant>>,
    anonymous: Option<Arc<Tenant>>,
}

impl Default for Tenants {
    fn default() -> Self {
        Tenants {
            by_token: HashMap::new(),
            anonymous: Some(Arc::new(Tenant::anonymous())),
        }
    }
}

impl Tenants {
    /// Builds the tenants; token files are read (and hashed) now.
    pub fn from_config(configs: &[TenantConfig]) -> anyhow::Result<Tenants> {
        if configs.is_empty() {
            return Ok(Tenants::default());
        }
        let mut by_token = HashMap::new();
        for c in configs {
            let tenant = Arc::new(Tenant {
                name: c.name.clone(),
                policies: c.policies.clone(),
                slots: (c.concurrency > 0).then(|| Arc::new(Semaphore::new(c.concurrency))),
                quota: c.concurrency,
                bucket: (c.rate_per_second > 0.0).then(|| {
                    let capacity = f64::from(c.burst.unwrap_or(0))
                        .max(c.rate_per_second)
                        .max(1.0);
                    Mutex::new(Bucket {
                        rate: c.rate_per_second,
                        capacity,
                        tokens: capacity,
                        last: Instant::now(),
                    })
                }),
                catalog: c.catalog.clone(),
                steps: c.steps.clone(),
            });
            let mut hashes: Vec<String> = c.tokens.iter().map(|t| t.to_ascii_lowercase()).collect();
            if let Some(file) = &c.tokens_file {
                let text = std::fs::read_to_string(file).with_context(|| {
                    format!(
                        "tenant `{}`: failed to read tokens_file `{}`",
                        c.name,
                        file.display()
                    )
                })?;
                hashes.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(crate::service::config::hash_token),
                );
            }
            for h in hashes {
                if let Some(other) = by_token.insert(h, tenant.clone()) {
                    anyhow::bail!(
                        "tenants `{}` and `{}` share a token: each token must name one tenant",
                        other.name,
                        c.name
                    );
                }
            }
        }
        Ok(Tenants {
            by_token,
            anonymous: None,
        })
    }

    /// Whether calls must authenticate.
    pub fn required(&self) -> bool {
        self.anonymous.is_none()
    }

    /// The tenant the request's `authorization: Bearer <token>` names.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Tenant>, Status> {
        if let Some(a) = &self.anonymous {
            return Ok(a.clone());
        }
        let header = metadata.get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| Status::unauthenticated("`authorization` must be `Bearer <token>`"))?;
        self.by_token
            .get(&crate::service::config::hash_token(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none included)
/// and everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, token: &str) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            tokens: vec![crate::service::config::hash_token(token)],
            tokens_file: None,
            policies: vec!["strict".into()],
            concurrency: 1,
            rate_per_second: 1.0,
            burst: Some(2),
            catalog: vec![crate::service::config::CatalogPermission::Run],
            steps: Vec::new(),
        }
    }

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", a.parse().unwrap());
        }
        m
    }

    #[test]
    fn globs_match_step_names() {
        for (p, n, want) in [
            ("billing-*", "billing-export", true),
            ("billing-*", "billing-", true),
            ("billing-*", "bill", false),
            ("*", "anything", true),
            ("csv-check", "csv-check", true),
            ("csv-check", "csv-check-2", false),
            ("*-check", "csv-check", true),
            ("*-check", "csv-checks", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} {n}");
        }
    }

    #[test]
    fn catalog_permissions_and_visibility() {
        let mut c = tenant("acme", "tok");
        c.steps = vec!["billing-*".into(), "shared".into()];
        let t = Tenants::from_config(&[c]).unwrap();
        let acme = t.authenticate(&md(Some("Bearer tok"))).unwrap();
        assert!(acme.may(CatalogPermission::Run) && !acme.may(CatalogPermission::Publish));
        let e = acme.require(CatalogPermission::Promote).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("`promote`"), "{}", e.message());
        assert!(acme.may_see("billing-export") && acme.may_see("shared"));
        assert!(!acme.may_see("hr-export"));
        let local = Tenants::default().authenticate(&md(None)).unwrap();
        assert!(local.may(CatalogPermission::Promote) && local.may_see("anything"));
    }

    #[test]
    fn tokens_map_to_tenants() {
        let t = Tenants::from_config(&[tenant("acme", "tok-a"), tenant("beta", "tok-b")]).unwrap();
        assert_eq!(
            t.authenticate(&md(Some("Bearer tok-b"))).unwrap().name,
            "beta"
        );
        for bad in [None, Some("Bearer nope"), Some("Basic x")] {
            assert_eq!(
                t.authenticate(&md(bad)).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        assert!(Tenants::from_config(&[tenant("a", "same"), tenant("b", "same")]).is_err());
        let open = Tenants::default();
        assert_eq!(open.authenticate(&md(None)).unwrap().name, "local");
    }

    #[test]
    fn policies_quotas_and_rates_are_enforced() {
        let t = Tenants::from_config(&[tenant("acme", "tok")]).unwrap();
        let acme = t.authenticate(&md(Some("Bearer tok"))).unwrap();
        assert!(acme.check_policy("strict").is_ok());
        let e = acme.check_policy("").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "tenant `acme` may not use policy `default` (allowed: strict)"
        );
        let first = acme.admit().unwrap();
        let e = acme.admit().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("quota of 1 jobs"));
        drop(first);
        // The burst of 2 is spent (two admits took tokens); the third is rate limited with retry info.
        let e = acme.admit().unwrap_err();
        assert!(e.message().contains("rate limit"), "{}", e.message());
        assert!(
            e.get_details_retry_info()
                .is_some_and(|r| r.retry_delay.is_some())
        );
    }
}
