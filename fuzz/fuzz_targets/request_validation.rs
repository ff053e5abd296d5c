//! Request validation (paths, limits, env, args) on arbitrary input: never panics, and every
//! accepted input path is a safe relative path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepbox::job::request::{InputFile, RuntimeKind, StepJob};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let policy = lines.next().unwrap_or_default().to_string();
    let mut job = StepJob::new(RuntimeKind::Python, "print(1)");
    job.policy = policy;
    for line in lines {
        if let Some(limit) = line.strip_prefix("limit ") {
            let _ = job.limits.set_pair(limit);
        } else if let Some(env) = line.strip_prefix("env ") {
            if let Some((k, v)) = env.split_once('=') {
                job.env.insert(k.to_string(), v.to_string());
            }
        } else if let Some(arg) = line.strip_prefix("arg ") {
            job.args.push(arg.to_string());
        } else {
            job.inputs.push(InputFile { path: line.to_string(), content: bytes::Bytes::new() });
        }
    }
    if let Ok(valid) = job.validate(&stepbox::PolicySet::embedded()) {
        for p in &valid.input_paths {
            assert!(p.is_relative());
            assert!(p.components().all(|c| matches!(c, std::path::Component::Normal(_))));
        }
    }
});
