//! Manifests: sealed, verifiable, and reproducible under a deterministic policy.

use stepbox::Status;

use crate::common::*;

const SRC: &str = "import random, time, os, uuid\nprint(random.random(), time.time(), os.urandom(8).hex(), uuid.uuid4())\nopen('/output/r.txt','w').write(str(random.randint(0, 10**9)))";

#[tokio::test]
async fn deterministic_jobs_have_the_same_digest_every_run() {
    let job = || {
        let mut j = py(SRC);
        j.policy = "deterministic".into();
        j.inputs = vec![input("in.csv", "a,b\n")];
        j
    };
    let (a, b) = (run(job()).await, run(job()).await);
    assert_status(&a, Status::Succeeded);
    assert_eq!(a.manifest.digest, b.manifest.digest);
    assert_eq!(a.manifest, b.manifest);
    assert!(a.manifest.verify());
    assert!(a.manifest.deterministic);
    assert_eq!(a.manifest.outputs.len(), 1);
}

#[tokio::test]
async fn other_jobs_and_tampering_change_the_digest() {
    let (a, b) = (run(py(SRC)).await, run(py(SRC)).await);
    assert_ne!(
        a.manifest.digest, b.manifest.digest,
        "random output differs, so must the digest"
    );
    let mut forged = a.manifest.clone();
    forged.stdout_sha256 = b.manifest.stdout_sha256.clone();
    assert!(!forged.verify());
    assert!(a.manifest.verify());
}
